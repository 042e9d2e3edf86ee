"""The loss forms the models share, each written once and parameterised by what differs.

* :func:`bpr`: Bayesian personalized ranking, ``softplus`` or ``log_eps`` form, per row or as a
  mean (optionally over the valid rows of a mask, or over every row with masked rows adding 0);
* :func:`info_nce`: InfoNCE on (cosine) similarities over a temperature, with in-batch, table or
  same-view negatives, one- or two-directional;
* :func:`variance` (REx risk variance), :func:`l2` (sum of squares), :func:`masked_mean`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mbrec.dense import exp_, gemm_kernel, matmul

#: the epsilon of the ``log_eps`` BPR form, ``-log(1e-10 + sigmoid(x))`` (CRGCN/RMBRec code)
BPR_EPS = 1e-10


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1, *, over: str = "valid") -> torch.Tensor:
    """Mean of ``x`` along ``dim``. With a ``mask`` the masked entries add 0 and the sum is divided
    by the number of valid entries (``over="valid"``, at least 1) or by every entry
    (``over="all"``: masked rows still count, like the official code's padding rows)."""
    if mask is None:
        return x.mean(dim)
    m = mask.to(x.dtype)
    if over == "all":
        return (x * m).sum(dim) / x.shape[dim]
    if over == "valid":
        return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)
    raise ValueError(f"unknown mean {over!r}; use 'valid' or 'all'")


def bpr(
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    form: str = "softplus",
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
    over: str = "valid",
) -> torch.Tensor:
    """Bayesian personalized ranking on score tensors ``pos``, ``neg`` (aligned rows).

    ``form="softplus"``: ``softplus(neg - pos)`` = ``-log sigmoid(pos - neg)`` (LightGCN code);
    ``form="log_eps"``: ``-log(1e-10 + sigmoid(pos - neg))`` (CRGCN/RMBRec code; a padding row
    with ``pos == neg`` gives ``log 2`` with zero gradient).
    ``reduction="none"``: the per-row losses; ``"mean"``: :func:`masked_mean` of them along the
    last dimension (``mask`` and ``over`` as there). Without rows the mean is 0, not NaN.
    """
    diff = pos - neg
    if form == "softplus":
        rows = F.softplus(-diff)
    elif form == "log_eps":
        rows = -torch.log(BPR_EPS + torch.sigmoid(diff))
    else:
        raise ValueError(f"unknown BPR form {form!r}; use 'softplus' or 'log_eps'")
    if reduction == "none":
        return rows
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")
    if rows.shape[-1:] == (0,):
        return rows.sum() * 0.0
    return masked_mean(rows, mask, over=over)


class _Workspace:
    """Reusable flat float buffers for the ``[n, m]`` logits of :class:`_TableLogSumExp`.

    A fresh buffer of a few hundred MB costs a page fault per 4 KiB on first touch (glibc serves
    such sizes with ``mmap``), about as much time as the GEMM that fills it; reusing buffers
    across steps avoids that. A buffer is taken in the forward and given back at the end of the
    backward; one whose graph is dropped without a backward is simply freed."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.free: list[torch.Tensor] = []

    def take(self, n: int, m: int, like: torch.Tensor) -> torch.Tensor:
        fits = [k for k, b in enumerate(self.free)
                if b.numel() >= n * m and b.dtype == like.dtype and b.device == like.device]
        if fits:  # the smallest that fits (list.remove would compare tensors elementwise)
            buf = self.free.pop(min(fits, key=lambda k: self.free[k].numel()))
        else:
            buf = torch.empty(n * m, dtype=like.dtype, device=like.device)
        return buf[: n * m].view(n, m)

    def give(self, view: torch.Tensor) -> None:
        base = view._base if view._base is not None else view
        self.free.append(base)
        if len(self.free) > self.keep:
            self.free.pop(min(range(len(self.free)), key=lambda k: self.free[k].numel()))


_WORKSPACE = _Workspace()


def _shifted_exp(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``out = exp(q c^T - top)``, ``top [n, 1]`` and the row sums ``total [n, 1]`` of ``out``, in
    three passes over ``out``: the GEMM with the shift folded in (:mod:`mbrec.dense` picks the BLAS), ``exp``, the row sums.
    ``top_i = |q_i| max_j |c_j|`` bounds row i's logits (Cauchy-Schwarz), so nothing overflows; a
    row whose largest logit lies so far below its bound that every term underflows is recomputed
    with its true maximum (a fourth pass over those rows only, rare)."""
    top = (q.norm(dim=1) * c.norm(dim=1).max()).unsqueeze(1)
    if gemm_kernel(q, c.T) == "numpy":  # NumPy's BLAS has no addmm: the shift rides as a 65th column
        matmul(torch.cat([q, -top], 1), torch.cat([c, c.new_ones(c.shape[0], 1)], 1).T, out=out)
    else:
        torch.addmm(-top, q, c.T, out=out)
    exp_(out)
    total = out.sum(dim=1, keepdim=True)
    bad = ~(total > 0) | ~torch.isfinite(total)
    if bool(bad.any()):
        rows = torch.nonzero(bad.squeeze(1)).squeeze(1)
        logits = q[rows] @ c.T
        top[rows] = logits.max(dim=1, keepdim=True).values
        out[rows] = (logits - top[rows]).exp_()
        total[rows] = out[rows].sum(dim=1, keepdim=True)
    return out, top, total


