"""Vectorized negative sampling, batch builders and the training samplers the models share.

Negatives are drawn uniformly and rejected against a user's positives, held as a sorted array
of hashed keys ``user * n_items + item`` (membership by binary search). Rejected draws are
redrawn for the rejected rows only, so the cost is a few vectorized passes per batch.

Samplers (``epoch(rng)`` yields dicts of numpy arrays):

* :class:`InteractionSampler`: every training pair once per epoch, one negative each (LightGCN
  PyTorch code; MB-CGCN's ``sampler: interactions``);
* :class:`RandomUserSampler`: random distinct users with one positive and one negative each
  (NGCF/LightGCN TF code; MB-CGCN's default);
* :class:`UserTripletSampler`: every user once per epoch, one triplet per behavior (CRGCN, RMBRec);
* :class:`PairSampler`: per user up to 40 positive/negative pairs per behavior (COPF, PKEF);
* :class:`PerBehaviorTripletSampler`: per-behavior triplets in equal or proportional numbers per
  batch (BiGEL).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp


class PositiveSet:
    """Hashed (user, item) membership for rejection sampling."""

    def __init__(self, R: sp.spmatrix) -> None:
        R = sp.csr_matrix(R)
        self.n_users, self.n_items = R.shape
        rows = np.repeat(np.arange(R.shape[0], dtype=np.int64), np.diff(R.indptr))
        self.keys = np.unique(rows * self.n_items + R.indices.astype(np.int64))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users.astype(np.int64) * self.n_items + items.astype(np.int64)
        pos = np.searchsorted(self.keys, q)
        pos = np.minimum(pos, max(len(self.keys) - 1, 0))
        if len(self.keys) == 0:
            return np.zeros(len(q), dtype=bool)
        return self.keys[pos] == q


def sample_negatives(
    users: np.ndarray,
    exclude: PositiveSet,
    rng: np.random.Generator,
    *,
    max_rounds: int = 100,
) -> np.ndarray:
    """One uniform negative item per entry of ``users``, not in ``exclude`` for that user.

    Users who interacted with every item keep an arbitrary (positive) draw after
    ``max_rounds`` rejection rounds rather than looping forever.
    """
    n_items = exclude.n_items
    items = rng.integers(0, n_items, size=len(users))
    bad = np.flatnonzero(exclude.contains(users, items))
    rounds = 0
    while len(bad) and rounds < max_rounds:
        items[bad] = rng.integers(0, n_items, size=len(bad))
        bad = bad[exclude.contains(users[bad], items[bad])]
        rounds += 1
    return items


def sample_positives(R: sp.csr_matrix, users: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One uniform positive per user from row ``R[u]``; returns ``(items, has_positive)``.

    Users without any positive get item 0 and ``has_positive = False``.
    """
    start = R.indptr[users]
    deg = R.indptr[users + 1] - start
    has = deg > 0
    offset = np.floor(rng.random(len(users)) * np.maximum(deg, 1)).astype(np.int64)
    items = np.where(has, R.indices[np.minimum(start + offset, max(len(R.indices) - 1, 0))], 0)
    return items.astype(np.int64), has


