"""Graph construction and propagation helpers.

Adjacencies are built once per run with vectorized SciPy code and moved to the device as
sparse CSR tensors. :func:`spmm` multiplies a sparse matrix by a dense one with a backward
pass that uses a precomputed transpose (no transposition per step).

Node layout of a bipartite graph: users ``0..U-1`` then items ``U..U+I-1``.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch


def bipartite(R: sp.spmatrix, *, binary: bool = True) -> sp.csr_matrix:
    """Symmetric ``[[0, R], [R^T, 0]]`` of shape ``(U+I, U+I)``; ``binary=False`` keeps weights
    (edge multiplicities), ``binary=True`` sets every stored entry to 1."""
    R = sp.csr_matrix(R, dtype=np.float32)
    if binary:
        R = R.copy()
        R.data[:] = 1.0
    n_u, n_i = R.shape
    A = sp.bmat([[None, R], [R.T, None]], format="csr", dtype=np.float32)
    A.resize((n_u + n_i, n_u + n_i))
    return A


def normalize_sym(A: sp.spmatrix, degree_eps: float = 0.0) -> sp.csr_matrix:
    """``D^{-1/2} A D^{-1/2}`` with ``D`` the row sums (plus ``degree_eps``); empty rows stay 0."""
    A = sp.csr_matrix(A, dtype=np.float32)
    deg = np.asarray(A.sum(axis=1)).ravel().astype(np.float64) + degree_eps
    with np.errstate(divide="ignore"):
        inv = np.where(deg > 0, deg**-0.5, 0.0)
    D = sp.diags(inv.astype(np.float32))
    return (D @ A @ D).tocsr()


def normalize_left(A: sp.spmatrix) -> sp.csr_matrix:
    """``D^{-1} A`` (row-stochastic); empty rows stay 0."""
    A = sp.csr_matrix(A, dtype=np.float32)
    deg = np.asarray(A.sum(axis=1)).ravel().astype(np.float64)
    with np.errstate(divide="ignore"):
        inv = np.where(deg > 0, 1.0 / deg, 0.0)
    return (sp.diags(inv.astype(np.float32)) @ A).tocsr()


@dataclass(frozen=True)
class SparseGraph:
    """A sparse matrix on the device together with its transpose (for the backward pass).

    For symmetric matrices the transpose is the same tensor, so no extra memory is used.
    """

    mat: torch.Tensor
    mat_t: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mat.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.mat.device

    def to(self, device: torch.device | str) -> "SparseGraph":
        same = self.mat_t is self.mat
        m = self.mat.to(device)
        return SparseGraph(m, m if same else self.mat_t.to(device))

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return spmm(self, x)


def _csr_tensor(m: sp.csr_matrix, device: torch.device | str) -> torch.Tensor:
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sort_indices()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            device=device,
            check_invariants=False,
        )


def to_device(m: sp.spmatrix, device: torch.device | str = "cpu", *, symmetric: bool | None = None) -> SparseGraph:
    """Move a SciPy matrix to the device as a :class:`SparseGraph`.

    ``symmetric=None`` checks symmetry (exactly) and shares the tensor when it holds.
    """
    m = sp.csr_matrix(m, dtype=np.float32)
    if symmetric is None:
        symmetric = m.shape[0] == m.shape[1] and (m != m.T).nnz == 0
    mat = _csr_tensor(m, device)
    mat_t = mat if symmetric else _csr_tensor(m.T.tocsr(), device)
    return SparseGraph(mat, mat_t)


class _SpMM(torch.autograd.Function):
    """``A @ x`` with gradient ``A^T @ g`` from the precomputed transpose; each product on the
    kernel :func:`full_kernel` picks for its matrix."""

    @staticmethod
    def forward(ctx, mat: torch.Tensor, mat_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mat_t = mat_t
        return full_product(mat, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return None, None, full_product(ctx.mat_t, grad.contiguous())


def _host_mm(mat: torch.Tensor | sp.csr_matrix, x: torch.Tensor) -> torch.Tensor:
    """``mat @ x`` with SciPy's CSR kernel (``mat`` a CPU torch CSR tensor or a SciPy matrix)."""
    A = scipy_view(mat) if isinstance(mat, torch.Tensor) else mat
    return torch.from_numpy(np.ascontiguousarray(A @ x.detach().contiguous().numpy()))