class _TableLogSumExp(torch.autograd.Function):
    """``logsumexp(q c^T, dim=1)`` for a batch ``q [n, d]`` against a whole table ``c [m, d]``
    (contrastive losses with every user or item as a negative), in one ``[n, m]`` buffer reused
    across steps (:class:`_Workspace`): forward = one GEMM (row shift folded in) and two passes
    (``exp``, row sums); backward = two GEMMs and no pass over the buffer: with ``E`` the shifted
    exponentials and ``s = g / rowsum(E)``, ``dq = diag(s) (E c)`` and ``dc = E^T (diag(s) q)``,
    so the per-row scale is applied to the ``[n, d]`` operands, not the ``[n, m]`` matrix.
    Autograd through ``torch.logsumexp(q @ c.T)`` allocates and walks the ``[n, m]`` matrix several
    times more; the values agree up to float rounding. One backward per forward (no
    ``retain_graph``)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        e, top, total = _shifted_exp(q, c, _WORKSPACE.take(q.shape[0], c.shape[0], q))
        ctx.save_for_backward(q, c, total)
        ctx.e = e
        return (total.log() + top).squeeze(1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        q, c, total = ctx.saved_tensors
        e = getattr(ctx, "e", None)
        if e is None:
            raise RuntimeError("table_logsumexp supports one backward per forward (no retain_graph)")
        ctx.e = None
        scale = g.unsqueeze(1) / total  # [n, 1]: softmax normaliser times the incoming gradient
        gq = matmul(e, c).mul_(scale) if ctx.needs_input_grad[0] else None
        gc = matmul(e.T, q * scale) if ctx.needs_input_grad[1] else None
        _WORKSPACE.give(e)
        return gq, gc


def table_logsumexp(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(q @ c.T, dim=1)`` with a fused backward (:class:`_TableLogSumExp`)."""
    if q.requires_grad or c.requires_grad:
        return _TableLogSumExp.apply(q, c)
    return torch.logsumexp(q @ c.T, dim=1)


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor | None,
    tau: float,
    *,
    negatives: str = "in_batch",
    candidates: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE: per query row ``logsumexp(logits) - logit(positive)`` with ``logits = sim / tau``
    and ``sim`` the inner product of L2-normalised rows (``normalize=False``: rows are used as
    given, e.g. already unit length). ``query`` is ``[..., n, d]``; leading dimensions batch.

    ``negatives`` (the other logits of a row; the positive is always in the denominator):

    * ``in_batch``: row ``k`` of ``positive`` is the positive of query row ``k``, the other rows of
      ``positive`` the negatives (``logits = q p^T``, positives on the diagonal);
    * ``table``: every row of ``candidates`` ``[m, d]``; ``targets`` ``[n]`` indexes each query's
      positive in it (``positive`` is ignored);
    * ``query``: the other rows of ``query`` itself (same view), the positive from ``positive``.

    ``symmetric`` (in-batch, mean only): ``1/2 (mean over rows + mean over columns)``, i.e. each
    positive row is also a query against the query rows. ``reduction``: ``mean`` over the ``n``
    rows (``[...]``), or ``none`` (``[..., n]``).
    """
    norm = (lambda x: F.normalize(x, dim=-1)) if normalize else (lambda x: x)
    q = norm(query)
    if q.dim() == 2 and not symmetric and negatives in ("in_batch", "table"):
        # the common large case: every row of a table (in-batch: the positives themselves) is a
        # candidate; one fused product (table_logsumexp) instead of autograd through the logits
        if negatives == "table":
            if candidates is None or targets is None:
                raise ValueError("info_nce(negatives='table') needs candidates and targets")
            c = norm(candidates)
            pos = (q * c[targets]).sum(-1) / tau
        else:
            c = norm(positive)
            pos = (q * c).sum(-1) / tau
        rows = table_logsumexp(q / tau, c) - pos
        return _reduce(rows, reduction)
    if negatives == "in_batch":
        logits = (norm(positive) @ q.transpose(-1, -2)).transpose(-1, -2) / tau  # [..., n(query), n(positive)]
        pos = torch.diagonal(logits, dim1=-2, dim2=-1)
    elif negatives == "table":
        if candidates is None or targets is None:
            raise ValueError("info_nce(negatives='table') needs candidates and targets")
        c = norm(candidates)
        pos = (q * c[targets]).sum(-1) / tau
        logits = q @ c.transpose(-1, -2) / tau
    elif negatives == "query":
        sim = q @ q.transpose(-1, -2) / tau
        pos = (q * norm(positive)).sum(-1) / tau
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        logits = torch.where(eye, pos.unsqueeze(-1).expand_as(sim), sim)
    else:
        raise ValueError(f"unknown negatives {negatives!r}; use 'in_batch', 'table' or 'query'")
    rows = torch.logsumexp(logits, -1) - pos
    if symmetric:
        if negatives != "in_batch" or reduction != "mean":
            raise ValueError("info_nce(symmetric=True) needs in-batch negatives and reduction='mean'")
        return 0.5 * (rows.mean(-1) + (torch.logsumexp(logits, -2) - pos).mean(-1))
    return _reduce(rows, reduction)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")
    return rows.mean(-1)


def variance(x: torch.Tensor, *, unbiased: bool = True, dim: int = 0) -> torch.Tensor:
    """Risk variance (REx) along ``dim`` (per-environment losses or gradients); 0 for one entry."""
    return x.var(dim, unbiased=unbiased) if x.shape[dim] > 1 else x.sum(dim) * 0.0


def l2(*tensors: torch.Tensor) -> torch.Tensor:
    """``sum ||t||^2`` over the given tensors."""
    return sum((t.pow(2).sum() for t in tensors), torch.zeros((), device=tensors[0].device))
