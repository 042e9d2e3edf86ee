"""``mbrec bench``: one training step of a model against its measured floor.

The floor of a step is the time of exactly the large products the algorithm requires, each run
alone with the fastest kernel this machine has, and nothing else:

* every sparse product ``A @ X`` (graph ``A`` of ``nnz`` entries, ``X`` of ``width`` columns),
  counting only the output rows the loss reads (``A[S] @ X``), and its backward ``A^T @ G`` when
  a gradient flows through it;
* every large dense product (contrastive logits of a batch against all users or items), with
  its two gradient products.

A model states its products in :meth:`mbrec.models.base.Model.floor_products` (what the
algorithm needs, not what the implementation happens to do), for one sampled batch. The floor is
computed by timing kernels here, never estimated: sparse products try torch's CSR kernel and
SciPy's CSR kernel and keep the faster; dense products the faster of torch's GEMM and NumPy's BLAS.

``floor epoch = steps per epoch x floor step``; ``ratio = measured step / floor step``.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from mbrec.graph import SparseGraph, kernel_choices
from mbrec.optim import adam


@dataclass
class SparseProduct:
    """``A @ X``: ``graph`` is ``A``; ``rows`` the output rows read: ``None`` (all), the node
    indices themselves (a batch's rows: their degrees decide the work, and a sampled batch
    favours well-connected nodes) or only their count (timed on that many random rows, which
    underestimates a degree-biased batch); ``backward``: a gradient flows to ``X`` (one more
    product ``A[S]^T @ G``), over ``backward_width`` columns when only some columns carry a
    gradient (default: all)."""

    name: str
    graph: SparseGraph
    width: int
    rows: int | np.ndarray | torch.Tensor | None = None
    backward: bool = True
    backward_width: int | None = None

    @property
    def n_rows(self) -> int | None:
        """How many output rows are read (``None``: all)."""
        return self.rows if self.rows is None or isinstance(self.rows, int) else len(self.rows)


@dataclass
class DenseProduct:
    """``[m, k] @ [k, n]`` and, with ``backward`` gradients, that many products of the same size."""

    name: str
    m: int
    k: int
    n: int
    backward: int = 2


Product = SparseProduct | DenseProduct


@dataclass
class ProductTime:
    product: Product
    forward_s: float
    backward_s: float
    kernel: str

    @property
    def seconds(self) -> float:
        return self.forward_s + self.backward_s


@dataclass
class BenchReport:
    model: str
    dataset: str
    threads: int
    device: str
    steps_per_epoch: int
    products: list[ProductTime] = field(default_factory=list)
    step_s: float = float("nan")
    sample_s: float = float("nan")
    peak_mb: float = float("nan")
    clock: str = "wall"
    #: the kernels the training steps' full products ran on (:func:`mbrec.graph.kernel_choices`)
    step_kernels: list[dict[str, Any]] = field(default_factory=list)
    #: ``(step s, floor step s)`` of each round (``bench(rounds=...)``); the report's own figures
    #: are the medians over the rounds
    rounds: list[tuple[float, float]] = field(default_factory=list)

    @property
    def floor_step_s(self) -> float:
        return sum(p.seconds for p in self.products)

    @property
    def ratio(self) -> float:
        return self.step_s / self.floor_step_s if self.products else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """The report as plain values (``mbrec bench --json``)."""
        return {"model": self.model, "dataset": self.dataset, "threads": self.threads, "device": self.device,
                "clock": self.clock, "steps_per_epoch": self.steps_per_epoch, "floor_step_s": self.floor_step_s,
                "step_s": self.step_s, "ratio": self.ratio, "floor_epoch_s": self.floor_step_s * self.steps_per_epoch,
                "epoch_s": self.step_s * self.steps_per_epoch, "sample_s": self.sample_s, "peak_mb": self.peak_mb,
                "products": [{"name": t.product.name, "forward_s": t.forward_s, "backward_s": t.backward_s,
                              "kernel": t.kernel} for t in self.products],
                "step_kernels": self.step_kernels, "rounds": [list(r) for r in self.rounds]}

    def table(self) -> str:
        """The report as Markdown: the products, then one summary row."""
        lines = [f"{self.model} on {self.dataset}: {self.steps_per_epoch} steps per epoch, {self.threads} thread(s), "
                 f"device {self.device}, {self.clock} clock",
                 "",
                 "| product | kind | shape | rows read | forward ms | backward ms | kernel |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.products:
            p = t.product
            if isinstance(p, SparseProduct):
                n, m = p.graph.shape
                shape = f"[{n:,} x {m:,}, nnz {p.graph.mat.values().numel():,}] x {p.width}"
                rows = "all" if p.n_rows is None else f"{p.n_rows:,}"
                kind = "sparse"
            else:
                shape, rows, kind = f"[{p.m:,} x {p.k}] x [{p.k} x {p.n:,}]", "all", "dense"
            bwd = f"{1e3 * t.backward_s:.1f}" if t.backward_s else "-"
            lines.append(f"| {p.name} | {kind} | {shape} | {rows} | {1e3 * t.forward_s:.1f} | {bwd} | {t.kernel} |")
        fl = self.floor_step_s
        lines += ["",
                  "| steps | floor step s | measured step s | ratio | floor epoch s | measured epoch s | sampling s/step | peak MB |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {self.steps_per_epoch} | {fl:.3f} | {self.step_s:.3f} | {self.ratio:.2f} | "
                  f"{fl * self.steps_per_epoch:.1f} | {self.step_s * self.steps_per_epoch:.1f} | {self.sample_s:.4f} | "
                  f"{self.peak_mb:.0f} |"]
        if len(self.rounds) > 1:
            lines += ["", f"Rounds (steps, then the floor's products, {len(self.rounds)} times; the figures above are "
                      "their medians): " + "; ".join(f"step {st:.3f} s / floor {fl_r:.3f} s = {st / fl_r:.2f}"
                                                    for st, fl_r in self.rounds)]
        if self.step_kernels:
            lines += ["", "Kernels of the training steps' full products (chosen by measurement, mbrec.graph.full_kernel): "
                      + "; ".join(f"[{k['shape'][0]:,} x {k['shape'][1]:,}, nnz {k['nnz']:,}] x {k['width']}: {k['kernel']}"
                                  for k in self.step_kernels)]
        return "\n".join(lines)


#: the clock every timing uses: wall time, or this process's CPU time (``--clock cpu``): on a
#: shared or virtual machine the wall clock also counts time the process waited for a core,
#: which can swing single-thread timings by 25%; CPU time does not (with several threads it
#: adds them up, so compare CPU times only at one thread)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: Callable[[], float] = time.perf_counter


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = _clock()
        fn()
        _sync(device)
        times.append(_clock() - t)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scipy_csr(g: torch.Tensor) -> sp.csr_matrix:
    return sp.csr_matrix((g.values().numpy(), g.col_indices().numpy(), g.crow_indices().numpy()), shape=tuple(g.shape))


def _torch_csr(m: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data.astype(np.float32)), size=m.shape, device=device,
                                       check_invariants=False)


def time_sparse(p: SparseProduct, device: torch.device, repeats: int, rng: np.random.Generator) -> ProductTime:
    """Forward ``A[S] @ X`` and backward ``A[S]^T @ G`` with the faster of torch CSR and SciPy CSR."""
    A = _scipy_csr(p.graph.mat.cpu())
    n, m = A.shape
    if isinstance(p.rows, int) and p.rows < n:
        A = A[np.sort(rng.choice(n, p.rows, replace=False))]
    elif p.rows is not None and not isinstance(p.rows, int):
        A = A[np.unique(np.asarray(p.rows.cpu() if isinstance(p.rows, torch.Tensor) else p.rows))]
    At = A.T.tocsr()
    X = np.random.default_rng(0).random((m, p.width), dtype=np.float32)
    G = np.random.default_rng(1).random((A.shape[0], p.backward_width or p.width), dtype=np.float32)
    best: tuple[float, float, str] | None = None
    kernels: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = []
    tA, tAt = _torch_csr(A, device), _torch_csr(At, device)
    tX, tG = torch.from_numpy(X).to(device), torch.from_numpy(G).to(device)
    kernels.append(("torch CSR", lambda: torch.sparse.mm(tA, tX), lambda: torch.sparse.mm(tAt, tG)))
    if device.type == "cpu":
        kernels.append(("SciPy CSR", lambda: A @ X, lambda: At @ G))
    for name, fwd, bwd in kernels:
        f = _median_time(fwd, repeats, device)
        b = _median_time(bwd, repeats, device) if p.backward else 0.0
        if best is None or f + b < best[0] + best[1]:
            best = (f, b, name)
    assert best is not None
    return ProductTime(p, best[0], best[1], best[2])


def time_dense(p: DenseProduct, device: torch.device, repeats: int) -> ProductTime:
    """Forward ``[m, k] @ [k, n]`` (a batch against a table stored as ``[n, k]`` rows, as the
    models hold them); backward ``[m, n] @ [n, k]`` and ``[n, m] @ [m, k]``. Each product on the
    faster of torch's GEMM and, on the CPU, NumPy's BLAS (:mod:`mbrec.dense`)."""
    a, t = torch.rand(p.m, p.k, device=device), torch.rand(p.n, p.k, device=device)
    g = torch.rand(p.m, p.n, device=device)
    products = [(a, t.T), (g, t), (g.T, a)][: 1 + p.backward]
    libraries = {"torch GEMM": lambda x, y: x @ y}
    if device.type == "cpu":
        libraries["NumPy BLAS"] = lambda x, y: np.matmul(x.numpy(), y.numpy())
    times = [{name: _median_time(lambda f=f, x=x, y=y: f(x, y), repeats, device) for name, f in libraries.items()}
             for x, y in products]
    forward = min(times[0], key=times[0].__getitem__)
    names = sorted({min(tm, key=tm.__getitem__) for tm in times})
    return ProductTime(p, times[0][forward], sum(min(tm.values()) for tm in times[1:]), " / ".join(names))


def steps_per_epoch(sampler: Any, rng: np.random.Generator) -> int:
    n = getattr(sampler, "n_batches", None)
    if n is None and hasattr(sampler, "__len__"):
        n = len(sampler)
    if n is None:  # count one epoch of sampling (cheap next to training)
        n = sum(1 for _ in sampler.epoch(rng))
    return int(n)


def bench(cfg: Any, *, steps: int = 10, repeats: int = 5, out: Callable[[str], None] | None = None,
          clock: str = "wall", pretrain: bool = False, rounds: int = 1) -> BenchReport:
    """Measure ``steps`` training steps of ``cfg`` and time the model's floor products, both with
    ``clock`` (:data:`CLOCKS`). ``pretrain``: the steps of the model's pretraining instead (a
    model with a ``pretraining(data, device)`` method returning objective, sampler, optimiser).
    ``rounds``: steps then products, that many times in turn; step and product times are the
    medians over the rounds, so a spell of a busy machine lands in both the steps and the floor
    of one round instead of in one of them."""
    global _clock
    _clock = CLOCKS[clock]
    from mbrec.errors import ConfigError
    from mbrec.rundir import build_model, load_data, resolve_device
    from mbrec.train import set_seed, to_tensors

    say = out or (lambda _m: None)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    set_seed(cfg.seed)
    model = build_model(cfg, data, device)
    graphs = model.build_graphs(data, device)
    if pretrain:
        if not hasattr(model, "pretraining"):
            raise ConfigError(f"model {cfg.model!r} has no pretraining to benchmark")
        trainable, sampler, opt = model.pretraining(data, device)
    else:
        trainable, sampler = model, model.make_sampler(data)
        opt = adam(model.parameters(), cfg.train.lr, cfg.train.weight_decay)
    name = f"{cfg.model} (pretraining)" if pretrain else cfg.model
    report = BenchReport(name, data.name, torch.get_num_threads(), str(device),
                         steps_per_epoch(sampler, np.random.default_rng(cfg.seed)), clock=clock)
    rng = np.random.default_rng(cfg.seed)
    products: list[Product] = []
    per_round: list[list[ProductTime]] = []
    step_times = []
    for r in range(rounds):
        first = _time_steps(report, trainable, graphs, sampler, opt, rng, device, steps, say)
        step_times.append(report.step_s)
        if r == 0:
            report.step_kernels = [{k: v for k, v in c.items() if k != "seconds"} for c in kernel_choices()]
            products = trainable.floor_products(graphs, to_tensors(first, device))
        per_round.append(_time_products(products, device, repeats, say))
        report.rounds.append((report.step_s, sum(t.seconds for t in per_round[-1])))
    report.step_s = statistics.median(step_times)
    report.products = [_median_product(times) for times in zip(*per_round)]
    if not products:
        print(f"mbrec bench: {name} declares no floor products (floor_products)", file=sys.stderr)
    return report


def _time_products(products: list[Product], device: torch.device, repeats: int,
                   say: Callable[[str], None]) -> list[ProductTime]:
    prng = np.random.default_rng(0)  # the same random rows in every round
    out = []
    for p in products:
        say(f"timing {p.name}")
        out.append(time_sparse(p, device, repeats, prng) if isinstance(p, SparseProduct) else time_dense(p, device, repeats))
    return out


def _median_product(times: tuple[ProductTime, ...]) -> ProductTime:
    """One product over the rounds: median forward and backward; the kernel of the fastest round."""
    best = min(times, key=lambda t: t.seconds)
    return ProductTime(best.product, statistics.median(t.forward_s for t in times),
                       statistics.median(t.backward_s for t in times), best.kernel)


def _time_steps(report: BenchReport, trainable: Any, graphs: Any, sampler: Any, opt: torch.optim.Optimizer,
                rng: np.random.Generator, device: torch.device, steps: int, say: Callable[[str], None]) -> Any:
    """One warm-up and ``steps`` timed training steps; fills the report's step, sampling and
    memory figures and returns the warm-up batch (the floor is declared for it)."""
    from mbrec.train import train_step

    batches = sampler.epoch(rng)
    step_times, sample_times = [], []
    first = None
    for i in range(steps + 1):
        t0 = _clock()
        batch = next(batches, None)
        if batch is None:  # fewer batches per epoch than steps: continue with the next epoch
            batches = sampler.epoch(rng)
            batch = next(batches)
        t1 = _clock()
        train_step(trainable, graphs, batch, opt, device)
        _sync(device)
        if i == 0:
            first = batch
            continue  # warm-up
        step_times.append(_clock() - t0)
        sample_times.append(t1 - t0)
        say(f"step {i}: {step_times[-1]:.3f} s")
    report.step_s = statistics.median(step_times)
    report.sample_s = statistics.median(sample_times)
    report.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.type == "cuda":
        report.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return first
