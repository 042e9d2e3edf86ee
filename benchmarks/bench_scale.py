"""Scale study: load, graph build, memory, training steps and full evaluation from 20k to 1M users.

    python benchmarks/bench_scale.py [--sizes 20k,100k,300k,1M] [--models lightgcn,rmbrec,crgcn]
        [--nprocs 1,2] [--steps 100] [--dir /tmp/mbrec-scale] [--png benchmarks/scale.png]
    python benchmarks/bench_scale.py --plot-only --png benchmarks/scale.png

**Data.** For each size the built-in generator (``synthetic-large``: the view -> cart -> buy
funnel, popularity bias, direct buys, leave-one-out valid/test for every behavior) is run once
with ``n_users`` set, ``n_items = 8000 x (n_users / 20000) ** items_exponent`` (synthetic-large's
8,000 items at 20,000 users; exponent 0.5 by default: the catalog grows as the square root of the
users, 56,569 items at 1M; 1.0 keeps synthetic-large's 0.4 items per user, which makes full
ranking, users x items, grow quadratically), ``views_per_user`` (20: about 31 pairs per user, 31M at 1M users) and ``candidates`` (256: the
linear-time view draw, :mod:`mbrec.data.synthetic`), in a fresh process; the result is written
in the generic format (``interactions.parquet``, ``users.txt``, ``items.txt``, ``dataset.yaml``)
under ``--dir`` (outside the repository; reused when present).

**Measurements.** Each (size, model, ranks) runs in a fresh process (``--nproc 2``: two gloo
ranks started by ``torch.distributed.run``, one thread each, training through
:func:`mbrec.train.parallel_step` as ``mbrec train --nproc 2`` does) with the model's no-config
defaults (``mbrec train MODEL DATA`` without ``--config``):

* ``load_s``: ``mbrec.rundir.load_data`` (the generic Parquet reader, id maps, CSR build);
* ``graph_s``: ``model.build_graphs`` (``model_s``: building the model, parameters included);
* ``step_s``: mean wall time of ``--steps`` training steps after 2 warm-up steps (sampling
  included); ``epoch_s``: one full epoch (``mbrec.train.train_epoch``) when the epoch has at
  most ``--steps`` steps (``epoch_kind`` "measured"), else ``steps_per_epoch x step_s``
  (``epoch_kind`` "steps x step time");
* ``eval_s``: one full-ranking evaluation of the test split (``mbrec.evaluate.evaluate``, all
  items, every held-out user, the model's default protocol); with 2 ranks rank 0 alone
  evaluates (as in ``mbrec train``), which is the same computation, so it is measured once,
  with 1 rank;
* ``peak_rss_mb``: the process's ``VmHWM`` (with 2 ranks the larger rank's), also after each stage;
* ``loadavg``: ``/proc/loadavg`` before and after (the machine may be shared).

A watchdog stops a measurement whose processes together exceed ``--max-rss-gb``. Results go to
``DIR/scale.json`` (merged across runs: a measurement already there is skipped unless
``--redo``) and the plot (log-log, time and memory against interactions) to ``--png``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

HERE = Path(__file__).resolve()
DEFAULT_DIR = Path(tempfile.gettempdir()) / "mbrec-scale"
SIZES = ("20k", "100k", "300k", "1M")
MODELS = ("lightgcn", "rmbrec", "crgcn")
SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- helpers
def parse_count(text: str) -> int:
    """``1M`` -> 1,000,000; ``20k`` -> 20,000; plain integers as they are."""
    text = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def hwm_mb() -> float:
    """This process's peak resident memory (``VmHWM``) in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def data_folder(root: Path, n_users: int) -> Path:
    return root / f"synth-{n_users}u"


# --------------------------------------------------------------------------- data
def generator_options(n_users: int, items_exponent: float, views_per_user: float, candidates: int) -> dict[str, Any]:
    """``data_options`` of the built-in ``synthetic-large`` for one size."""
    return {"n_users": n_users, "n_items": max(10, round(8000 * (n_users / 20000) ** items_exponent)),
            "views_per_user": views_per_user, "candidates": candidates}


