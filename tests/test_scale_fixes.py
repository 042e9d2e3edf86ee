"""The synthetic generator at scale: the memory-bounded pieces give the same data, and the
``candidates`` mode (linear in users) keeps the funnel structure."""

from __future__ import annotations

import numpy as np
import pytest

from mbrec.data.synthetic import SyntheticConfig, _in_rows, _popular_items, generate, load_builtin
from mbrec.errors import DataError


def test_in_rows_matches_dense_membership() -> None:
    rng = np.random.default_rng(0)
    n_rows, n_items = 7, 30
    top = np.stack([rng.permutation(n_items)[:6] for _ in range(n_rows)])
    valid = rng.random(top.shape) < 0.8
    rows = rng.integers(0, n_rows, 200)
    items = rng.integers(0, n_items, 200)
    dense = np.zeros((n_rows, n_items), dtype=bool)
    r = np.broadcast_to(np.arange(n_rows)[:, None], top.shape)
    dense[r[valid], top[valid]] = True
    assert np.array_equal(_in_rows(top, valid, rows, items, n_items), dense[rows, items])
    assert not _in_rows(top, np.zeros_like(valid), rows, items, n_items).any()


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_popular_items_follow_the_rank_power_law(a: float) -> None:
    n = 50
    bias = -a * np.log1p(np.random.default_rng(1).permutation(n).astype(np.float64))
    items = _popular_items(bias, a, np.random.default_rng(2).random(400_000))
    freq = np.bincount(items, minlength=n) / len(items)
    by_rank = freq[np.argsort(-bias, kind="stable")]
    x = np.arange(n + 1, dtype=np.float64)  # continuous density (1 + x)^-a on [r, r + 1)
    mass = (np.diff((1 + x) ** (1 - a)) if a != 1.0 else np.diff(np.log1p(x)))
    mass = mass / mass.sum()
    assert np.allclose(by_rank, mass, atol=0.004)
    if a > 0:
        assert by_rank[0] > 2 * by_rank[-1]


def test_default_mode_description_and_ids_unchanged() -> None:
    d = generate(SyntheticConfig(n_users=40, n_items=30))
    assert "candidates" not in d.description
    assert d.user_ids[:3].tolist() == ["u0", "u1", "u2"] and d.item_ids[-1] == "i29"


def test_candidates_mode_is_deterministic_and_keeps_the_funnel() -> None:
    cfg = SyntheticConfig(n_users=600, n_items=300, candidates=64)
    a, b = generate(cfg, seed=3), generate(cfg, seed=3)
    for s in ("train", "valid", "test"):
        for beh in a.behaviors:
            assert (a.split(s)[beh] != b.split(s)[beh]).nnz == 0
    assert "candidates=64" in a.description
    full = {beh: a.train[beh] + a.valid[beh] + a.test[beh] for beh in a.behaviors}
    # every cart is a view (the funnel); most buys are carts; every user buys >= min_target
    assert (full["cart"] - full["cart"].multiply(full["view"])).nnz == 0
    buys_with_cart = full["buy"].multiply(full["cart"]).nnz / full["buy"].nnz
    assert 0.6 < buys_with_cart < 1.0
    assert (np.diff(full["buy"].indptr) >= cfg.min_target).all()
    # the exact mode's shape: counts per behavior within 10%
    exact = generate(SyntheticConfig(n_users=600, n_items=300), seed=3)
    for beh in a.behaviors:
        ce = (exact.train[beh] + exact.valid[beh] + exact.test[beh]).nnz
        assert abs(full[beh].nnz - ce) / ce < 0.1, beh


def test_candidates_option_through_load_builtin_and_its_check() -> None:
    d = load_builtin("synthetic", n_users=100, n_items=80, candidates=32)
    assert d.n_users == 100 and d.n_items == 80
    with pytest.raises(DataError, match="candidates"):
        load_builtin("synthetic", candidates=4)
