"""Metric definitions and the chunked evaluator against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.evaluate import chunk_size, csr_rows_coords, evaluate, hit_metrics, recommend
from mbrec.models.base import Model, ModelConfig
from mbrec.protocol import get_protocol

L2 = math.log2


class FixedScores(Model):
    """A model whose scores are a given matrix (same for every behavior)."""

    def __init__(self, data: MultiBehaviorData, scores: np.ndarray) -> None:
        super().__init__(data, ModelConfig())
        self.table = torch.nn.Parameter(torch.tensor(scores, dtype=torch.float32))

    def forward(self, graphs):  # type: ignore[override]
        return self.table

    def score(self, emb, users, behavior):  # type: ignore[override]
        return emb[users]

    @property
    def scored_behaviors(self):  # type: ignore[override]
        return self.behaviors


def _data(train_buy, test_buy, n_users=2, n_items=6, valid_buy=None, cart=None, cart_test=None):
    def m(pairs):
        R = np.zeros((n_users, n_items), dtype=np.float32)
        for u, i in pairs:
            R[u, i] = 1
        return sp.csr_matrix(R)

    return MultiBehaviorData(
        name="hand",
        behaviors=("cart", "buy"),
        train={"cart": m(cart or [(0, 0)]), "buy": m(train_buy)},
        valid={"buy": m(valid_buy or [])},
        test={"buy": m(test_buy), "cart": m(cart_test or [])},
        user_ids=np.array(["a", "b"][:n_users]),
        item_ids=np.array([f"i{k}" for k in range(n_items)]),
    )


# user a: ranking 5,1,2,3,4,0 -- held-out {2,5} -> hits at ranks 0 and 2
# user b: ranking 1,2,0,3,... -- held-out {0}   -> hit at rank 2
SCORES = np.array(
    [
        [0.0, 5.0, 4.0, 3.0, 2.0, 6.0],
        [4.0, 6.0, 5.0, 3.0, 2.0, 1.0],
    ]
)


def test_hand_computed_full_ranking_default_protocol():
    data = _data(train_buy=[(1, 4)], test_buy=[(0, 2), (0, 5), (1, 0)])
    p = get_protocol("default", ks=(2, 4))
    res = evaluate(FixedScores(data, SCORES), None, data, p, "test")["buy"]
    idcg2 = 1 + 1 / L2(3)
    # K = 2: a hits once at rank 0; b no hit
    assert res["HR@2"] == pytest.approx((1 + 0) / 2)
    assert res["NDCG@2"] == pytest.approx((1 / idcg2 + 0) / 2)
    assert res["Recall@2"] == pytest.approx((0.5 + 0) / 2)
    assert res["Precision@2"] == pytest.approx((0.5 + 0) / 2)
    assert res["MRR@2"] == pytest.approx((1 + 0) / 2)
    # K = 4: a hits at 0 and 2; b hits at 2
    a_ndcg = (1 + 1 / L2(4)) / idcg2
    b_ndcg = (1 / L2(4)) / 1
    assert res["HR@4"] == pytest.approx(1.0)
    assert res["NDCG@4"] == pytest.approx((a_ndcg + b_ndcg) / 2)
    assert res["Recall@4"] == pytest.approx((1 + 1) / 2)
    assert res["Precision@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert res["MRR@4"] == pytest.approx((1 + 1 / 3) / 2)
    assert res["n_users"] == 2


def test_copf_definitions_hits_per_user_and_unnormalized_dcg():
    data = _data(train_buy=[(1, 4)], test_buy=[(0, 2), (0, 5), (1, 0)])
    p = get_protocol("copf", ks=(4,), select_metric="HR@4")
    res = evaluate(FixedScores(data, SCORES), None, data, p, "test")["buy"]
    assert res["HR@4"] == pytest.approx((2 + 1) / 2)  # hits counted per user
    assert res["NDCG@4"] == pytest.approx(((1 + 1 / L2(4)) + 1 / L2(4)) / 2)  # no IDCG


def test_mask_removes_training_items_from_ranking():
    # user b bought item 1 (its top score) in training: masked, so item 2 moves to rank 0 and 0 to rank 1
    data = _data(train_buy=[(1, 1)], test_buy=[(0, 2), (1, 0)])
    p = get_protocol("default", ks=(1, 2))
    res = evaluate(FixedScores(data, SCORES), None, data, p, "test")["buy"]
    # a: ranking 5,1,2 -> test {2} at rank 2 -> no hit at K<=2;  b: ranking 2,0 -> hit at rank 1
    assert res["HR@1"] == pytest.approx(0.0)
    assert res["HR@2"] == pytest.approx(0.5)
    assert res["NDCG@2"] == pytest.approx((1 / L2(3)) / 2)
    p_none = get_protocol("default", ks=(1, 2), mask="none")
    res_none = evaluate(FixedScores(data, SCORES), None, data, p_none, "test")["buy"]
    assert res_none["HR@2"] == pytest.approx(0.0)  # unmasked, item 1 and 2 take b's top 2


def test_behavior_mask_and_all_tasks_for_mmr():
    # cart task: user a has held-out cart item 1; a's cart training item 5 is masked under mmr
    data = _data(train_buy=[(1, 4)], test_buy=[(0, 2), (1, 0)], cart=[(0, 5)], cart_test=[(0, 1)])
    p = get_protocol("mmr", ks=(1, 5), select_metric="NDCG@5")
    res = evaluate(FixedScores(data, SCORES), None, data, p, "test")
    assert set(res) == {"cart", "buy"}
    assert res["cart"]["n_users"] == 1
    assert res["cart"]["HR@1"] == pytest.approx(1.0)  # item 5 masked -> item 1 first
    # buy task under mmr masks buy-train (item 4 of user b), not cart-train: item 5 stays for a
    assert res["buy"]["HR@1"] == pytest.approx(0.0)


def test_sampled_candidates_rank_among_negatives():
    data = _data(train_buy=[(1, 4)], test_buy=[(0, 3), (1, 0)], n_items=6)
    p = get_protocol("default", ks=(1,), select_metric="NDCG@1", candidates="sampled", n_negatives=1)
    res = evaluate(FixedScores(data, SCORES), None, data, p, "test", seed=3)["buy"]
    assert 0.0 <= res["HR@1"] <= 1.0
    # with 0 useful negatives removed the held-out item competes against one item only
    p_many = get_protocol("default", ks=(1,), select_metric="NDCG@1", candidates="sampled", n_negatives=200)
    res_many = evaluate(FixedScores(data, SCORES), None, data, p_many, "test", seed=3)["buy"]
    full = evaluate(FixedScores(data, SCORES), None, data, get_protocol("default", ks=(1,), select_metric="NDCG@1"), "test")["buy"]
    assert res_many["HR@1"] == pytest.approx(full["HR@1"])  # every item sampled -> full ranking


def test_chunking_gives_identical_results():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    train = (rng.random((n_users, n_items)) < 0.2).astype(np.float32)
    test = np.zeros_like(train)
    for u in range(n_users):
        free = np.flatnonzero(train[u] == 0)
        test[u, rng.choice(free, 2, replace=False)] = 1
    data = MultiBehaviorData(
        name="r", behaviors=("buy",), train={"buy": sp.csr_matrix(train)}, valid={}, test={"buy": sp.csr_matrix(test)},
        user_ids=np.arange(n_users), item_ids=np.arange(n_items),
    )
    model = FixedScores(data, rng.normal(size=(n_users, n_items)))
    p = get_protocol("default")
    big = evaluate(model, None, data, p, "test", memory_mb=100)
    small = evaluate(model, None, data, p, "test", memory_mb=30 * 16 * 3 / 2**20)  # 3 users per chunk
    assert chunk_size(n_items, 30 * 16 * 3 / 2**20) == 3
    for k in big["buy"]:
        assert small["buy"][k] == pytest.approx(big["buy"][k])


def test_hit_metrics_ideal_dcg_caps_at_k():
    p = get_protocol("default", ks=(2,), select_metric="NDCG@2")
    hits = torch.tensor([[True, True]])
    out = hit_metrics(hits, torch.tensor([5]), p)  # 5 held-out, K=2: IDCG over 2 positions
    assert out["NDCG@2"].item() == pytest.approx(1.0)
    assert out["Recall@2"].item() == pytest.approx(2 / 5)


def test_recommend_never_returns_masked_items_and_pads():
    data = _data(train_buy=[(0, 5), (0, 1), (0, 2), (0, 3), (0, 4)], test_buy=[(0, 0), (1, 0)])
    model = FixedScores(data, SCORES)
    items, scores = recommend(model, model(None), data, np.array([0, 1]), "buy", 3, get_protocol("default"))
    assert items[0].tolist() == [0, -1, -1]  # only item 0 is left for user a
    assert np.isneginf(scores[0, 1])
    assert items[1].tolist() == [1, 2, 0]


def test_csr_rows_coords():
    R = sp.csr_matrix(np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=np.float32))
    r, c = csr_rows_coords(R, np.array([2, 0, 1]))
    assert list(zip(r.tolist(), c.tolist())) == [(0, 0), (1, 1), (1, 2)]


def test_check_finite_fast_path_and_overflowing_finite_scores():
    from mbrec.errors import NonFiniteError
    from mbrec.evaluate import check_finite

    check_finite(torch.randn(3, 4), "scores")
    check_finite(torch.full((2, 3), 3e38), "scores")  # finite, though their sum overflows
    for bad in (math.nan, math.inf, -math.inf):
        s = torch.zeros(2, 3)
        s[1, 2] = bad
        with pytest.raises(NonFiniteError, match="hold 1 non-finite"):
            check_finite(s, "scores")
