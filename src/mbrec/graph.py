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
    """A torch CSR tensor of ``m``, with int32 indices where they fit: torch's CPU kernel (MKL)
    takes int32 and would otherwise convert the column indices on every product (a 4.8M-entry
    copy, 3-7 ms, per product on COPF's Beibei graphs)."""
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sort_indices()
    index = np.int32 if m.nnz < 2**31 and max(m.shape) < 2**31 else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(index)),
            torch.from_numpy(m.indices.astype(index)),
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
AUTO_TRIALS = 3
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
      ``AUTO_TRIALS`` times, alternating, on that product's own operand (in CPU time with one
      torch thread, else wall time), and keeps the faster for the matrix's lifetime. Both kernels sum each row's terms in CSR order, so the choice
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
    # one thread: this process's CPU time, which other jobs on a busy machine do not inflate
    # (the wall clock of one product swings by 20-40% there); more threads: the wall clock
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.no_grad():
        for _ in range(AUTO_TRIALS):
            for name, fn in _KERNELS.items():
                t0 = clock()
                fn(mat, x)
                best[name] = min(best[name], clock() - t0)
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


class _Product(torch.autograd.Function):
    """``fwd(x)`` with the gradient ``bwd(g)``: a product and its transpose from
    :func:`_layer_products` (the row-subset kernels, defined there once)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: Callable[[torch.Tensor], torch.Tensor],  # type: ignore[override]
                bwd: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.bwd = bwd
        return fwd(x.detach())

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return ctx.bwd(g.contiguous()), None, None


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
    fwd, bwd = _layer_products(g, rows)
    return _Product.apply(x, fwd, bwd) if x.requires_grad else fwd(x)


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
    ``[len(rows), d]`` (:func:`lightgcn_rows`, which also returns ``x[rows]``). The sum runs in
    layer order either way, so both give the same numbers (up to the sparse kernel's rounding)."""
    if rows is not None:
        return lightgcn_rows(g, x, n_layers, rows, include_ego=include_ego, agg=agg)[0]
    _check_agg(agg)
    acc: torch.Tensor | None = x if include_ego else None
    h = x
    for _ in range(n_layers):
        h = propagate(g, h)
        acc = h if acc is None else acc + h
    if acc is None:
        acc = torch.zeros_like(x)
    return acc / (n_layers + int(include_ego)) if agg == "mean" else acc


def _check_agg(agg: str) -> None:
    if agg not in ("mean", "sum"):
        raise ValueError(f"unknown layer aggregation {agg!r}; use 'mean' or 'sum'")


class _LayerAndRows(torch.autograd.Function):
    """``(A @ h, h[rows])`` from the products ``fwd`` (``A @ h``) and ``bwd`` (``A^T @ g``).

    Why: the LightGCN sum at the batch's rows reads each layer only at ``rows``. Gathering them
    here lets the backward add the rows' gradient in place into the fresh ``A^T @ g``
    (``index_add_``, ``|rows|`` rows of work) instead of autograd's zeros ``[N, d]`` scatter
    plus an ``[N, d]`` sum per layer, and the forward never sums ``[N, d]`` layers."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, rows: torch.Tensor, fwd: Callable[[torch.Tensor], torch.Tensor],  # type: ignore[override]
                bwd: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.rows, ctx.bwd, ctx.shape = rows, bwd, h.shape
        ctx.set_materialize_grads(False)
        return fwd(h.detach()), h.index_select(0, rows)

    @staticmethod
    def backward(ctx, g_out: torch.Tensor | None, g_rows: torch.Tensor | None):  # type: ignore[override]
        grad = ctx.bwd(g_out.contiguous()) if g_out is not None else None
        if g_rows is not None:
            grad = g_rows.new_zeros(ctx.shape) if grad is None else grad
            grad.index_add_(0, ctx.rows, g_rows)
        return grad, None, None, None


def _layer_products(g: SparseGraph, rows: torch.Tensor | None, frozen: torch.Tensor | None = None,
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(fwd, bwd)``: ``A @ h`` and ``A^T @ g`` (``rows=None``), or ``A[rows] @ h`` and
    ``A[rows]^T @ g``, on the kernels :func:`propagate` uses (the same numbers). ``frozen``:
    columns appended to ``h`` in the forward's one product, left out of the backward."""
    cut = 0 if frozen is None else frozen.shape[1]

    def widen(h: torch.Tensor) -> torch.Tensor:
        return h if frozen is None else torch.cat([h, frozen], 1)

    def narrow(gr: torch.Tensor) -> torch.Tensor:
        return gr if cut == 0 else gr[:, : gr.shape[1] - cut].contiguous()

    if rows is None:
        return (lambda h: full_product(g.mat, widen(h))), (lambda gr: full_product(g.mat_t, narrow(gr)))
    if not host_kernels(g.mat.device):  # the full product, then the rows (as propagate does)
        def scatter_back(gr: torch.Tensor) -> torch.Tensor:
            gr = narrow(gr)
            return full_product(g.mat_t, gr.new_zeros(g.shape[0], gr.shape[1]).index_copy_(0, rows, gr))
        return (lambda h: full_product(g.mat, widen(h)).index_select(0, rows)), scatter_back
    A_rows = scipy_view(g.mat)[rows.cpu().numpy()]
    # SciPy's CSC-times-dense kernel is about 2.5x slower than converting to CSR first
    return (lambda h: _host_mm(A_rows, widen(h))), (lambda gr: _host_mm(A_rows.T.tocsr(), narrow(gr)))