def write_parquet(data: Any, folder: Path) -> int:
    """Write ``data`` in the generic format with ``interactions.parquet``; returns the rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "interactions.parquet.partial"
    writer, rows = None, 0
    for s in SPLITS:
        for b in data.behaviors:
            m = data.split(s)[b].tocoo()
            if m.nnz == 0:
                continue
            ids = lambda prefix, x: pc.binary_join_element_wise(prefix, pc.cast(pa.array(x), pa.string()), "")  # noqa: E731
            table = pa.table({"user": ids("u", m.row.astype(np.int64)), "item": ids("i", m.col.astype(np.int64)),
                              "behavior": pa.array(np.full(m.nnz, b)), "split": pa.array(np.full(m.nnz, s))})
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=1 << 20)
            rows += m.nnz
    assert writer is not None
    writer.close()
    (folder / "users.txt").write_text("\n".join(data.user_ids.tolist()) + "\n")
    (folder / "items.txt").write_text("\n".join(data.item_ids.tolist()) + "\n")
    meta = {"name": folder.name, "behaviors": list(data.behaviors), "target": data.target, "users": "users.txt",
            "items": "items.txt", "description": data.description}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, width=100))
    tmp.rename(folder / "interactions.parquet")
    return rows


def generate_main(args: argparse.Namespace) -> None:
    """Child: generate one size with the built-in generator and write it (prints a JSON line)."""
    from mbrec.data.synthetic import load_builtin

    opts = generator_options(args.users, args.items_exponent, args.views_per_user, args.candidates)
    t = time.perf_counter()
    data = load_builtin("synthetic-large", seed=0, **opts)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    rows = write_parquet(data, Path(args.out))
    counts = data.counts()
    print(json.dumps({"options": opts, "generate_s": gen_s, "write_s": time.perf_counter() - t,
                      "generate_peak_rss_mb": hwm_mb(), "users": data.n_users, "items": data.n_items,
                      "interactions": rows, "train": counts["train"]}))


def ensure_data(root: Path, n_users: int, args: argparse.Namespace) -> dict[str, Any]:
    """Generate (once) the data of ``n_users`` users; returns its record (``info.json``)."""
    folder = data_folder(root, n_users)
    info = folder / "info.json"
    if info.is_file() and (folder / "interactions.parquet").is_file():
        return json.loads(info.read_text())
    cmd = [sys.executable, str(HERE), "generate", "--users", str(n_users), "--out", str(folder),
           "--items-exponent", str(args.items_exponent), "--views-per-user", str(args.views_per_user),
           "--candidates", str(args.candidates)]
    rec = run_child(cmd, args.max_rss_gb)
    rec["command"] = " ".join(["python benchmarks/bench_scale.py"] + cmd[2:])
    info.write_text(json.dumps(rec, indent=1))
    return rec


# --------------------------------------------------------------------------- one measurement
def worker_main(args: argparse.Namespace) -> None:
    """Child (or one rank of it): load, build, train ``--steps`` steps, evaluate; writes JSON."""
    import torch

    from mbrec.config import build_config
    from mbrec.distributed import Parallel, batch_axis
    from mbrec.evaluate import evaluate
    from mbrec.optim import adam
    from mbrec.rundir import build_model, load_data
    from mbrec.train import parallel_step, set_seed, train_epoch, train_step

    par = Parallel.from_env()
    if par is not None:
        par.start()
    rec: dict[str, Any] = {"rank": 0 if par is None else par.rank, "ranks": 1 if par is None else par.world,
                           "threads": torch.get_num_threads(), "rss_mb": {"start": hwm_mb()}}
    cfg = build_config(args.model, args.data)
    device = torch.device("cpu")
    t = time.perf_counter()
    data = load_data(cfg)
    rec["load_s"] = time.perf_counter() - t
    rec["rss_mb"]["load"] = hwm_mb()
    set_seed(cfg.seed)
    t = time.perf_counter()
    model = build_model(cfg, data, device)
    rec["model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    graphs = model.build_graphs(data, device)
    rec["graph_s"] = time.perf_counter() - t
    rec["rss_mb"]["graphs"] = hwm_mb()
    sampler = model.make_sampler(data)
    opt = adam(model.parameters(), cfg.train.lr, cfg.train.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    from mbrec.bench import steps_per_epoch

    rec["steps_per_epoch"] = spe = steps_per_epoch(sampler, np.random.default_rng(cfg.seed))
    axis = batch_axis(sampler) if par is not None else 0

    def step(batch: Any) -> None:
        if par is None:
            train_step(model, graphs, batch, opt, device, grad_clip=cfg.train.grad_clip)
        else:
            parallel_step(model, graphs, batch, opt, device, par, axis=axis, grad_clip=cfg.train.grad_clip)

    model.train()
    batches = sampler.epoch(rng)
    for batch in _cycle(batches, sampler, rng, 2):  # warm-up
        step(batch)
    if spe <= args.steps:
        t = time.perf_counter()
        _, n = train_epoch(model, graphs, sampler, opt, rng, device, grad_clip=cfg.train.grad_clip, parallel=par)
        rec["epoch_s"] = time.perf_counter() - t
        rec["step_s"], rec["timed_steps"], rec["epoch_kind"] = rec["epoch_s"] / n, n, "measured"
    else:
        t = time.perf_counter()
        n = 0
        for batch in _cycle(batches, sampler, rng, args.steps):
            step(batch)
            n += 1
        rec["step_s"] = (time.perf_counter() - t) / n
        rec["timed_steps"], rec["epoch_s"], rec["epoch_kind"] = n, rec["step_s"] * spe, "steps x step time"
    rec["rss_mb"]["train"] = hwm_mb()
    if args.eval and rec["rank"] == 0:
        t = time.perf_counter()
        metrics = evaluate(model, graphs, data, cfg.protocol, "test", memory_mb=cfg.train.eval_memory_mb)
        rec["eval_s"] = time.perf_counter() - t
        rec["eval_users"] = int(next(iter(metrics.values()))["n_users"])
        rec["rss_mb"]["eval"] = hwm_mb()
    rec["peak_rss_mb"] = hwm_mb()
    rec.update(users=data.n_users, items=data.n_items,
               train_pairs={b: int(m.nnz) for b, m in data.train.items()})
    Path(f"{args.result}.rank{rec['rank']}").write_text(json.dumps(rec))
    if par is not None:
        import torch.distributed as dist

        dist.barrier()
        par.close()


def _cycle(batches: Iterable[Any], sampler: Any, rng: np.random.Generator, n: int) -> Iterable[Any]:
    """``n`` batches, starting a new epoch when one runs out."""
    it = iter(batches)
    for _ in range(n):
        batch = next(it, None)
        if batch is None:
            it = iter(sampler.epoch(rng))
            batch = next(it)
        yield batch


def _group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in process group ``pgid`` (MB)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21])  # rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(cmd: list[str], max_rss_gb: float) -> dict[str, Any]:
    """Run ``cmd`` in its own process group (one torch thread); stop it past ``max_rss_gb``.
    Returns the JSON of its last stdout line, plus ``loadavg_before``/``after`` and ``wall_s``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before, t = loadavg(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _group_rss_mb(proc.pid))
            if peak > max_rss_gb * 1024:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"stopped: {peak:,.0f} MB resident > --max-rss-gb {max_rss_gb}: {' '.join(cmd)}")
            time.sleep(0.5)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{text[-3000:]}")
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}
    rec.update(loadavg_before=before, loadavg_after=loadavg(), wall_s=time.perf_counter() - t,
               group_peak_rss_mb=peak)
    return rec


