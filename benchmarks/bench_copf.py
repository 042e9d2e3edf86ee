"""COPF / PKEF benchmark: training-epoch time (fixed number of steps, median step time x
batches per epoch) and one full evaluation of the target over every test user.

    python benchmarks/bench_copf.py hkuds-beibei mule-taobao --models copf pkef --steps 5 [--threads 1] [--eval]

Uses the model arguments of ``configs/<model>/<dataset>.yaml``. Prints one Markdown row per run.
The epoch time is EXTRAPOLATED: median of ``--steps`` timed steps (after one warm-up step) x the
sampler's batches per epoch (COPF: all users / 256; PKEF: 10,000 users / 256).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mbrec.config import build_config
from mbrec.data.registry import load_dataset
from mbrec.optim import adam
from mbrec.evaluate import evaluate
from mbrec.rundir import build_model
from mbrec.train import set_seed, train_step

ROOT = Path(__file__).resolve().parents[1]


def bench(model_name: str, name: str, steps: int, do_eval: bool) -> dict[str, float]:
    cfg_file = ROOT / "configs" / model_name / f"{name.split('/')[0]}.yaml"
    cfg = build_config(model_name, config_file=cfg_file)
    data = load_dataset(cfg.data, **cfg.data_options)
    set_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg, data, device)
    t = time.perf_counter()
    graphs = model.build_graphs(data, device)
    sampler = model.make_sampler(data)
    setup_s = time.perf_counter() - t
    opt = adam(model.parameters(), cfg.train.lr)
    it = sampler.epoch(np.random.default_rng(0))
    times, samp = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        train_step(model, graphs, batch, opt, device)
        t2 = time.perf_counter()
        if i > 0:
            times.append(t2 - t0)
            samp.append(t1 - t0)
    step_s = statistics.median(times)
    out = {"setup_s": setup_s, "step_s": step_s, "sample_s": statistics.median(samp),
           "batches": len(sampler), "epoch_s": step_s * len(sampler), "eval_s": float("nan")}
    if do_eval:
        t = time.perf_counter()
        res = evaluate(model, graphs, data, cfg.protocol, "test")
        out["eval_s"] = time.perf_counter() - t
        out["test"] = res  # type: ignore[assignment]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--models", nargs="+", default=["copf", "pkef"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", action="store_true", help="also time one full test evaluation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | dataset | threads | setup s | median step s (sampling s) | batches/epoch | epoch s (extrapolated) | full eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        for m in args.models:
            r = bench(m, name, args.steps, args.eval)
            print(f"| {m} | {name} | {args.threads} | {r['setup_s']:.1f} | {r['step_s']:.2f} ({r['sample_s']:.3f}) | "
                  f"{r['batches']} | {r['epoch_s']:.0f} | {r['eval_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
