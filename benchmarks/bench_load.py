"""Load time per shared dataset (median of N loads) and of the built-in synthetic data.

    python benchmarks/bench_load.py [--repeats 3] [--root ../shared/datasets] [--generic]

``--generic`` also converts each dataset to the generic format (in a temp folder) and times
loading that copy. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--generic", action="store_true", help="also time the converted generic copy")
    args = ap.parse_args()
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
