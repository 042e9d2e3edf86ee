"""Most-popular baseline: scores, tie-breaking, hand-computed metrics, and its place in every run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp

from mbrec.baselines import item_counts, popular_metrics, popularity_scores
from mbrec.cli.main import main
from mbrec.data.container import MultiBehaviorData
from mbrec.protocol import get_protocol


def _m(pairs: list[tuple[int, int]], n_users: int = 3, n_items: int = 5) -> sp.csr_matrix:
    R = np.zeros((n_users, n_items), dtype=np.float32)
    for u, i in pairs:
        R[u, i] = 1
    return sp.csr_matrix(R)


def _data() -> MultiBehaviorData:
    """buy: item 0 bought by 2 users, item 1 by 1; view: item 3 by 3 users, item 4 by 1.
    Most-popular for buy: 0, 1, then the ties at 0 buys by view count: 3, 4, then 2."""
    return MultiBehaviorData(
        name="hand", behaviors=("view", "buy"),
        train={"view": _m([(0, 3), (1, 3), (2, 3), (2, 4)]), "buy": _m([(0, 0), (1, 0), (1, 1)])},
        valid={},
        test={"buy": _m([(0, 1), (1, 3), (2, 2)])},
        user_ids=np.array(["a", "b", "c"]), item_ids=np.array([f"i{k}" for k in range(5)]),
    )


def test_counts_and_tie_breaking() -> None:
    data = _data()
    assert item_counts(data, "buy").tolist() == [2, 1, 0, 0, 0]
    s = popularity_scores(data, "buy")
    assert list(np.argsort(-s, kind="stable")) == [0, 1, 3, 4, 2]
    assert np.all(np.floor(s) == item_counts(data, "buy"))  # the tie-break never reorders real counts


def test_hand_computed_metrics_with_training_items_masked() -> None:
    """Mask = each user's training buys. a: ranking 1, 3, 4, 2 (0 masked), held-out 1 -> rank 1;
    b: ranking 3, 4, 2 (0, 1 masked), held-out 3 -> rank 1; c: ranking 0, 1, 3, 4, 2, held-out 2 ->
    rank 5. HR@1 = 2/3, HR@2 = 2/3; NDCG@2 = (1 + 1 + 0) / 3."""
    out = popular_metrics(_data(), get_protocol("default", ks=(1, 2)))
    assert set(out) == {"test"}
    m = out["test"]["buy"]
    assert m["HR@1"] == pytest.approx(2 / 3) and m["HR@2"] == pytest.approx(2 / 3)
    assert m["NDCG@2"] == pytest.approx(2 / 3)
    assert m["n_users"] == 3
    # without the mask every ranking is 0, 1, 3, 4, 2: a's item 1 at rank 2, b's 3 at rank 3, c's 2 at 5
    nomask = popular_metrics(_data(), get_protocol("default", ks=(1, 2), mask="none"))["test"]["buy"]
    assert nomask["HR@1"] == 0.0 and nomask["HR@2"] == pytest.approx(1 / 3)
    assert nomask["NDCG@2"] == pytest.approx((1 / math.log2(3)) / 3)

def test_every_run_reports_most_popular_on_its_splits(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "lightgcn", "synthetic", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    pop = metrics["most_popular"]
    assert set(pop) == {"valid", "test"} and set(pop["test"]) == set(metrics["test"])
    assert all(0 <= v["HR@10"] <= 1 and not math.isnan(v["NDCG@10"]) for s in pop.values() for v in s.values())
    assert "test (most-popular)" in printed
    assert "most-popular, same split and protocol: valid HR@10" in (out / "train.log").read_text()
