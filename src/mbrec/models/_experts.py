"""Pieces shared by the HKUDS/PKEF-lineage models (``copf``, ``pkef``).

* graph builders: cumulative multigraphs with edge multiplicities, per-behavior graphs,
  "behavior k but not j" matrices; left normalisation ``D^{-1} A`` (empty rows stay 0);
* :class:`GatedTower`: the softmax gate over experts (``W_g [e_u; e_v] + b_g``) and the tower
  (sum over dimensions x 300, or the mean), for sampled pairs and for full-item ranking, where
  the user and item halves of ``W_g`` are applied separately and broadcast (no per-pair loop).

Their sampler is :class:`mbrec.sampling.PairSampler`; their BPR is :func:`mbrec.losses.bpr`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.dense import matmul
from mbrec.graph import bipartite, normalize_left

# ----------------------------------------------------------------------------- graphs


def cumulative_multigraphs(mats: Sequence[sp.spmatrix]) -> list[sp.csr_matrix]:
    """``C_k = bipartite(sum_{k' <= k} B_k')`` keeping integer multiplicities (unnormalised)."""
    out, acc = [], None
    for m in mats:
        m = sp.csr_matrix(m, dtype=np.float32)
        acc = m.copy() if acc is None else (acc + m).tocsr()
        out.append(bipartite(acc, binary=False))
    return out


def left_graphs(data: MultiBehaviorData, mode: str = "own") -> list[sp.csr_matrix]:
    """Left-normalised bipartite graphs, one per behavior.

    ``own``: behavior k's graph; ``cumulative``: the multigraph of behaviors 1..k;
    ``all``: the multigraph of every behavior (the same matrix for each k).
    """
    mats = [data.train[b] for b in data.behaviors]
    if mode == "own":
        return [normalize_left(bipartite(m)) for m in mats]
    cum = cumulative_multigraphs(mats)
    if mode == "cumulative":
        return [normalize_left(c) for c in cum]
    if mode == "all":
        full = normalize_left(cum[-1])
        return [full] * len(mats)
    raise ValueError(f"unknown graph mode {mode!r}; use 'own', 'cumulative' or 'all'")


def unique_matrices(data: MultiBehaviorData, skip: Sequence[str] = ()) -> dict[tuple[int, int], sp.csr_matrix]:
    """``{(k, j): B_k AND NOT B_j}`` for k != j, only the non-empty ones (PKEF's unique pairs);
    behaviors in ``skip`` take part in no pair (PKEF excludes Tmall's cart)."""
    mats = [data.train[b] for b in data.behaviors]
    out = {}
    for k, bk in enumerate(data.behaviors):
        for j, bj in enumerate(data.behaviors):
            if k == j or bk in skip or bj in skip:
                continue
            m = (mats[k] - mats[k].multiply(mats[j])).tocsr()
            m.eliminate_zeros()
            if m.nnz:
                out[(k, j)] = m
    return out


# ----------------------------------------------------------------------------- gate + tower


def project(x: torch.Tensor, onto: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise projection of ``x`` onto ``onto``: ``(<x, m> / (||m||^2 + eps)) m``."""
    return (x * onto).sum(-1, keepdim=True) / (onto.pow(2).sum(-1, keepdim=True) + eps) * onto


class GatedTower(nn.Module):
    """Gate ``g = softmax(W_g [e_u; e_v] + b_g)`` over ``n_experts`` experts, and the tower.

    ``n_gates = 1`` shares one gate by all tasks (official code); ``n_gates = K`` gives each
    task its own. Experts are Hadamard products ``a_u * b_v`` given as factor pairs ``(a, b)``.
    Tower ``sum300``: ``scale * sum_m g_m sum_dims(a_u * b_v)``; any other value (``mean``,
    the model configs' only other choice): the mean over dims.
    """

    def __init__(self, dim: int, n_experts: int, n_gates: int = 1, tower: str = "sum300", scale: float = 300.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_gates, 2 * dim, n_experts))
        self.bias = nn.Parameter(torch.zeros(n_gates, n_experts))
        for g in range(n_gates):  # Xavier-uniform on each [2d, M] matrix, as the TF FC layer
            nn.init.xavier_uniform_(self.weight.data[g].T)
        self.dim = dim
        self.tower_scale = scale if tower == "sum300" else 1.0 / dim

    def _wb(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = task if self.weight.shape[0] > 1 else 0
        return self.weight[g], self.bias[g]

    def gate(self, task: int, eu: torch.Tensor, ev: torch.Tensor) -> torch.Tensor:
        """``[n, M]`` gate weights for aligned rows ``eu``, ``ev``."""
        w, b = self._wb(task)
        return torch.softmax(eu @ w[: self.dim] + ev @ w[self.dim :] + b, dim=-1)

    def pairs(
        self, task: int, eu: torch.Tensor, ev: torch.Tensor, experts: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *, return_gate: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores of aligned pairs; ``experts[m] = (a_m[users], b_m[items])``, each ``[n, d]``.
        With ``return_gate`` also the ``[n, M]`` gate weights (for diagnostics)."""
        g = self.gate(task, eu, ev)
        inner = torch.stack([(a * b).sum(-1) for a, b in experts], dim=-1)  # [n, M]
        scores = self.tower_scale * (g * inner).sum(-1)
        return (scores, g) if return_gate else scores

    def full(
        self,
        task: int,
        eu: torch.Tensor,
        ev: torch.Tensor,
        experts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """``[n_users, n_items]`` scores: ``eu``/``a_m`` are the users' rows, ``ev``/``b_m`` all items.

        The gate logit is separable, ``l_m(u, v) = x_m(u) + y_m(v)`` with ``x = eu W_u`` and
        ``y = ev W_v + b``, so ``exp(l_m) = exp(x_m) exp(y_m)`` and
        ``sum_m g_m <a_m, b_m> = [sum_m (a_m e^{x_m}) (b_m e^{y_m})^T] / [e^{x} (e^{y})^T]``:
        two GEMMs, no ``[users, items, M]`` tensor. Shifting ``x`` by its row max and ``y`` by
        its row max multiplies every expert by the same factor, which cancels. Rows whose
        denominator underflows fall back to the broadcast softmax."""
        w, b = self._wb(task)
        x = eu @ w[: self.dim]  # [c, M]
        y = ev @ w[self.dim :] + b  # [I, M]
        ex = torch.exp(x - x.max(1, keepdim=True).values)
        ey = torch.exp(y - y.max(1, keepdim=True).values)
        num = matmul(torch.cat([a * ex[:, m : m + 1] for m, (a, _) in enumerate(experts)], 1),
                     torch.cat([bb * ey[:, m : m + 1] for m, (_, bb) in enumerate(experts)], 1).T)
        den = ex @ ey.T
        out = self.tower_scale * num / den
        bad = ~torch.isfinite(out).all(1) | (den <= 0).any(1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).ravel()
            g = torch.softmax(x[rows, None, :] + y[None, :, :], dim=-1)
            inner = torch.stack([a[rows] @ bb.T for a, bb in experts], dim=-1)
            out[rows] = self.tower_scale * (g * inner).sum(-1)
        return out


def xavier_table(n: int, d: int) -> nn.Parameter:
    w = torch.empty(n, d)
    nn.init.xavier_uniform_(w)
    return nn.Parameter(w)
