"""RMBRec training-epoch time on crgcn-beibei at the official settings (median of N epochs).

    python benchmarks/bench_rmbrec.py [--epochs 5] [--threads 2] [--kernel auto|torch|scipy] [--data crgcn-beibei]

Official settings: configs/rmbrec/crgcn-beibei.yaml (batch 1024 users, 3 layers, 3 behaviors,
lambda_cl 0.8, REx). An epoch is what the trainer times: sampling, loss, backward and the Adam
step for every batch (no evaluation). Prints wall time and process CPU time per epoch (on a
shared machine the CPU time is the steadier number) and the load average, then one Markdown row.
``--kernel`` picks the fused layers' CPU product (``model_args.cpu_kernel``; default: the config's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mbrec.config import build_config
from mbrec.data.registry import load_dataset
from mbrec.optim import adam
from mbrec.rundir import build_model
from mbrec.train import set_seed, train_epoch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rmbrec" / "crgcn-beibei.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="crgcn-beibei")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--kernel", choices=["auto", "torch", "scipy"], help="model_args.cpu_kernel (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model_args.orm=irm_v1_code")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = list(a.set) + ([f"model_args.cpu_kernel={a.kernel}"] if a.kernel else [])
    cfg = build_config("rmbrec", a.data, config_file=CONFIG, overrides=overrides)
    data = load_dataset(a.data, seed=cfg.seed, **cfg.data_options)
    set_seed(cfg.seed)
    device = torch.device("cpu")
    model = build_model(cfg, data, device)
    graphs = model.build_graphs(data, device)
    sampler = model.make_sampler(data)
    opt = adam(model.parameters(), cfg.train.lr, cfg.train.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    walls, cpus, losses = [], [], []
    load0 = os.getloadavg()[0]
    for epoch in range(1, a.epochs + 1):
        w, c = time.perf_counter(), time.process_time()
        means, _ = train_epoch(model, graphs, sampler, opt, rng, device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        losses.append(means["loss"])
        print(f"epoch {epoch}: {walls[-1]:.1f} s wall, {cpus[-1]:.1f} s CPU, loss {losses[-1]:.4f}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    kernel = {"torch": "torch CSR", "scipy": "SciPy CSR + batch-row last layer",
              "auto": "torch CSR + SciPy batch-row last layer"}[model.cfg.cpu_kernel]
    print(
        f"| rmbrec | {a.data} | {kernel} | threads {torch.get_num_threads()} | {len(walls)} epochs | "
        f"median {statistics.median(walls):.1f} s wall | median {statistics.median(cpus):.1f} s CPU | "
        f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f} |"
    )


if __name__ == "__main__":
    main()