#: kernels of full products on the CPU: ``torch`` (its CSR kernel), ``scipy`` (SciPy's, on cached
#: int32 views) or ``auto`` (default: per matrix and width, whichever of the two measured faster
#: on its first product; see :func:`full_kernel`). Set with ``MBREC_CPU_KERNEL``.
CPU_KERNELS = ("auto", "torch", "scipy")
CPU_FULL_KERNEL = os.environ.get("MBREC_CPU_KERNEL", "auto")
#: timed runs of each kernel per matrix and width before ``auto`` chooses
AUTO_TRIALS = 2
#: (id(matrix), width) -> (weak reference to the matrix, chosen kernel, {kernel: best seconds})
_CHOICES: dict[tuple[int, int], tuple["weakref.ref[torch.Tensor]", str, dict[str, float]]] = {}
_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "torch": lambda mat, x: torch.sparse.mm(mat, x),
    "scipy": lambda mat, x: _host_mm(mat, x),
}


def full_kernel(mat: torch.Tensor, x: torch.Tensor) -> str:
    """The kernel of the full product ``mat @ x`` (a documented rule, made in one place):

    * off the CPU: always ``torch`` (SciPy never serves accelerator tensors);
    * ``MBREC_CPU_KERNEL=torch|scipy``: that one;
    * ``auto`` (default): the first product of each matrix at each width times both kernels
      ``AUTO_TRIALS`` times, alternating, on that product's own operand, and keeps the faster
      for the matrix's lifetime. Both kernels sum each row's terms in CSR order, so the choice
      never changes a result (``tests/test_bench.py`` checks the two are bit-identical); which
      one is faster depends on the machine, the graph and the width (``BENCHMARKS.md``)."""
    if not host_kernels(mat.device):
        return "torch"
    if CPU_FULL_KERNEL not in CPU_KERNELS:
        raise ValueError(f"MBREC_CPU_KERNEL={CPU_FULL_KERNEL!r}; use one of {', '.join(CPU_KERNELS)}")
    if CPU_FULL_KERNEL != "auto":
        return CPU_FULL_KERNEL
    key = (id(mat), int(x.shape[1]))
    entry = _CHOICES.get(key)
    if entry is not None and entry[0]() is mat:
        return entry[1]
    best = {k: float("inf") for k in _KERNELS}
    with torch.no_grad():
        for _ in range(AUTO_TRIALS):
            for name, fn in _KERNELS.items():
                t0 = time.perf_counter()
                fn(mat, x)
                best[name] = min(best[name], time.perf_counter() - t0)
    choice = min(best, key=best.__getitem__)
    _CHOICES[key] = (weakref.ref(mat, lambda _r, k=key: _CHOICES.pop(k, None)), choice, best)
    return choice


def kernel_choices() -> list[dict[str, Any]]:
    """The ``auto`` choices made so far in this process (shape, nnz, width, kernel, timings)."""
    out = []
    for (_, width), (ref, choice, best) in _CHOICES.items():
        mat = ref()
        if mat is not None:
            out.append({"shape": tuple(mat.shape), "nnz": int(mat.values().numel()), "width": width,
                        "kernel": choice, "seconds": dict(best)})
    return out


