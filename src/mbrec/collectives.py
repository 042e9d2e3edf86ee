"""Collective operations inside a model's loss, for terms that need the whole global batch.

In data-parallel training (:mod:`mbrec.distributed`) every rank computes the loss on its part
of the global batch; the trainer multiplies rank r's gradients by its share of the batch's rows,
``w_r = n_r / n``, and sums them over the ranks. That gives one process's gradient for a loss
that is a mean over the batch's rows, but not for a term built from the whole batch at once (a
contrast among the batch's users, the variance of per-behavior batch means). With these helpers
a model computes such a term *globally*: every rank computes the same value ``G`` from every
rank's rows.

* :func:`gather_rows`: every rank's rows, concatenated in rank order (differentiable);
* :func:`gather_unique`: the same for rows keyed by ids that may repeat across ranks: the sorted
  distinct ids and, per id, the row of the lowest rank holding it (differentiable);
* :func:`all_sum`: the sum over the ranks (differentiable); :func:`global_mean`: masked means
  over the rows of the whole global batch, from all-reduced sums and counts.

**Gradient rule.** Every rank holds the same ``G``; the other ranks' rows enter it as
constants (their own ranks back-propagate them). The part of ``dG/dtheta`` that flows through
rank r's own rows, ``J_r^T dG/dx_r``, is what rank r must contribute, and the trainer will
multiply it by ``w_r``: the backward of each helper therefore passes rank r's own slice of the
gradient times ``1 / w_r`` (:attr:`Share.grad_scale`), and the ranks' weighted sum is
``sum_r J_r^T dG/dx_r = dG/dtheta``. A dependence of ``G`` on parameters outside the gathered
rows (say, learned weights of its parts) is the same on every rank, so the weighted sum gives it
weight ``sum_r w_r = 1``. The backward communicates nothing.

Outside data-parallel training (no :func:`sharing` block active: one process, or a group of one
rank) the helpers are never needed: models test :func:`active` and keep their one-process code,
so a single process makes no distributed call and computes bit for bit what it did before.
:meth:`mbrec.distributed.Parallel.sharing` opens the block around each rank's loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["Share", "active", "all_sum", "gather_rows", "gather_unique", "global_mean", "sharing"]


@dataclass(frozen=True)
class Share:
    """This rank's place in the current step: rank, number of ranks, and the weight ``w_r`` the
    trainer multiplies its gradients by."""

    rank: int
    world: int
    weight: float

    @property
    def grad_scale(self) -> float:
        """``1 / w_r``; 0 for a rank without rows (its own slice of any gathered tensor is empty)."""
        return 1.0 / self.weight if self.weight > 0 else 0.0


_ACTIVE: Share | None = None


def active() -> Share | None:
    """The share of the step being computed in data-parallel training, or ``None``."""
    return _ACTIVE


@contextmanager
def sharing(rank: int, world: int, weight: float) -> Iterator[Share]:
    """Mark the loss computed inside as rank ``rank``'s part (weight ``weight``) of a global batch
    split over ``world`` ranks; every rank must enter it and call the same helpers in the same
    order. Restores the previous state on exit."""
    global _ACTIVE
    if world < 1 or not 0 <= rank < world or not 0.0 <= weight <= 1.0:
        raise ValueError(f"rank {rank} of {world} with weight {weight} is not a share of a batch")
    previous, _ACTIVE = _ACTIVE, Share(rank, world, float(weight))
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def _current() -> Share:
    if _ACTIVE is None:
        raise RuntimeError("mbrec.collectives: called outside a sharing() block (one process needs no collective)")
    return _ACTIVE


# ----------------------------------------------------------------------------- plain collectives


def _counts(n: int, world: int, device: torch.device) -> list[int]:
    """Every rank's ``n`` (one all-gather of one integer per rank)."""
    import torch.distributed as dist

    mine = torch.tensor([n], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [int(c.item()) for c in every]


def _gather(x: torch.Tensor, dim: int, counts: list[int]) -> torch.Tensor:
    """Every rank's ``x`` (``counts[r]`` entries along ``dim`` on rank r, the other dimensions
    equal) concatenated along ``dim`` in rank order; padded to the largest part for the wire."""
    import torch.distributed as dist

    width = max(counts)
    shape = list(x.shape)
    shape[dim] = width
    padded = x.new_zeros(shape)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, counts)], dim)


