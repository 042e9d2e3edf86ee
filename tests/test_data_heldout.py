"""Held-out rows in the generic format: ids seen only in valid/test rows, the ``heldout_unseen``
policy, per-behavior held-out sets, the cold-start statistics, and evaluation of cold users and
new items. All on small hand-made files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mbrec.data.registry import load_dataset
from mbrec.data.stats import cold_start_line, compute_stats, format_stats, heldout_stats
from mbrec.errors import DataError
from mbrec.evaluate import evaluate, mask_for
from mbrec.models.base import available_models
from mbrec.protocol import get_protocol


def folder(tmp_path: Path, rows: list[str], yaml_text: str = "behaviors: [view, buy]\n",
           header: str = "user,item,behavior,split", name: str = "ds") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "interactions.csv").write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (d / "dataset.yaml").write_text(yaml_text, encoding="utf-8")
    return d


def pairs(m) -> set[tuple[int, int]]:  # type: ignore[no-untyped-def]
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist()))


# Hand-made: u1, u2 have training rows; u3 appears only in a test buy row (cold: no training row at
# all); u4 has a training view but no training buy (cold for the target only); item n appears only
# in held-out rows (new item).
ROWS = [
    "u1,a,view,train", "u1,a,buy,train", "u1,b,view,train",
    "u2,b,buy,train", "u2,c,view,train",
    "u4,c,view,train",
    "u1,c,buy,test",    # warm user, warm item
    "u3,a,buy,test",    # user with no training row
    "u4,b,buy,test",    # user with a training view, no training buy
    "u2,n,buy,valid",   # new item
    "u1,n,view,test",   # new item, auxiliary behavior
]


# ----------------------------------------------------------------------------- the issue's crash
def test_issue_crash_heldout_row_beyond_universe_size(tmp_path: Path) -> None:
    """The issue: a held-out row for an unknown user at a row index >= the number of users
    crashed with ``IndexError ... in generic._check_heldout_known`` (the message indexed the
    user ids by row number). It now loads, and ``error`` names the right line and value."""
    rows = [f"a,i{k},buy,train" for k in range(50)] + ["b,i0,view,train", "zz,i1,buy,test"]
    d = folder(tmp_path, rows)
    data = load_dataset(d)
    assert list(data.user_ids) == ["a", "b", "zz"]
    assert pairs(data.test["buy"]) == {(2, data.item_index("i1"))}
    assert compute_stats(data)["heldout"]["test"]["buy"]["cold_any_users"] == 1
    with pytest.raises(DataError) as e:
        load_dataset(d, heldout_unseen="error")
    assert e.value.line == 53 and e.value.value == "zz" and "user with no training row" in str(e.value)


# ----------------------------------------------------------------------------- keep (default)
def test_keep_is_default_and_universe_is_every_id(tmp_path: Path) -> None:
    data = load_dataset(folder(tmp_path, ROWS))
    assert list(data.user_ids) == ["u1", "u2", "u3", "u4"]
    assert list(data.item_ids) == ["a", "b", "c", "n"]
    u, i = data.user_index, data.item_index
    assert pairs(data.test["buy"]) == {(u("u1"), i("c")), (u("u3"), i("a")), (u("u4"), i("b"))}
    assert pairs(data.valid["buy"]) == {(u("u2"), i("n"))}
    assert data.train_union()[u("u3")].nnz == 0 and data.train_union()[:, i("n")].nnz == 0
    assert "kept (heldout_unseen: keep)" in data.description


def test_drop_removes_rows_and_their_ids(tmp_path: Path) -> None:
    data = load_dataset(folder(tmp_path, ROWS), heldout_unseen="drop")
    # dropped: u3's test buy (user without training rows), u2-n and u1-n (new item);
    # u4's test buy stays (u4 has a training view)
    assert list(data.user_ids) == ["u1", "u2", "u4"] and list(data.item_ids) == ["a", "b", "c"]
    u, i = data.user_index, data.item_index
    assert pairs(data.test["buy"]) == {(u("u1"), i("c")), (u("u4"), i("b"))}
    assert data.valid["buy"].nnz == 0 and data.test["view"].nnz == 0
    assert "3 (1 users, 1 items), dropped" in data.description


def test_drop_keeps_ids_listed_in_id_files(tmp_path: Path) -> None:
    d = folder(tmp_path, ROWS, "behaviors: [view, buy]\nusers: users.txt\nitems: items.txt\nheldout_unseen: drop\n")
    (d / "users.txt").write_text("u1\nu2\nu3\nu4\n")
    (d / "items.txt").write_text("a\nb\nc\nn\n")
    data = load_dataset(d)
    assert data.n_users == 4 and data.n_items == 4 and data.test["buy"].nnz == 2


def test_error_names_item_line_and_value(tmp_path: Path) -> None:
    rows = ["u1,a,buy,train", "u2,a,buy,train", "u2,b,view,train", "u1,q,buy,valid"]
    with pytest.raises(DataError) as e:
        load_dataset(folder(tmp_path, rows), heldout_unseen="error")
    assert e.value.line == 5 and e.value.value == "q" and "valid row for a item" in str(e.value)


def test_policy_from_yaml_and_option_overrides_it(tmp_path: Path) -> None:
    d = folder(tmp_path, ROWS, "behaviors: [view, buy]\nheldout_unseen: error\n")
    with pytest.raises(DataError, match="heldout_unseen: error"):
        load_dataset(d)
    assert load_dataset(d, heldout_unseen="keep").n_users == 4
    (d / "dataset.yaml").write_text("behaviors: [view, buy]\nheldout_unseen: remove\n")
    with pytest.raises(DataError, match=r"must be one of \['keep', 'drop', 'error'\]"):
        load_dataset(d)


def test_leave_one_out_without_split_column_keeps_new_items(tmp_path: Path) -> None:
    rows = ["u1,a,buy,1", "u1,b,buy,2", "u1,z,buy,3", "u2,a,buy,1", "u2,b,view,2"]
    d = folder(tmp_path, rows, "behaviors: [view, buy]\n", header="user,item,behavior,timestamp")
    data = load_dataset(d)
    assert pairs(data.test["buy"]) == {(0, data.item_index("z"))}  # z: bought only as u1's latest
    assert heldout_stats(data)["test"]["buy"]["new_items"] == 1
    assert load_dataset(d, heldout_unseen="drop").n_items == 2


# ----------------------------------------------------------------------------- statistics
def test_cold_start_stats_by_hand(tmp_path: Path) -> None:
    data = load_dataset(folder(tmp_path, ROWS))
    h = compute_stats(data)["heldout"]
    assert h["test"]["buy"] == {"rows": 3, "users": 3, "cold_target_rows": 2, "cold_target_users": 2,
                                "cold_any_rows": 1, "cold_any_users": 1, "new_item_rows": 0, "new_items": 0}
    assert h["valid"]["buy"] == {"rows": 1, "users": 1, "cold_target_rows": 0, "cold_target_users": 0,
                                 "cold_any_rows": 0, "cold_any_users": 0, "new_item_rows": 1, "new_items": 1}
    assert h["test"]["view"]["new_item_rows"] == 1 and "view" not in h["valid"]
    text = format_stats(compute_stats(data))
    assert "held-out rows and cold start" in text and "evaluated only by protocols with tasks=all" in text
    line = cold_start_line(data)
    assert "\n" not in line
    assert "test 2 of 3 rows (2 of 3 users) have no training 'buy' row, 1 rows (1 users) no training row at all" in line
    assert "valid 0 of 1 rows" in line and "1 rows name an item with no training row (1 items)" in line


def test_training_log_has_the_cold_start_line(tmp_path: Path) -> None:
    from mbrec.config import build_config
    from mbrec.train import train

    d = folder(tmp_path, ROWS)
    cfg = build_config("lightgcn", str(d), overrides=["train.epochs=1", "model_args.embedding_dim=4",
                                                       "protocol.ks=[1]", "protocol.select_metric=HR@1"])
    out = tmp_path / "run"
    train(cfg, out, quiet=True)
    log = (out / "train.log").read_text()
    assert "held-out cold start: valid 0 of 1 rows" in log


# ----------------------------------------------------------------------------- per-behavior held-out
def test_auxiliary_heldout_rows_are_heldout_sets_not_training(tmp_path: Path) -> None:
    rows = ["u1,a,view,train", "u1,a,buy,train", "u2,b,view,train", "u2,b,buy,train",
            "u1,b,view,valid", "u2,a,view,test", "u1,b,buy,test", "u2,a,buy,valid"]
    data = load_dataset(folder(tmp_path, rows))
    assert pairs(data.train["view"]) == {(0, 0), (1, 1)}
    assert pairs(data.valid["view"]) == {(0, 1)} and pairs(data.test["view"]) == {(1, 0)}
    assert data.counts() == {"train": {"view": 2, "buy": 2}, "valid": {"view": 1, "buy": 1},
                             "test": {"view": 1, "buy": 1}}
    s = compute_stats(data)
    assert s["counts"]["view"]["valid"] == 1 and s["heldout"]["test"]["view"]["rows"] == 1
    # the mmr protocol evaluates the auxiliary behavior's held-out set too
    m = evaluate(Fixed(data, [0.0, 1.0]), None, data, get_protocol("mmr"), "test")
    assert set(m) == {"view", "buy"} and m["view"]["n_users"] == 1.0


# ----------------------------------------------------------------------------- evaluation
class Fixed(torch.nn.Module):
    """A stub model: every user gets the same fixed item scores for every behavior."""

    def __init__(self, data, scores: list[float]) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(scores))
        self.scored_behaviors = data.behaviors

    def embed(self, graphs, behaviors):  # type: ignore[no-untyped-def]
        return None

    def score(self, emb, users, behavior):  # type: ignore[no-untyped-def]
        return self.w.detach().expand(len(users), -1).clone()


def test_evaluation_of_cold_users_and_new_items_by_hand(tmp_path: Path) -> None:
    """Items a, b, c, n score 4, 3, 2, 1 for everyone; the target's training items are masked.
    Test buys: u1 -> c (u1's training buy a masked: ranking b, c, n: c at rank 2), u3 -> a (no
    training rows, nothing masked: a at rank 1), u4 -> b (no training buy: a, b: rank 2).
    Valid: u2 -> n, a new item (u2's buy b masked: a, c, n: rank 3)."""
    data = load_dataset(folder(tmp_path, ROWS))
    u = data.user_index
    p = get_protocol("default", ks=(1, 2, 3), select_metric="HR@1")
    mask = mask_for(data, p, "buy")
    assert mask[u("u3")].nnz == 0 and mask[u("u4")].nnz == 0
    model = Fixed(data, [4.0, 3.0, 2.0, 1.0])
    test = evaluate(model, None, data, p, "test")["buy"]
    assert test["n_users"] == 3.0
    assert test["HR@1"] == pytest.approx(1 / 3) and test["HR@2"] == pytest.approx(1.0)
    assert test["NDCG@2"] == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(3)) / 3)
    valid = evaluate(model, None, data, p, "valid")["buy"]
    assert valid["HR@2"] == 0.0 and valid["HR@3"] == 1.0
    assert valid["MRR@3"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("model", available_models())
def test_every_model_trains_and_evaluates_with_cold_users_and_items(tmp_path: Path, model: str) -> None:
    """One epoch of each model on data with cold users and new items: finite metrics, and every
    held-out user (cold ones included) is evaluated."""
    from mbrec.config import build_config
    from mbrec.train import train

    rng = np.random.default_rng(0)
    rows = []
    for uid in range(12):
        for it in rng.choice(10, 5, replace=False):
            rows.append(f"u{uid},i{it},view,train")
        for it in rng.choice(10, 2, replace=False):
            rows += [f"u{uid},i{it},cart,train", f"u{uid},i{it},buy,train"]
        rows += [f"u{uid},i{rng.integers(10)},buy,test", f"u{uid},i{rng.integers(10)},buy,valid"]
    rows += ["cold1,i3,buy,test", "cold1,new1,buy,valid", "cold2,new2,buy,test", "u0,new1,view,test"]
    d = folder(tmp_path, rows, "behaviors: [view, cart, buy]\n")
    data = load_dataset(d)
    cfg = build_config(model, str(d), overrides=[
        "train.epochs=1", "model_args.embedding_dim=8", "protocol.ks=[1, 5]", "protocol.select_metric=HR@5"])
    m = train(cfg, tmp_path / "run", data=data, quiet=True)
    test = m["test"]["buy"]
    assert all(math.isfinite(v) for v in test.values())
    assert test["n_users"] == float((np.diff(data.test["buy"].indptr) > 0).sum())


def test_policy_reaches_the_loader_through_data_options(tmp_path: Path) -> None:
    from mbrec.config import build_config
    from mbrec.rundir import load_data

    d = folder(tmp_path, ROWS)
    cfg = build_config("lightgcn", str(d), overrides=["data_options.heldout_unseen=drop"])
    assert load_data(cfg).n_users == 3