def full_product(mat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mat @ x`` (no autograd) on the kernel :func:`full_kernel` picks."""
    return _KERNELS[full_kernel(mat, x)](mat, x)


def spmm(g: SparseGraph, x: torch.Tensor) -> torch.Tensor:
    """``g.mat @ x`` with gradient for ``x`` only (the graph is data, not a parameter)."""
    if x.requires_grad:
        return _SpMM.apply(g.mat, g.mat_t, x)
    return full_product(g.mat, x)


class _RowsSpMM(torch.autograd.Function):
    """``A[S] @ x`` with SciPy's CSR kernel (CPU): the forward reads only the rows ``S``; the
    backward is ``A[S]^T @ g``, again only ``|S|`` rows of work."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A_rows: sp.csr_matrix) -> torch.Tensor:  # type: ignore[override]
        ctx.A_rows = A_rows
        return _host_mm(A_rows, x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        # SciPy's CSC-times-dense kernel is about 2.5x slower than converting to CSR first
        return _host_mm(ctx.A_rows.T.tocsr(), g), None


def host_kernels(device: torch.device | str) -> bool:
    """Whether SciPy kernels may serve tensors on ``device``: only on the CPU. Every model asks
    here, so the accelerator route never depends on SciPy (``tests/test_device_route.py``)."""
    return torch.device(device).type == "cpu"


#: id(tensor) -> (weak reference to the tensor, its SciPy view); entries leave with the tensor
_SCIPY_VIEWS: dict[int, tuple["weakref.ref[torch.Tensor]", sp.csr_matrix]] = {}


def scipy_view(mat: torch.Tensor) -> sp.csr_matrix:
    """A SciPy CSR matrix with the values of a CPU torch CSR tensor, built once per tensor (SciPy
    converts int64 indices on every product otherwise; the cache holds int32 copies when they fit)."""
    entry = _SCIPY_VIEWS.get(id(mat))
    view = entry[1] if entry is not None and entry[0]() is mat else None
    if view is None:
        indices, indptr = mat.col_indices().numpy(), mat.crow_indices().numpy()
        if indptr[-1] < 2**31 and max(mat.shape) < 2**31:
            indices, indptr = indices.astype(np.int32), indptr.astype(np.int32)
        view = sp.csr_matrix((mat.values().numpy(), indices, indptr), shape=tuple(mat.shape))
        key = id(mat)
        _SCIPY_VIEWS[key] = (weakref.ref(mat, lambda _r, k=key: _SCIPY_VIEWS.pop(k, None)), view)
    return view


def propagate(g: SparseGraph, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One propagation step ``A @ x``, or ``A[rows] @ x`` (``[len(rows), d]``) when the caller
    reads only those output rows: the single sparse layer every model uses.

    Kernels (a documented rule): full products as :func:`full_kernel` decides (torch's CSR
    kernel off the CPU; on the CPU the faster of torch's and SciPy's, measured per matrix); row subsets on the CPU use SciPy's CSR row slices and kernels (torch has no
    CSR row gather on the CPU); on other devices the full product is computed and the rows taken
    from it."""
    if rows is None:
        return spmm(g, x)
    if not host_kernels(g.mat.device):
        return spmm(g, x)[rows]
    A_rows = scipy_view(g.mat)[rows.cpu().numpy()]
    return _RowsSpMM.apply(x, A_rows) if x.requires_grad else _host_mm(A_rows, x)


def lightgcn_stack(
    g: SparseGraph,
    x: torch.Tensor,
    n_layers: int,
    *,
    rows: torch.Tensor | None = None,
    include_ego: bool = True,
    agg: str = "mean",
) -> torch.Tensor:
    """LightGCN propagation ``h_{l+1} = g h_l`` (``h_0 = x``), aggregating layers ``0..L``
    (``1..L`` without ``include_ego``) by ``mean`` or ``sum``.

    ``rows=None``: ``[N, d]``. With ``rows`` (node indices): only those output rows,
    ``[len(rows), d]``; layers ``1..L-1`` are still computed over all nodes (the last layer reads
    them), the last one only at ``rows`` (:func:`propagate`). The sum runs in layer
    order either way, so both give the same numbers (up to the sparse kernel's rounding)."""
    acc: torch.Tensor | None = x if include_ego else None
    h = x
    for n in range(n_layers):
        if rows is not None and n == n_layers - 1:
            h_last = propagate(g, h, rows)
            acc = h_last if acc is None else acc[rows] + h_last
            break
        h = propagate(g, h)
        acc = h if acc is None else acc + h
    else:  # no layer at rows (n_layers == 0)
        if acc is None:
            acc = torch.zeros_like(x)
        if rows is not None:
            acc = acc[rows]
    if agg == "mean":
        acc = acc / (n_layers + int(include_ego))
    elif agg != "sum":
        raise ValueError(f"unknown layer aggregation {agg!r}; use 'mean' or 'sum'")
    return acc


def node_rows(*ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(rows, positions)``: the sorted distinct node indices of all ``ids`` together, and for
    each input where its entries sit in ``rows`` (``rows[positions[k]] == ids[k]``)."""
    ids = tuple(t.long() for t in ids)
    rows, inverse = torch.unique(torch.cat(ids), return_inverse=True)
    return rows, list(inverse.split([len(t) for t in ids]))


def split_nodes(x: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[U+I, d]`` node matrix into user and item parts."""
    return x[:n_users], x[n_users:]