def measure(folder: Path, model: str, nproc: int, steps: int, max_rss_gb: float) -> dict[str, Any]:
    """One measurement in fresh process(es); the ranks' records merged (rank 0's times, the
    largest peak RSS)."""
    result = folder / f".result-{model}-{nproc}"
    for old in folder.glob(result.name + ".rank*"):
        old.unlink()
    tail = ["worker", "--data", str(folder), "--model", model, "--steps", str(steps), "--result", str(result)]
    if nproc == 1:
        tail.append("--eval")
        cmd = [sys.executable, str(HERE)] + tail
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE)] + tail
    outer = run_child(cmd, max_rss_gb)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob(result.name + ".rank*"))]
    for p in folder.glob(result.name + ".rank*"):
        p.unlink()
    rec = dict(next(r for r in ranks if r["rank"] == 0))
    rec["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ranks)
    rec["peak_rss_mb_per_rank"] = [r["peak_rss_mb"] for r in ranks]
    rec.update({k: outer[k] for k in ("loadavg_before", "loadavg_after", "wall_s", "group_peak_rss_mb")})
    shown = ["python" if c == sys.executable else c for c in cmd]
    rec["command"] = "OMP_NUM_THREADS=1 " + " ".join(shown).replace(str(HERE), "benchmarks/bench_scale.py")
    return rec


# --------------------------------------------------------------------------- results and plot
def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"data": {}, "runs": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.rename(path)


def run_key(n_users: int, model: str, nproc: int) -> str:
    return f"{n_users}/{model}/{nproc}"


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, by size, model and ranks."""
    lines = ["| users | items | interactions | model | ranks | load s | graph s | steps/epoch | step s | "
             "epoch s | epoch is | eval s | peak RSS MB | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results["runs"], key=_sort_key):
        r = results["runs"][key]
        d = results["data"].get(str(r["users"]), {})
        ev = f"{r['eval_s']:.1f}" if "eval_s" in r else "(rank 0: as 1)"
        la = "/".join(f"{x:.1f}" for x in (r["loadavg_before"][0], r["loadavg_after"][0]))
        lines.append(f"| {r['users']:,} | {r['items']:,} | {d.get('interactions', 0):,} | {r['model']} | {r['ranks']} | "
                     f"{r['load_s']:.1f} | {r['graph_s']:.1f} | {r['steps_per_epoch']:,} | {r['step_s']:.3f} | "
                     f"{r['epoch_s']:,.{0 if r['epoch_s'] >= 100 else 1}f} | {'measured' if r['epoch_kind'] == 'measured' else 'steps x step'} | {ev} | "
                     f"{r['peak_rss_mb']:,.0f} | {la} |")
    return "\n".join(lines)


def _sort_key(key: str) -> tuple[int, str, int]:
    u, m, n = key.split("/")
    return int(u), m, int(n)


def plot(results: dict[str, Any], png: Path) -> None:
    """Log-log: epoch, evaluation, load and graph time, and peak RSS, against interactions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for key in sorted(results["runs"], key=_sort_key):
        r = results["runs"][key]
        series.setdefault((r["model"], r["ranks"]), []).append(r)
    colors = {m: f"C{k}" for k, m in enumerate(MODELS)}
    for (model, ranks), rs in sorted(series.items()):
        x = [results["data"][str(r["users"])]["interactions"] for r in rs]
        style = dict(color=colors.get(model, "k"), ls="-" if ranks == 1 else "--", marker="o" if ranks == 1 else "s",
                     ms=4)
        label = f"{model}, {ranks} rank{'s' if ranks > 1 else ''}"
        axes[0].plot(x, [r["epoch_s"] for r in rs], label=label, **style)
        axes[2].plot(x, [r["peak_rss_mb"] / 1024 for r in rs], label=label, **style)
        if ranks == 1:
            ev = [(xi, r["eval_s"]) for xi, r in zip(x, rs) if "eval_s" in r]
            if ev:
                axes[1].plot(*zip(*ev), label=f"{model}: full evaluation", **style)
            axes[1].plot(x, [r["graph_s"] for r in rs], label=f"{model}: graph build",
                         **{**style, "ls": ":", "marker": "^"})
            if model == MODELS[0]:
                axes[1].plot(x, [r["load_s"] for r in rs], label="load (Parquet)", color="k", ls="-.", marker="x", ms=4)
    xs = sorted(d["interactions"] for d in results["data"].values())
    for ax, title, ylabel in ((axes[0], "training epoch", "seconds"), (axes[1], "load, graphs, evaluation", "seconds"),
                              (axes[2], "peak RSS (largest rank)", "GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions (all splits)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if len(xs) >= 2:  # a slope-1 guide through the first point of the first line
            lines = ax.get_lines()
            if lines:
                x0, y0 = lines[0].get_xdata()[0], lines[0].get_ydata()[0]
                ax.plot([xs[0], xs[-1]], [y0 * xs[0] / x0, y0 * xs[-1] / x0], color="grey", lw=0.8, alpha=0.6,
                        label="linear (slope 1)")
        ax.legend(fontsize=6)
    fig.suptitle("mbrec scale study (benchmarks/scale.md): 1 thread per rank, shared 2-core CPU", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- driver
def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Generate every size and run every (size, model, ranks) not yet in the results."""
    root = Path(args.dir)
    path = root / "scale.json"
    results = load_results(path)
    for size in [parse_count(s) for s in args.sizes.split(",")]:
        results["data"][str(size)] = ensure_data(root, size, args)
        save_results(path, results)
        for model in args.models.split(","):
            for nproc in [int(n) for n in args.nprocs.split(",")]:
                key = run_key(size, model, nproc)
                if key in results["runs"] and not args.redo:
                    continue
                print(f"measuring {key}", file=sys.stderr, flush=True)
                try:
                    rec = measure(data_folder(root, size), model, nproc, args.steps, args.max_rss_gb)
                except RuntimeError as e:
                    results.setdefault("failed", {})[key] = str(e)[-2000:]
                    save_results(path, results)
                    print(f"failed {key}: {e}", file=sys.stderr, flush=True)
                    continue
                rec["model"] = model
                results["runs"][key] = rec
                results.get("failed", {}).pop(key, None)
                save_results(path, results)
                print(table({"data": results["data"], "runs": {key: rec}}).splitlines()[-1], flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("generate", help="(internal) generate one size")
    g.add_argument("--users", type=int, required=True)
    g.add_argument("--out", required=True)
    w = sub.add_parser("worker", help="(internal) one measurement")
    w.add_argument("--data", required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--steps", type=int, default=100)
    w.add_argument("--result", required=True)
    w.add_argument("--eval", action="store_true")
    for p in (ap, g):
        p.add_argument("--items-exponent", type=float, default=0.5,
                       help="n_items = 8000 * (n_users / 20000) ** this (1.0: synthetic-large's 0.4 items per user)")
        p.add_argument("--views-per-user", type=float, default=20.0, help="mean views per user (about 31 pairs)")
        p.add_argument("--candidates", type=int, default=256, help="generator's candidates per user (0: exact)")
    ap.add_argument("--sizes", default=",".join(SIZES), help="users per dataset, comma-separated (20k,1M)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--nprocs", default="1,2", help="ranks per measurement, comma-separated")
    ap.add_argument("--steps", type=int, default=100, help="timed steps (a whole epoch when it has no more)")
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="data and scale.json (outside the repository)")
    ap.add_argument("--png", default=None, help="where to write the plot (default DIR/scale.png)")
    ap.add_argument("--max-rss-gb", type=float, default=14.0, help="stop a measurement above this resident memory")
    ap.add_argument("--redo", action="store_true", help="measure again what scale.json already holds")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot and print the table")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        generate_main(args)
        return
    if args.cmd == "worker":
        worker_main(args)
        return
    results = load_results(Path(args.dir) / "scale.json") if args.plot_only else drive(args)
    print(table(results))
    if results["runs"]:
        plot(results, Path(args.png) if args.png else Path(args.dir) / "scale.png")


if __name__ == "__main__":
    main()
