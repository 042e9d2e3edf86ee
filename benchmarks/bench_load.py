"""Load time per shared dataset (median of N loads) and of the built-in synthetic data, and
load time and peak memory of large generated generic-format files.

    python benchmarks/bench_load.py [--repeats 3] [--root ../shared/datasets] [--generic]
    python benchmarks/bench_load.py --scale 1M,10M,30M [--formats csv,parquet] [--dir /tmp/mbrec-scale]

``--generic`` also converts each dataset to the generic format (in a temp folder) and times
loading that copy. Prints a Markdown table.

``--scale`` writes ``mbrec synthetic``-style generic data of about that many rows (the shape of
``synthetic-large`` converted by ``mbrec convert``: ids ``u<k>``/``i<k>``, columns
``user,item,behavior,split``, about 61 rows and 0.4 items per user, view/cart/buy training rows
in its proportions, one valid and one test row per user and behavior, item popularity
``∝ rank^-0.5``) under ``--dir`` (never inside the repository; reused when present), then loads
each file once in a fresh process and records the wall time of ``load_dataset`` and the
process's peak RSS (``VmHWM``), next to the peak RSS of the same process before loading (after
its imports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mbrec.data.convert import write_generic
from mbrec.data.registry import datasets_root, detect_layout, load_dataset

SHARED = ("crgcn-beibei", "hkuds-beibei", "mule-taobao", "mule-taobao/pkef_pickles", "bvae-jd")
BUILTIN = ("synthetic", "synthetic-large")


def timed(spec: str | Path, repeats: int) -> tuple[float, object]:
    times, data = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        data = load_dataset(spec)
        times.append(time.perf_counter() - t)
    return statistics.median(times), data


# --------------------------------------------------------------------------- scale
#: rows per user and per-behavior training rows per user, from synthetic-large (1,226,295 rows,
#: 20,000 users, 8,000 items; train view 760,018, cart 226,767, buy 119,516; 1 valid + 1 test
#: per user and behavior)
ROWS_PER_USER = 1_226_295 / 20_000
ITEMS_PER_USER = 8_000 / 20_000
TRAIN_PER_USER = {"view": 760_018 / 20_000, "cart": 226_767 / 20_000, "buy": 119_516 / 20_000}
USERS_PER_CHUNK = 20_000


def parse_rows(text: str) -> int:
    """``1M`` -> 1,000,000; ``250k`` -> 250,000; plain integers as they are."""
    text = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def synthetic_chunks(n_rows: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Yield pyarrow tables of ``synthetic``-style generic rows, ``USERS_PER_CHUNK`` users each."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n_users = max(2, round(n_rows / ROWS_PER_USER))
    n_items = max(10, round(n_users * ITEMS_PER_USER))
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -0.5)
    cdf /= cdf[-1]
    perm = np.random.default_rng(seed + 1).permutation(n_items)  # popular items anywhere in the id range
    rng = np.random.default_rng(seed)
    names = ("view", "cart", "buy")
    for start in range(0, n_users, USERS_PER_CHUNK):
        users = np.arange(start, min(n_users, start + USERS_PER_CHUNK))
        parts_u, parts_b, parts_s = [], [], []
        for k, b in enumerate(names):
            n_train = np.maximum(1, rng.poisson(TRAIN_PER_USER[b], len(users)))
            for s, counts in (("train", n_train), ("valid", np.ones_like(n_train)), ("test", np.ones_like(n_train))):
                parts_u.append(np.repeat(users, counts))
                parts_b.append(np.full(int(counts.sum()), k, dtype=np.int8))
                parts_s.append(np.full(int(counts.sum()), ("train", "valid", "test").index(s), dtype=np.int8))
        u = np.concatenate(parts_u)
        items = perm[np.searchsorted(cdf, rng.random(len(u)))]
        order = rng.permutation(len(u))  # rows in no particular order, like a real log
        text = lambda prefix, ids: pc.binary_join_element_wise(  # noqa: E731
            prefix, pc.cast(pa.array(ids), pa.string()), "")
        yield pa.table({
            "user": text("u", u[order]),
            "item": text("i", items[order]),
            "behavior": pa.DictionaryArray.from_arrays(pa.array(np.concatenate(parts_b)[order]), pa.array(names)).cast(pa.string()),
            "split": pa.DictionaryArray.from_arrays(pa.array(np.concatenate(parts_s)[order]),
                                                    pa.array(["train", "valid", "test"])).cast(pa.string()),
        })


def write_scale(n_rows: int, fmt: str, out: Path) -> Path:
    """Write (once) a generic dataset folder of about ``n_rows`` rows; returns it."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = out / f"synthetic-{n_rows}-{fmt}"
    table_path = folder / f"interactions.{fmt}"
    if table_path.is_file() and (folder / "dataset.yaml").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    writer = None
    tmp = table_path.with_suffix(".partial")
    for chunk in synthetic_chunks(n_rows):
        if writer is None:
            writer = (pq.ParquetWriter(tmp, chunk.schema) if fmt == "parquet"
                      else pacsv.CSVWriter(tmp, chunk.schema))
        if fmt == "parquet":
            writer.write_table(chunk, row_group_size=1 << 20)
        else:
            writer.write_table(chunk)
    assert writer is not None
    writer.close()
    tmp.rename(table_path)
    (folder / "dataset.yaml").write_text("behaviors: [view, cart, buy]\nname: synthetic-scale\n")
    return folder


