"""Held-out splits: leave-one-out per user (by timestamp or seeded random) and validation carving.

All functions are vectorized over pairs (one sort, no per-user loops).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import DataError


def rank_from_end(
    users: np.ndarray, rng: np.random.Generator, timestamps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each pair, its position counted from the user's latest pair (0 = latest) and the
    user's number of pairs. Ties (and everything, without timestamps) are broken at random."""
    users = np.asarray(users, dtype=np.int64)
    n = len(users)
    tie = rng.random(n)
    keys = [tie] if timestamps is None else [tie, np.asarray(timestamps, dtype=np.float64)]
    order = np.lexsort(keys + [users])  # last key is primary: user, then time, then tie
    su = users[order]
    start = np.r_[0, np.flatnonzero(su[1:] != su[:-1]) + 1]
    sizes = np.diff(np.r_[start, n])
    size_sorted = np.repeat(sizes, sizes)
    end_sorted = np.repeat(start + sizes, sizes)
    pos_from_end = end_sorted - np.arange(n) - 1
    out_rank = np.empty(n, dtype=np.int64)
    out_size = np.empty(n, dtype=np.int64)
    out_rank[order] = pos_from_end
    out_size[order] = size_sorted
    return out_rank, out_size


def leave_one_out(
    users: np.ndarray, rng: np.random.Generator, timestamps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(is_valid, is_test)`` over unique (user, item) pairs.

    Per user: the latest pair (by timestamp, else a random one) is test when the user has
    >= 2 pairs; the next latest is validation when the user has >= 3. At least one pair per
    user always stays in training.
    """
    rank, size = rank_from_end(users, rng, timestamps)
    is_test = (rank == 0) & (size >= 2)
    is_valid = (rank == 1) & (size >= 3)
    return is_valid, is_test


def carve_validation(
    data: MultiBehaviorData, seed: int, behavior: str | None = None
) -> MultiBehaviorData:
    """Move one random training pair of ``behavior`` (default: the target) per user who has
    >= 2 such pairs into ``valid``. For layouts without a validation split (COPF/PKEF pickles).

    Refuses data that already has validation pairs for that behavior.
    """
    b = data.target if behavior is None else behavior
    data.behavior_index(b)
    if data.valid[b].nnz:
        raise DataError(
            f"dataset {data.name!r} already has {data.valid[b].nnz:,} validation pairs for {b!r}"
        )
    m = data.train[b].tocoo()
    rng = np.random.default_rng(seed)
    rank, size = rank_from_end(m.row, rng)
    move = (rank == 0) & (size >= 2)
    shape = (data.n_users, data.n_items)

    def csr(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(
            (np.ones(int(mask.sum()), np.float32), (m.row[mask], m.col[mask])), shape=shape
        )

    train = dict(data.train)
    valid = dict(data.valid)
    train[b] = csr(~move)
    valid[b] = csr(move)
    note = (
        f" Validation carved from training {b!r}: one random pair per user with >= 2 "
        f"({int(move.sum()):,} pairs, seed {seed})."
    )
    return data.replace(train=train, valid=valid, description=data.description + note)
