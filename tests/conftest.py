"""Shared fixtures. Real-data tests use ``shared_datasets`` and skip with a reason when the
folder ``../shared/datasets`` (or ``$MBREC_DATASETS``) is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData

REPO = Path(__file__).resolve().parents[1]


def shared_datasets_root() -> Path:
    env = os.environ.get("MBREC_DATASETS")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    root = shared_datasets_root()
    if not root.is_dir():
        pytest.skip(f"real datasets not found at {root} (set MBREC_DATASETS to run these checks)")
    return root


def tiny_data(seed: int = 0, n_users: int = 12, n_items: int = 15) -> MultiBehaviorData:
    """A tiny 3-behavior dataset (view, cart, buy) with nested behaviors and LOO held-out buys."""
    rng = np.random.default_rng(seed)
    view = (rng.random((n_users, n_items)) < 0.5).astype(np.float32)
    cart = view * (rng.random((n_users, n_items)) < 0.5)
    buy = cart * (rng.random((n_users, n_items)) < 0.6)
    for u in range(n_users):  # every user buys at least two items
        if buy[u].sum() < 2:
            idx = rng.choice(n_items, 2, replace=False)
            buy[u, idx] = cart[u, idx] = view[u, idx] = 1
    valid = np.zeros_like(buy)
    test = np.zeros_like(buy)
    for u in range(n_users):
        free = np.flatnonzero(buy[u] == 0)
        a, b = rng.choice(free, 2, replace=False)
        valid[u, a] = 1
        test[u, b] = 1
    csr = sp.csr_matrix
    return MultiBehaviorData(
        name="tiny",
        behaviors=("view", "cart", "buy"),
        train={"view": csr(view), "cart": csr(cart), "buy": csr(buy)},
        valid={"buy": csr(valid)},
        test={"buy": csr(test)},
        user_ids=np.array([f"u{k}" for k in range(n_users)]),
        item_ids=np.array([f"i{k}" for k in range(n_items)]),
    )


@pytest.fixture
def tiny() -> MultiBehaviorData:
    return tiny_data()
