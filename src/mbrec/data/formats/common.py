"""Helpers shared by the layout loaders: behavior-name ordering and container assembly."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from mbrec.data.container import MultiBehaviorData, pairs_to_csr

# Upstream -> downstream stages of the names the field uses. The target stage is last.
STAGES: tuple[tuple[str, ...], ...] = (
    ("view", "ipv", "pv", "click"),
    ("collect", "favourite", "favorite", "fav"),
    ("cart",),
    ("buy", "purchase"),
)
TARGET_NAMES = STAGES[-1]
KNOWN_BEHAVIORS = tuple(b for stage in STAGES for b in stage)


def stage_of(name: str) -> int:
    for k, stage in enumerate(STAGES):
        if name in stage:
            return k
    return -1


def order_behaviors(names: list[str]) -> list[str]:
    """Order known behavior names upstream -> downstream (view, collect, cart, buy)."""
    return sorted(names, key=lambda b: (stage_of(b), b))


def numeric_ids(n: int, base: int) -> np.ndarray:
    """External ids ``base..base+n-1`` as strings (the file's own ids)."""
    return np.arange(base, base + n).astype(str)


def assemble(
    *,
    name: str,
    behaviors: list[str] | tuple[str, ...],
    train: Mapping[str, np.ndarray],
    valid: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    n_users: int,
    n_items: int,
    base: int,
    description: str,
    source: str | Path,
) -> MultiBehaviorData:
    """Container from ``[n, 2]`` pair arrays holding the file's ids (``base``-based)."""

    def csr(pairs: np.ndarray):  # type: ignore[no-untyped-def]
        return pairs_to_csr(pairs[:, 0] - base, pairs[:, 1] - base, n_users, n_items)

    return MultiBehaviorData(
        name=name,
        behaviors=tuple(behaviors),
        train={b: csr(train[b]) for b in behaviors},
        valid={b: csr(p) for b, p in valid.items() if b in behaviors},
        test={b: csr(p) for b, p in test.items() if b in behaviors},
        user_ids=numeric_ids(n_users, base),
        item_ids=numeric_ids(n_items, base),
        description=description.strip(),
        source=str(source),
    )


def pair_set_diff(a: np.ndarray, b: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``a`` not in ``b`` (unique), and the boolean mask over ``a`` of rows found in ``b``."""
    ka = a[:, 0] * (n_items + 1) + a[:, 1]
    kb = b[:, 0] * (n_items + 1) + b[:, 1]
    inb = np.isin(ka, kb)
    return a[~inb], inb