def propagate_with_rows(g: SparseGraph, x: torch.Tensor, rows: torch.Tensor, *,
                        frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A[rows] @ [x, frozen], x[rows])`` (``frozen`` optional, columns after ``x``'s that need
    no gradient, e.g. a branch the loss detaches): one product over all columns; the backward
    runs ``A[rows]^T`` over ``x``'s columns only and adds the gathered rows' gradient in place
    (:class:`_LayerAndRows`), with no ``[N, d]`` scatter buffer. For a layer whose output and
    input are both read at the batch's rows (a residual ``A x + x`` at those rows)."""
    fwd, bwd = _layer_products(g, rows, None if frozen is None else frozen.detach())
    return _LayerAndRows.apply(x, rows.long(), fwd, bwd)


def lightgcn_rows(
    g: SparseGraph, x: torch.Tensor, n_layers: int, rows: torch.Tensor, *, include_ego: bool = True, agg: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lightgcn_stack(..., rows=rows), x[rows])``: layers ``1..L-1`` over all nodes (the next
    layer reads them), the last only at ``rows``; every layer enters the sum through its rows
    alone (:class:`_LayerAndRows`), added in layer order as :func:`lightgcn_stack` does.
    ``x[rows]`` comes back because callers read it too (L2 on the ego rows, residuals) and
    one gather serves both."""
    _check_agg(agg)
    rows = rows.long()
    if n_layers == 0:
        x_rows = x.index_select(0, rows)
        acc = x_rows if include_ego else torch.zeros_like(x_rows)
        return (acc / int(include_ego) if agg == "mean" else acc), x_rows  # 0/0 without ego, as over all nodes
    parts: list[torch.Tensor] = []
    h, x_rows = x, None
    for n in range(n_layers):
        fwd, bwd = _layer_products(g, rows if n == n_layers - 1 else None)
        h, h_rows = _LayerAndRows.apply(h, rows, fwd, bwd)
        if n == 0:
            x_rows = h_rows
        if n > 0 or include_ego:
            parts.append(h_rows)
    parts.append(h)
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    assert x_rows is not None
    return (acc / (n_layers + int(include_ego)) if agg == "mean" else acc), x_rows


class _StackBlock(torch.autograd.Function):
    """A LightGCN block over all nodes, ``out = agg(layers) [+ x]``, also returning ``out[R]`` for
    each ``R`` of ``out_rows`` and ``x[R]`` for each of ``in_rows``.

    Why: a cascade (BiGEL's CGL) needs every block's whole output (the next block reads it) but
    reads it elsewhere only at batch rows. Autograd would add a zeros ``[N, d]`` scatter and an
    ``[N, d]`` sum per gather and per layer; here the forward sums the layers in one buffer (in
    layer order, the same numbers) and the backward runs the layers' chain rule in place:
    ``s = g / n``, ``g_l = s + A^T g_{l+1}``, ``g_x = [s] + [g] + A^T g_1``, each ``+`` an
    in-place add into a fresh product, the gathered rows' gradients added with ``index_add_``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: SparseGraph, n_layers: int, include_ego: bool, mean: bool,  # type: ignore[override]
                residual: bool, out_rows: list[torch.Tensor], in_rows: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if n_layers < 1:
            raise ValueError("_StackBlock needs n_layers >= 1 (lightgcn_block handles 0)")
        ctx.g, ctx.L, ctx.ego, ctx.res, ctx.out_rows, ctx.in_rows = g, n_layers, include_ego, residual, out_rows, in_rows
        ctx.shape = x.shape
        ctx.n = (n_layers + int(include_ego)) if mean else None
        ctx.set_materialize_grads(False)
        xd = x.detach()
        h, acc = xd, None
        for _ in range(n_layers):  # layer 1's output becomes the sum buffer (it is read only once)
            h = full_product(g.mat, h)
            acc = (xd + h if include_ego else h) if acc is None else acc.add_(h)
        assert acc is not None
        if ctx.n is not None:
            acc = acc.div_(ctx.n)
        if residual:
            acc = acc.add_(xd)
        return (acc, *(acc.index_select(0, r) for r in out_rows), *(xd.index_select(0, r) for r in in_rows))

    @staticmethod
    def backward(ctx, g_out: torch.Tensor | None, *g_rows: torch.Tensor | None):  # type: ignore[override]
        k = len(ctx.out_rows)
        g_o, g_i = g_rows[:k], g_rows[k:]
        if g_out is None:
            g_out = next(t for t in g_rows if t is not None).new_zeros(ctx.shape)
        s = g_out / ctx.n if ctx.n is not None else g_out.clone()
        for r, gr in zip(ctx.out_rows, g_o):
            if gr is not None:
                s.index_add_(0, r, gr / ctx.n if ctx.n is not None else gr)
        grad = s
        for _ in range(ctx.L - 1):
            grad = full_product(ctx.g.mat_t, grad.contiguous()).add_(s)
        grad = full_product(ctx.g.mat_t, grad.contiguous())
        if ctx.ego:
            grad.add_(s)
        if ctx.res:
            grad.add_(g_out)
            for r, gr in zip(ctx.out_rows, g_o):
                if gr is not None:
                    grad.index_add_(0, r, gr)
        for r, gr in zip(ctx.in_rows, g_i):
            if gr is not None:
                grad.index_add_(0, r, gr)
        return grad, None, None, None, None, None, None, None


def lightgcn_block(
    g: SparseGraph, x: torch.Tensor, n_layers: int, *, include_ego: bool = True, agg: str = "mean",
    residual: bool = False, out_rows: tuple[torch.Tensor, ...] = (), in_rows: tuple[torch.Tensor, ...] = ()
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(out, [out[R] for R in out_rows], [x[R] for R in in_rows])`` with ``out =
    lightgcn_stack(g, x, n_layers, ...)`` over all nodes ``[+ x]`` (``residual``), the same
    numbers; one :class:`_StackBlock` (fused backward) when ``x`` needs a gradient and
    ``n_layers >= 1``, else plain autograd. Rows may repeat (the gradients add up)."""
    _check_agg(agg)
    out_rows, in_rows = tuple(r.long() for r in out_rows), tuple(r.long() for r in in_rows)
    if n_layers == 0 or not (x.requires_grad and torch.is_grad_enabled()):
        out = lightgcn_stack(g, x, n_layers, include_ego=include_ego, agg=agg)
        out = out + x if residual else out
        return out, [out.index_select(0, r) for r in out_rows], [x.index_select(0, r) for r in in_rows]
    res = _StackBlock.apply(x, g, n_layers, include_ego, agg == "mean", residual, list(out_rows), list(in_rows))
    k = 1 + len(out_rows)
    return res[0], list(res[1:k]), list(res[k:])


def node_rows(*ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(rows, positions)``: the sorted distinct node indices of all ``ids`` together, and for
    each input where its entries sit in ``rows`` (``rows[positions[k]] == ids[k]``)."""
    ids = tuple(t.long() for t in ids)
    rows, inverse = torch.unique(torch.cat(ids), return_inverse=True)
    return rows, list(inverse.split([len(t) for t in ids]))


def split_nodes(x: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[U+I, d]`` node matrix into user and item parts."""
    return x[:n_users], x[n_users:]
