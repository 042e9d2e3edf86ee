"""Pieces shared by the HKUDS/PKEF-lineage models (``copf``, ``pkef``).

* graph builders: cumulative multigraphs with edge multiplicities, per-behavior graphs,
  "behavior k but not j" matrices; left normalisation ``D^{-1} A`` (empty rows stay 0);
* :class:`PairSampler`: the official sampler (users in batches of 256; per behavior up to 40
  positives per user drawn **with replacement** and as many negatives from the items the user
  has not interacted with **under that behavior**); optional users-per-epoch subsampling and
  PKEF's "unique" pairs;
* :class:`GatedTower`: the softmax gate over experts (``W_g [e_u; e_v] + b_g``) and the tower
  (sum over dimensions x 300, or the mean), for sampled pairs and for full-item ranking, where
  the user and item halves of ``W_g`` are applied separately and broadcast (no per-pair loop).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.graph import bipartite, normalize_left
from mbrec.sampling import PositiveSet, sample_negatives

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


# ----------------------------------------------------------------------------- sampling


def sample_pairs(
    R: sp.csr_matrix,
    users: np.ndarray,
    rng: np.random.Generator,
    exclude: PositiveSet,
    max_pairs: int,
    cap: sp.csr_matrix | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each user ``m = min(max_pairs, deg_R(u) [, deg_cap(u)])`` positives of ``R`` with
    replacement and ``m`` negatives outside ``exclude``; returns ``(users, pos, neg)``."""
    deg = (R.indptr[users + 1] - R.indptr[users]).astype(np.int64)
    m = np.minimum(deg, max_pairs)
    if cap is not None:
        m = np.minimum(m, cap.indptr[users + 1] - cap.indptr[users])
    rep = np.repeat(users, m)
    start = np.repeat(R.indptr[users].astype(np.int64), m)
    d = np.repeat(deg, m)
    pos = R.indices[start + np.floor(rng.random(len(rep)) * d).astype(np.int64)].astype(np.int64)
    neg = sample_negatives(rep, exclude, rng).astype(np.int64)
    return rep.astype(np.int64), pos, neg


class PairSampler:
    """The COPF/PKEF training sampler.

    Each epoch shuffles the users (keeping the first ``users_per_epoch`` when set, PKEF's
    10,000) and yields batches of ``batch_users``. Per behavior ``k`` the batch holds
    ``users_k``, ``pos_k``, ``neg_k`` (users with no positive under k contribute nothing). With
    ``unique`` set, also ``uusers_k_j``, ``upos_k_j``, ``uneg_k_j`` drawn from ``B_k - B_j``:
    ``min(40, deg_k, deg_unique)`` pairs per user, negatives outside the unique matrix.
    """

    def __init__(
        self,
        mats: Sequence[sp.csr_matrix],
        *,
        batch_users: int = 256,
        max_pairs: int = 40,
        users_per_epoch: int | None = None,
        unique: dict[tuple[int, int], sp.csr_matrix] | None = None,
    ) -> None:
        self.mats = [sp.csr_matrix(m) for m in mats]
        self.sets = [PositiveSet(m) for m in self.mats]
        self.n_users = self.mats[0].shape[0]
        self.batch_users = batch_users
        self.max_pairs = max_pairs
        self.users_per_epoch = users_per_epoch
        self.unique = {kj: sp.csr_matrix(m) for kj, m in (unique or {}).items()}
        self.unique_sets = {kj: PositiveSet(m) for kj, m in self.unique.items()}

    def __len__(self) -> int:
        n = self.n_users if self.users_per_epoch is None else min(self.n_users, self.users_per_epoch)
        return -(-n // self.batch_users)

    def batch(self, users: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, (R, ex) in enumerate(zip(self.mats, self.sets)):
            out[f"users_{k}"], out[f"pos_{k}"], out[f"neg_{k}"] = sample_pairs(R, users, rng, ex, self.max_pairs)
        for (k, j), U in self.unique.items():
            u, p, n = sample_pairs(U, users, rng, self.unique_sets[(k, j)], self.max_pairs, cap=self.mats[k])
            out[f"uusers_{k}_{j}"], out[f"upos_{k}_{j}"], out[f"uneg_{k}_{j}"] = u, p, n
        return out

    def epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        order = rng.permutation(self.n_users)
        if self.users_per_epoch is not None:
            order = order[: self.users_per_epoch]
        for s in range(0, len(order), self.batch_users):
            yield self.batch(order[s : s + self.batch_users].astype(np.int64), rng)


# ----------------------------------------------------------------------------- gate + tower


def project(x: torch.Tensor, onto: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise projection of ``x`` onto ``onto``: ``(<x, m> / (||m||^2 + eps)) m``."""
    return (x * onto).sum(-1, keepdim=True) / (onto.pow(2).sum(-1, keepdim=True) + eps) * onto


class GatedTower(nn.Module):
    """Gate ``g = softmax(W_g [e_u; e_v] + b_g)`` over ``n_experts`` experts, and the tower.

    ``n_gates = 1`` shares one gate by all tasks (official code); ``n_gates = K`` gives each
    task its own. Experts are Hadamard products ``a_u * b_v`` given as factor pairs ``(a, b)``.
    Tower ``sum300``: ``scale * sum_m g_m sum_dims(a_u * b_v)``; ``mean``: the mean over dims.
    """

    def __init__(self, dim: int, n_experts: int, n_gates: int = 1, tower: str = "sum300", scale: float = 300.0) -> None:
        super().__init__()
        if tower not in ("sum300", "mean"):
            raise ValueError(f"unknown tower {tower!r}; use 'sum300' or 'mean'")
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
        num = torch.cat([a * ex[:, m : m + 1] for m, (a, _) in enumerate(experts)], 1) @ torch.cat(
            [bb * ey[:, m : m + 1] for m, (_, bb) in enumerate(experts)], 1
        ).T
        den = ex @ ey.T
        out = self.tower_scale * num / den
        bad = ~torch.isfinite(out).all(1) | (den <= 0).any(1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).ravel()
            g = torch.softmax(x[rows, None, :] + y[None, :, :], dim=-1)
            inner = torch.stack([a[rows] @ bb.T for a, bb in experts], dim=-1)
            out[rows] = self.tower_scale * (g * inner).sum(-1)
        return out


def bpr_mean(scores: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-(s+ - s-))`` over ``scores = [pos; neg]``; 0 when there are no pairs."""
    n = scores.shape[0] // 2
    if n == 0:
        return scores.sum() * 0.0
    return F.softplus(-(scores[:n] - scores[n:])).mean()


def xavier_table(n: int, d: int) -> nn.Parameter:
    w = torch.empty(n, d)
    nn.init.xavier_uniform_(w)
    return nn.Parameter(w)
