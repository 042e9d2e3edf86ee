"""torch's GEMM (MKL in the CPU wheels) against NumPy's BLAS (OpenBLAS) on the dense products
mbrec runs most: the evidence behind :mod:`mbrec.dense`'s rule.

    python benchmarks/bench_dense.py [--threads 1] [--repeats 15]

Shapes: a batch of embeddings against a whole table (contrastive logits of COPF and PKEF against
every user or item, full-ranking scores in evaluation) and the two backward products of the
first. Each product is timed alone, median of ``--repeats`` runs in process CPU time (1 thread)
or wall time (more threads). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

#: (what, rows of the batch, table rows, inner width)
SHAPES = [
    ("COPF Taobao: target batch items x all items", 790, 11_953, 64),
    ("COPF Taobao: target batch users x all users", 256, 15_449, 64),
    ("evaluation: 2,048 users x all Beibei items", 2_048, 7_977, 64),
    ("evaluation: 2,048 users x 56,569 items (1M-user scale)", 2_048, 56_569, 64),
]


def _median(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def rows(repeats: int, clock: Callable[[], float]) -> list[str]:
    out = []
    for what, n, m, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, t, e = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g), torch.rand(n, m, generator=g)
        products = {"forward [n, d] x [d, m]": (q, t.T), "backward [n, m] x [m, d]": (e, t),
                    "backward [m, n] x [n, d]": (e.T, q)}
        for name, (a, b) in products.items():
            tt = _median(lambda a=a, b=b: a @ b, repeats, clock)
            tn = _median(lambda a=a, b=b: np.matmul(a.numpy(), b.numpy()), repeats, clock)
            out.append(f"| {what} | {name} | {1e3 * tt:.1f} | {1e3 * tn:.1f} | {tt / tn:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"{args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time, torch {torch.__version__}, "
          f"NumPy {np.__version__}\n")
    print("| product | shape | torch ms | NumPy ms | torch / NumPy |\n|---|---|---|---|---|")
    print("\n".join(rows(args.repeats, clock)))


if __name__ == "__main__":
    main()
