"""BAR, DT and behavior patterns, hand-computed on a 2 x 4 example."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData
from mbrec.data.stats import compute_stats, format_stats


def example() -> MultiBehaviorData:
    csr = lambda a: sp.csr_matrix(np.array(a, dtype=np.float32))  # noqa: E731
    return MultiBehaviorData(
        name="ex",
        behaviors=("view", "cart", "buy"),
        train={
            "view": csr([[1, 1, 0, 0], [1, 0, 1, 0]]),
            "cart": csr([[1, 0, 0, 0], [0, 0, 1, 1]]),
            "buy": csr([[1, 0, 0, 0], [0, 0, 0, 1]]),
        },
        valid={"buy": csr([[0, 1, 0, 0], [0, 0, 0, 0]])},
        test={"buy": csr([[0, 0, 0, 1], [0, 0, 0, 0]])},
        user_ids=np.array(["a", "b"]),
        item_ids=np.array(["p", "q", "r", "s"]),
    )


def test_bar_dt_by_hand() -> None:
    s = compute_stats(example())
    # training buys (a,p), (b,s): view has (a,p) -> 1/2; cart has both -> 1; none is direct
    assert s["bar"]["train"] == {"view": pytest.approx(0.5), "cart": pytest.approx(1.0)}
    assert s["dt"]["train"] == pytest.approx(0.0)
    # all buys add (a,q) (viewed, not carted) and (a,s) (no auxiliary): view 2/4, cart 2/4, DT 1/4
    assert s["bar"]["all"] == {"view": pytest.approx(0.5), "cart": pytest.approx(0.5)}
    assert s["dt"]["all"] == pytest.approx(0.25)
    assert s["counts"]["buy"] == {"train": 2, "valid": 1, "test": 1, "density": 0.25,
                                  "users_with_train": 2}


def test_patterns_by_hand() -> None:
    s = compute_stats(example())
    # train pairs: (a,p)=111 (a,q)=100 (b,p)=100 (b,r)=110 (b,s)=011
    assert s["patterns"]["train"] == {"100": 2, "111": 1, "110": 1, "011": 1}
    # all: (a,q) gains buy -> 101, (a,s) buy only -> 001
    assert s["patterns"]["all"] == {"111": 1, "101": 1, "100": 1, "110": 1, "011": 1, "001": 1}
    text = format_stats(s)
    assert "BAR(view)" in text and "011" in text and "DT" in text


def test_json_ready(tiny: MultiBehaviorData) -> None:
    import json

    s = compute_stats(tiny)
    assert json.loads(json.dumps(s))["users"] == tiny.n_users
