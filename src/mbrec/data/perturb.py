"""Auxiliary-edge perturbation (the noise study of the RMBRec paper, §4.4; the choices are
explained in docs/data.md, "Perturbation").

For each auxiliary behavior ``b`` separately, with ``n_b`` its training edge count:

* ``ratio > 0`` (mode ``"add"``): add ``round(ratio * n_b)`` user-item pairs drawn uniformly from
  the pairs that are not yet training edges of ``b`` (and not held-out pairs of ``b``);
* ``ratio < 0`` (mode ``"remove"``): delete ``round(|ratio| * n_b)`` of b's training edges,
  uniformly without replacement.

The target behavior and every held-out split are untouched. Seeded; returns a new container.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import DataError


def _add(m: sp.csr_matrix, forbid: sp.csr_matrix, k: int, rng: np.random.Generator) -> sp.csr_matrix:
    nu, ni = m.shape
    total = nu * ni
    taken = (m + forbid).tocoo()
    taken_keys = np.unique(taken.row.astype(np.int64) * ni + taken.col)
    free = total - len(taken_keys)
    if k > free:
        raise DataError(f"cannot add {k:,} edges: only {free:,} free user-item pairs")
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < k:  # rejection sampling; a few rounds at realistic densities
        need = k - len(chosen)
        cand = rng.integers(0, total, int(need * 1.2) + 16)
        cand = cand[~np.isin(cand, taken_keys)]
        cand = np.setdiff1d(np.unique(cand), chosen, assume_unique=True)
        chosen = np.concatenate([chosen, rng.permutation(cand)[:need]])
    new = sp.csr_matrix(
        (np.ones(k, np.float32), (chosen // ni, chosen % ni)), shape=m.shape
    )
    out = m + new
    out.data[:] = 1.0
    return out.tocsr()


def _remove(m: sp.csr_matrix, k: int, rng: np.random.Generator) -> sp.csr_matrix:
    coo = m.tocoo()
    keep = np.ones(coo.nnz, dtype=bool)
    keep[rng.choice(coo.nnz, size=k, replace=False)] = False
    return sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (coo.row[keep], coo.col[keep])), shape=m.shape
    )


def perturb_auxiliary(
    data: MultiBehaviorData,
    ratio: float,
    seed: int,
    behaviors: tuple[str, ...] | list[str] | None = None,
    mode: str | None = None,
) -> MultiBehaviorData:
    """Add (``ratio > 0``) or remove (``ratio < 0``) a share of each auxiliary behavior's edges.

    ``mode`` may be given explicitly as ``"add"`` or ``"remove"``; then ``ratio`` is read as a
    magnitude. ``behaviors`` defaults to all auxiliary behaviors; naming the target is an error.
    """
    ratio = float(ratio)
    if mode is None:
        mode = "add" if ratio >= 0 else "remove"
    if mode not in ("add", "remove"):
        raise DataError("perturbation mode must be 'add' or 'remove'", value=mode)
    frac = abs(ratio)
    if mode == "remove" and frac > 1.0:
        raise DataError("cannot remove more than 100% of the edges", value=ratio)
    targets = tuple(data.auxiliary if behaviors is None else behaviors)
    for b in targets:
        data.behavior_index(b)
        if b == data.target:
            raise DataError(f"the target behavior {b!r} cannot be perturbed")
    rng = np.random.default_rng(seed)
    train = dict(data.train)
    notes = []
    for b in targets:
        m = data.train[b]
        k = int(round(frac * m.nnz))
        if k == 0:
            continue
        if mode == "add":
            train[b] = _add(m, data.valid[b] + data.test[b], k, rng)
        else:
            train[b] = _remove(m, k, rng)
        notes.append(f"{b} {m.nnz:,} -> {train[b].nnz:,}")
    desc = (
        f"{data.description} Auxiliary perturbation ({mode} {frac:.0%}, seed {seed}, uniform, "
        f"relative to each behavior's edge count): {', '.join(notes) or 'no change'}."
    )
    return data.replace(train=train, description=desc.strip())