# ----------------------------------------------------------------------------- differentiable


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows (:func:`_gather`). Backward: this rank's slice of the gradient
    times ``scale`` (``1 / w_r``); nothing is sent."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, counts: list[int], rank: int, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.lo, ctx.n, ctx.scale = dim, sum(counts[:rank]), counts[rank], scale
        return _gather(x.detach(), dim, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.narrow(ctx.dim, ctx.lo, ctx.n) * ctx.scale, None, None, None, None


class _AllSum(torch.autograd.Function):
    """Forward: the sum of ``x`` over the ranks. Backward: the gradient times ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.scale = scale
        y = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def gather_rows(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (parts may differ in size
    along ``dim``, not elsewhere). Differentiable for floating ``x`` (module docstring)."""
    share = _current()
    dim = dim % x.dim()
    counts = _counts(x.shape[dim], share.world, x.device)
    if x.requires_grad:
        return _GatherRows.apply(x, dim, counts, share.rank, share.grad_scale)
    return _gather(x, dim, counts)


def gather_unique(ids: torch.Tensor, x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, rows)`` over every rank: the sorted distinct ``ids`` of all ranks, and for each
    the slice of ``x`` along ``dim`` that the lowest rank holding it gathered.

    ``ids`` (1-D, distinct within a rank, e.g. from :func:`torch.unique`) key the slices of
    ``x`` along ``dim``. An id on several ranks must come with the same row on each (rows of the
    same replicated model): one copy is kept, and only its rank back-propagates it, so its
    gradient is counted once, as in one process, where the batch's ids are made distinct over
    the whole batch. With every rank's ids sorted, the result is what ``torch.unique`` over the
    whole batch gives in one process, in the same order."""
    if ids.dim() != 1 or ids.numel() != x.shape[dim]:
        raise ValueError(f"gather_unique: ids must be 1-D with one id per slice of x along dim {dim} "
                         f"(ids {tuple(ids.shape)}, x {tuple(x.shape)})")
    share = _current()
    dim = dim % x.dim()
    counts = _counts(ids.numel(), share.world, ids.device)
    every_id = _gather(ids, 0, counts)
    every_x = (_GatherRows.apply(x, dim, counts, share.rank, share.grad_scale) if x.requires_grad
               else _gather(x, dim, counts))
    distinct, inverse = torch.unique(every_id, return_inverse=True)
    position = torch.arange(every_id.numel(), device=every_id.device)
    first = torch.full_like(distinct, every_id.numel()).scatter_reduce_(0, inverse, position, "amin")
    return distinct, every_x.index_select(dim, first)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks (the same tensor on every rank). Differentiable for
    floating ``x`` (module docstring)."""
    share = _current()
    if x.requires_grad:
        return _AllSum.apply(x, share.grad_scale)
    import torch.distributed as dist

    y = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(y)
    return y


def global_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``x`` along its last dimension over the rows of every rank: with ``mask``
    (same shape) over the valid rows only, at least 1 (:func:`mbrec.losses.masked_mean`'s
    ``over="valid"``). One all-reduce of the sums (differentiable) and one of the counts; the
    same value on every rank."""
    if mask is None:
        sums = x.sum(-1)
        counts = torch.full_like(sums.detach(), x.shape[-1])
    else:
        m = mask.to(x.dtype)
        sums = (x * m).sum(-1)
        counts = m.sum(-1)
    return all_sum(sums) / all_sum(counts.detach()).clamp_min(1.0)