CHILD = """
import json, resource, sys, time

def hwm_kb():  # this process's peak RSS (VmHWM; ru_maxrss can carry the parent's over exec)
    try:
        with open("/proc/self/status") as fh:
            return int(next(ln for ln in fh if ln.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

from mbrec.data.registry import load_dataset
base = hwm_kb()
t = time.perf_counter()
data = load_dataset(sys.argv[1])
sec = time.perf_counter() - t
peak = hwm_kb()
c = data.counts()
print(json.dumps({"seconds": sec, "peak_kb": peak, "base_kb": base, "users": data.n_users,
                  "items": data.n_items, "pairs": sum(sum(v.values()) for v in c.values())}))
"""


def measure(folder: Path) -> dict[str, float]:
    """Load ``folder`` once in a fresh process: seconds, peak and pre-load RSS (kB), sizes."""
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(res.stdout.strip().splitlines()[-1])


def scale_main(sizes: list[int], formats: list[str], out: Path) -> None:
    print("| rows in file | format | file MB | users | items | pairs loaded | load s | peak RSS MB | "
          "RSS before loading MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for fmt in formats:
            folder = write_scale(n, fmt, out)
            path = folder / f"interactions.{fmt}"
            rows = _count_rows(path, fmt)
            m = measure(folder)
            print(f"| {rows:,} | {fmt} | {path.stat().st_size / 2**20:,.0f} | {m['users']:,} | {m['items']:,} | "
                  f"{m['pairs']:,} | {m['seconds']:.1f} | {m['peak_kb'] / 1024:,.0f} | {m['base_kb'] / 1024:,.0f} |",
                  flush=True)


def _count_rows(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b"")) - 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--generic", action="store_true", help="also time the converted generic copy")
    ap.add_argument("--scale", help="comma-separated row counts (1M,10M,30M): generated generic data")
    ap.add_argument("--formats", default="csv,parquet", help="with --scale: csv, parquet or both")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mbrec-scale",
                    help="with --scale: where the generated files go (outside the repository)")
    args = ap.parse_args()
    if args.scale:
        scale_main([parse_rows(s) for s in args.scale.split(",")], args.formats.split(","), args.dir)
        return
    root = args.root or datasets_root()
    print("| dataset | layout | users | items | pairs (all splits) | load s (median of "
          f"{args.repeats}) |" + (" generic copy load s |" if args.generic else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.generic else ""))
    specs: list[tuple[str, str | Path]] = [(s, root / s) for s in SHARED if (root / s).is_dir()]
    specs += [(s, s) for s in BUILTIN]
    for label, spec in specs:
        sec, data = timed(spec, args.repeats)
        layout = detect_layout(spec) if isinstance(spec, Path) else "builtin"
        nnz = sum(sum(v.values()) for v in data.counts().values())  # type: ignore[attr-defined]
        row = (f"| {label} | {layout} | {data.n_users:,} | {data.n_items:,} | {nnz:,} | "  # type: ignore[attr-defined]
               f"{sec:.2f} |")
        if args.generic:
            with tempfile.TemporaryDirectory() as tmp:
                out = write_generic(data, Path(tmp) / "g")  # type: ignore[arg-type]
                gsec, _ = timed(out, args.repeats)
            row += f" {gsec:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
