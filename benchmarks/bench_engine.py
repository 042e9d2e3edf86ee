"""Engine benchmark: LightGCN training-epoch time and full-evaluation time (median of N runs).

    python benchmarks/bench_engine.py crgcn-beibei bvae-jd --repeats 3 [--threads 2]

Prints one Markdown row per dataset. Evaluation = final embeddings once + scoring, masking and
top-K for every test user of the target (protocol ``default``, K = 10, 20).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mbrec.config import build_config
from mbrec.data.registry import load_dataset
from mbrec.evaluate import evaluate
from mbrec.optim import adam
from mbrec.rundir import build_model
from mbrec.train import set_seed, train_epoch


def bench(name: str, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    data = load_dataset(name)
    load_s = time.perf_counter() - t0
    cfg = build_config("lightgcn", name)
    set_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg, data, device)
    graphs = model.build_graphs(data, device)
    sampler = model.make_sampler(data)
    opt = adam(model.parameters(), cfg.train.lr)
    rng = np.random.default_rng(0)
    epochs, evals = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        train_epoch(model, graphs, sampler, opt, rng, device)
        epochs.append(time.perf_counter() - t)
        t = time.perf_counter()
        evaluate(model, graphs, data, cfg.protocol, "test")
        evals.append(time.perf_counter() - t)
    return {
        "load_s": load_s,
        "epoch_s": statistics.median(epochs),
        "eval_s": statistics.median(evals),
        "test_users": int((np.diff(data.test[data.target].indptr) > 0).sum()),
        "pairs": int(data.train[data.target].nnz),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dataset | target train pairs | LightGCN epoch (s) | full evaluation, test users (s) | load (s) |")
    print("|---|---|---|---|---|")
    for name in args.datasets:
        r = bench(name, args.repeats)
        print(f"| {name} | {r['pairs']:,} | {r['epoch_s']:.2f} | {r['eval_s']:.2f} ({r['test_users']:,} users) | {r['load_s']:.2f} |")


if __name__ == "__main__":
    main()
