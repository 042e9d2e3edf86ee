"""Every model's training epoch against its kernel floor, one ``mbrec bench`` process per row.

    python benchmarks/bench_floors.py [--threads 1 2] [--steps 8] [--rounds 3] [--only copf pkef] [--data hkuds-beibei]

Rows: each model's paper configs (``configs/<model>/<dataset>.yaml`` for the shared datasets).
Prints one Markdown table: model, dataset, threads, measured epoch s (median step x steps per
epoch), floor epoch s, ratio, peak MB, and the command of the row. Each row runs in its own
process so that peak memory is the row's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (model, dataset) rows: the configs of the paper datasets each model has
ROWS = [
    ("copf", "hkuds-beibei"), ("copf", "mule-taobao"),
    ("pkef", "hkuds-beibei"), ("pkef", "mule-taobao"),
    ("mbcgcn", "mule-taobao"), ("mbcgcn", "crgcn-beibei"),
    ("crgcn", "crgcn-beibei"), ("lightgcn", "crgcn-beibei"),
    ("bigel", "bvae-jd"), ("rmbrec", "crgcn-beibei"),
]


def run_row(model: str, data: str, threads: int, steps: int, clock: str, rounds: int = 1) -> dict:
    cmd = [sys.executable, "-m", "mbrec", "--threads", str(threads), "bench", model, data,
           "--config", str(ROOT / "configs" / model / f"{data}.yaml"), "--steps", str(steps), "--clock", clock,
           "--rounds", str(rounds), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", nargs="+", help="models to run (default: all rows)")
    ap.add_argument("--data", nargs="+", help="datasets to run (default: all rows)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="mbrec bench --clock")
    ap.add_argument("--rounds", type=int, default=1, help="mbrec bench --rounds")
    args = ap.parse_args()
    print("| model | dataset | threads | epoch s | floor s | ratio | peak MB | command |")
    print("|---|---|---|---|---|---|---|---|")
    for model, data in ROWS:
        if (args.only and model not in args.only) or (args.data and data not in args.data):
            continue
        for t in args.threads:
            r = run_row(model, data, t, args.steps, args.clock, args.rounds)
            cmd = f"`mbrec --threads {t} bench {model} {data} --steps {args.steps} --clock {args.clock} --rounds {args.rounds}`"
            if "error" in r:
                print(f"| {model} | {data} | {t} | - | - | - | - | {cmd}: {r['error']} |", flush=True)
                continue
            print(f"| {model} | {data} | {t} | {r['epoch_s']:.1f} | {r['floor_epoch_s']:.1f} | {r['ratio']:.2f} | "
                  f"{r['peak_mb']:.0f} | {cmd} |", flush=True)


if __name__ == "__main__":
    main()
