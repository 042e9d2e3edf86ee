"""The built-in synthetic data: determinism, held-out pairs for every behavior, controllable
DT, and auxiliary behaviors that carry signal about held-out buys."""

from __future__ import annotations

import numpy as np
import pytest

from mbrec.data.registry import builtin_names, load_dataset
from mbrec.data.stats import compute_stats
from mbrec.data.synthetic import SyntheticConfig, generate


def test_builtins_and_determinism() -> None:
    assert {"synthetic", "synthetic-large"} <= set(builtin_names())
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    c = load_dataset("synthetic", seed=1)
    assert (a.n_users, a.n_items) == (500, 400)
    assert all((a.train[x] != b.train[x]).nnz == 0 for x in a.behaviors)
    assert (a.train["buy"] != c.train["buy"]).nnz > 0


def test_heldout_for_every_behavior() -> None:
    d = load_dataset("synthetic")
    assert d.behaviors == ("view", "cart", "buy")
    for b in d.behaviors:
        assert d.valid[b].nnz > 0.9 * d.n_users and d.test[b].nnz > 0.9 * d.n_users
        assert d.train[b].multiply(d.test[b]).nnz == 0
        assert d.train[b].multiply(d.valid[b]).nnz == 0
    assert d.train["view"].nnz > d.train["cart"].nnz > d.train["buy"].nnz


def test_direct_buy_controls_dt() -> None:
    lo = compute_stats(generate(SyntheticConfig(n_users=300, n_items=300, direct_buy=0.02), seed=0))
    hi = compute_stats(generate(SyntheticConfig(n_users=300, n_items=300, direct_buy=0.4), seed=0))
    assert lo["dt"]["all"] < 0.1 < 0.25 < hi["dt"]["all"]
    assert hi["bar"]["all"]["view"] < lo["bar"]["all"]["view"]
    assert lo["bar"]["all"]["cart"] < lo["bar"]["all"]["view"]


def hit_rate(scores: np.ndarray, train: np.ndarray, test_items: np.ndarray, k: int = 10) -> float:
    s = scores.astype(np.float64).copy()
    s[train > 0] = -np.inf
    top = np.argsort(-s, axis=1)[:, :k]
    return float((top == test_items[:, None]).any(1).mean())


def test_auxiliary_behaviors_predict_heldout_buys() -> None:
    d = load_dataset("synthetic")
    buy = d.train["buy"].toarray()
    test = d.test["buy"].tocoo()
    users, items = test.row, test.col
    rng = np.random.default_rng(0)
    pop = buy.sum(0)[None, :].repeat(len(users), 0)  # target-only popularity
    aux = (d.train["view"] + 2 * d.train["cart"]).toarray()[users]
    hr_random = hit_rate(rng.random(pop.shape), buy[users], items)
    hr_pop = hit_rate(pop + 1e-3 * rng.random(pop.shape), buy[users], items)
    hr_aux = hit_rate(aux * 1000 + pop, buy[users], items)
    assert hr_aux > 2 * hr_pop and hr_pop > hr_random
    assert hr_aux > 0.3


def test_bad_config() -> None:
    from mbrec.errors import DataError

    with pytest.raises(DataError, match="p_cart"):
        load_dataset("synthetic", p_cart=1.5)
    with pytest.raises(DataError, match="number"):
        load_dataset("synthetic", n_users="many")