def user_batches(n_users: int, batch_size: int, rng: np.random.Generator, users: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """A shuffled pass over users (all, or the given subset) in batches."""
    pool = np.arange(n_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    order = rng.permutation(pool)
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def per_user_triplets(
    matrices: list[sp.csr_matrix],
    users: np.ndarray,
    exclude: PositiveSet,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """CRGCN/RMBRec-style batch: for each user and each behavior one ``(u, i+, j-)`` triplet.

    Returns ``(triplets [n_users, n_behaviors, 3], valid [n_users, n_behaviors])``. ``i+`` is
    uniform over the user's items under that behavior, ``j-`` uniform over items outside
    ``exclude`` (the official code uses the union of all behaviors). Rows of users without
    the behavior have ``valid = False`` and triplet ``(u, 0, 0)``; how they enter a loss is
    the model's choice.
    """
    n_b = len(matrices)
    trip = np.zeros((len(users), n_b, 3), dtype=np.int64)
    valid = np.zeros((len(users), n_b), dtype=bool)
    for k, R in enumerate(matrices):
        pos, has = sample_positives(R, users, rng)
        neg = sample_negatives(users, exclude, rng)
        trip[:, k, 0] = users
        trip[:, k, 1] = pos
        trip[:, k, 2] = np.where(has, neg, 0)
        valid[:, k] = has
    return trip, valid


# ----------------------------------------------------------------------------- samplers


class InteractionSampler:
    """Every training pair of every matrix once per epoch, shuffled together, one negative each
    (rejected against the pair's own matrix). Batches hold ``users``, ``pos``, ``neg`` and ``b``,
    the index of the matrix each triplet comes from."""

    def __init__(self, matrices: Sequence[sp.spmatrix], batch_size: int) -> None:
        self.matrices = [sp.csr_matrix(m) for m in matrices]
        self.excludes = [PositiveSet(m) for m in self.matrices]
        self.batch_size = int(batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        users, items, tags = [], [], []
        for k, m in enumerate(self.matrices):
            users.append(np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)))
            items.append(m.indices.astype(np.int64))
            tags.append(np.full(m.nnz, k, dtype=np.int64))
        u_all, i_all, b_all = (np.concatenate(x) for x in (users, items, tags))
        order = rng.permutation(len(u_all))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            u, b = u_all[idx], b_all[idx]
            neg = np.empty_like(u)
            for k, ex in enumerate(self.excludes):  # a handful of matrices, not users
                sel = b == k
                neg[sel] = sample_negatives(u[sel], ex, rng)
            yield {"users": u, "pos": i_all[idx], "neg": neg, "b": b}


class RandomUserSampler:
    """The NGCF/LightGCN-TF sampler: ``n_train // batch + 1`` batches per epoch, each of distinct
    random users (with positives), one positive and one negative outside ``R[u]`` per user."""

    def __init__(self, R: sp.spmatrix, batch_size: int) -> None:
        self.R = sp.csr_matrix(R)
        self.exclude = PositiveSet(self.R)
        self.users = np.flatnonzero(np.diff(self.R.indptr) > 0).astype(np.int64)
        self.batch_size = int(batch_size)
        self.n_batches = self.R.nnz // self.batch_size + 1

    def epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        replace = self.batch_size > len(self.users)
        for _ in range(self.n_batches):
            users = rng.choice(self.users, size=self.batch_size, replace=replace)
            pos, _ = sample_positives(self.R, users, rng)
            yield {"users": users, "pos": pos, "neg": sample_negatives(users, self.exclude, rng)}


class UserTripletSampler:
    """Every user once per epoch in shuffled batches of ``batch_size`` users; per user and
    behavior one ``(u, i+, j-)`` with ``j-`` rejected against ``exclude`` (the official CRGCN and
    RMBRec code: the union of all behaviors). Batches hold ``triplets`` and ``valid``
    (:func:`per_user_triplets`)."""

    def __init__(self, matrices: Sequence[sp.spmatrix], exclude: sp.spmatrix, batch_size: int) -> None:
        self.matrices = [sp.csr_matrix(m) for m in matrices]
        self.exclude = PositiveSet(exclude)
        self.batch_size = int(batch_size)
        self.n_users = self.matrices[0].shape[0]

    @property
    def n_batches(self) -> int:
        return -(-self.n_users // self.batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        for users in user_batches(self.n_users, self.batch_size, rng):
            trip, valid = per_user_triplets(self.matrices, users, self.exclude, rng)
            yield {"triplets": trip, "valid": valid}


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
    """The COPF/PKEF training sampler (official HKUDS-lineage TF code).

    Each epoch shuffles the users (keeping the first ``users_per_epoch`` when set, PKEF's
    10,000) and yields batches of ``batch_users``. Per behavior ``k`` the batch holds
    ``users_k``, ``pos_k``, ``neg_k``: up to ``max_pairs`` positives per user drawn **with
    replacement** and as many negatives from the items the user has not interacted with **under
    that behavior** (users with no positive under k contribute nothing). With ``unique`` set,
    also ``uusers_k_j``, ``upos_k_j``, ``uneg_k_j`` drawn from ``B_k - B_j``:
    ``min(max_pairs, deg_k, deg_unique)`` pairs per user, negatives outside the unique matrix.
    """

    def __init__(
        self,
        mats: Sequence[sp.spmatrix],
        *,
        batch_users: int = 256,
        max_pairs: int = 40,
        users_per_epoch: int | None = None,
        unique: dict[tuple[int, int], sp.spmatrix] | None = None,
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


class PerBehaviorTripletSampler:
    """Per-behavior BPR triplets ``(u, i+ in R_k(u), j- not in exclude_k(u))``; every batch has
    the same number of triplets of every behavior.

    An epoch draws ``per_epoch`` triplets per behavior, from a fresh permutation of the
    behavior's pairs (cycling through further permutations when it has fewer), and yields
    batches of ``[K, m]`` int64 arrays ``users``, ``pos``, ``neg`` (row k = behavior k). With
    ``proportional=True`` every behavior instead makes one pass over its own pairs per epoch,
    split over the ``n_batches`` that ``per_epoch`` pairs need; batches then hold ``users_k``,
    ``pos_k``, ``neg_k`` (one 1-D array per behavior, sizes proportional to its pair count)."""

    def __init__(self, mats: Sequence[sp.spmatrix], excludes: Sequence[PositiveSet], batch_size: int,
                 per_epoch: int, proportional: bool = False) -> None:
        mats = [sp.csr_matrix(m) for m in mats]
        self.users = [np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)) for m in mats]
        self.items = [m.indices.astype(np.int64) for m in mats]
        self.excludes = list(excludes)
        self.batch_size = batch_size
        self.per_epoch = per_epoch
        self.proportional = proportional

    @property
    def n_batches(self) -> int:
        return -(-self.per_epoch // self.batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        if self.proportional:
            yield from self._proportional_epoch(rng)
            return
        n = self.per_epoch
        us, ps, ns = [], [], []
        for users, items, excl in zip(self.users, self.items, self.excludes):
            reps = -(-n // len(users))
            idx = np.concatenate([rng.permutation(len(users)) for _ in range(reps)])[:n]
            u = users[idx]
            us.append(u)
            ps.append(items[idx])
            ns.append(sample_negatives(u, excl, rng))
        U, P, N = np.stack(us), np.stack(ps), np.stack(ns)
        for s in range(0, n, self.batch_size):
            sl = slice(s, s + self.batch_size)
            yield {"users": U[:, sl], "pos": P[:, sl], "neg": N[:, sl]}

    def _proportional_epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        nb = self.n_batches
        cuts = []
        for users, items, excl in zip(self.users, self.items, self.excludes):
            idx = rng.permutation(len(users))
            u = users[idx]
            trip = (u, items[idx], sample_negatives(u, excl, rng))
            cuts.append([np.array_split(a, nb) for a in trip])
        for s in range(nb):
            batch: dict[str, np.ndarray] = {}
            for k, (u, p, n) in enumerate(cuts):
                batch[f"users_{k}"], batch[f"pos_{k}"], batch[f"neg_{k}"] = u[s], p[s], n[s]
            yield batch
