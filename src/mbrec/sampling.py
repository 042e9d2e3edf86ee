"""Vectorized negative sampling and batch builders.

Negatives are drawn uniformly and rejected against a user's positives, held as a sorted array
of hashed keys ``user * n_items + item`` (membership by binary search). Rejected draws are
redrawn for the rejected rows only, so the cost is a few vectorized passes per batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp


class PositiveSet:
    """Hashed (user, item) membership for rejection sampling."""

    def __init__(self, R: sp.spmatrix) -> None:
        R = sp.csr_matrix(R)
        self.n_users, self.n_items = R.shape
        rows = np.repeat(np.arange(R.shape[0], dtype=np.int64), np.diff(R.indptr))
        self.keys = np.unique(rows * self.n_items + R.indices.astype(np.int64))
        self.degree = np.diff(R.indptr)

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


def interaction_triplets(
    R: sp.csr_matrix,
    exclude: PositiveSet,
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """LightGCN-style epoch: every training interaction once, shuffled, with one negative each.

    Yields ``(users, pos_items, neg_items)`` arrays of at most ``batch_size`` rows.
    """
    R = sp.csr_matrix(R)
    users = np.repeat(np.arange(R.shape[0], dtype=np.int64), np.diff(R.indptr))
    items = R.indices.astype(np.int64)
    order = rng.permutation(len(users))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        u = users[idx]
        yield u, items[idx], sample_negatives(u, exclude, rng)


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
