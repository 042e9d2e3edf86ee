"""Splits, perturbation and conversion to the generic format (round trip, no partial writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mbrec.data.container import SPLITS, MultiBehaviorData
from mbrec.data.convert import write_generic
from mbrec.data.perturb import perturb_auxiliary
from mbrec.data.registry import load_dataset
from mbrec.data.split import carve_validation, leave_one_out
from mbrec.errors import DataError


def same(a: MultiBehaviorData, b: MultiBehaviorData) -> bool:
    return (
        a.behaviors == b.behaviors
        and list(a.user_ids) == list(b.user_ids)
        and list(a.item_ids) == list(b.item_ids)
        and all((a.split(s)[x] != b.split(s)[x]).nnz == 0 for s in SPLITS for x in a.behaviors)
    )


def test_leave_one_out_counts() -> None:
    users = np.array([0, 0, 0, 1, 1, 2])
    v, t = leave_one_out(users, np.random.default_rng(0), timestamps=np.array([1, 3, 2, 5, 4, 0]))
    assert t.tolist() == [False, True, False, True, False, False]
    assert v.tolist() == [False, False, True, False, False, False]


def test_carve_validation(tiny: MultiBehaviorData) -> None:
    base = tiny.replace(valid={})
    out = carve_validation(base, seed=0)
    n2 = int((np.diff(base.train["buy"].indptr) >= 2).sum())
    assert out.valid["buy"].nnz == n2
    assert out.train["buy"].nnz == base.train["buy"].nnz - n2
    assert out.train["buy"].multiply(out.valid["buy"]).nnz == 0
    assert (out.train["buy"] + out.valid["buy"] != base.train["buy"]).nnz == 0
    assert "carved" in out.description
    with pytest.raises(DataError, match="already has"):
        carve_validation(tiny, seed=0)


def test_perturb_add_and_remove(tiny: MultiBehaviorData) -> None:
    add = perturb_auxiliary(tiny, 0.5, seed=1)
    for b in tiny.auxiliary:
        n = tiny.train[b].nnz
        assert add.train[b].nnz == n + round(0.5 * n)
        assert (tiny.train[b] - add.train[b].multiply(tiny.train[b])).nnz == 0  # superset
    rem = perturb_auxiliary(tiny, -0.3, seed=1)
    for b in tiny.auxiliary:
        n = tiny.train[b].nnz
        assert rem.train[b].nnz == n - round(0.3 * n)
        assert (rem.train[b] - rem.train[b].multiply(tiny.train[b])).nnz == 0  # subset
    for out in (add, rem):
        assert (out.train["buy"] != tiny.train["buy"]).nnz == 0
        for s in ("valid", "test"):
            assert all((out.split(s)[b] != tiny.split(s)[b]).nnz == 0 for b in tiny.behaviors)
    again = perturb_auxiliary(tiny, 0.5, seed=1)
    assert same(add, again)
    only_view = perturb_auxiliary(tiny, -0.5, seed=0, behaviors=["view"])
    assert (only_view.train["cart"] != tiny.train["cart"]).nnz == 0
    with pytest.raises(DataError, match="target"):
        perturb_auxiliary(tiny, 0.1, seed=0, behaviors=["buy"])


def test_convert_round_trip(tmp_path: Path, tiny: MultiBehaviorData) -> None:
    syn = load_dataset("synthetic", n_users=60, n_items=50)
    for data in (tiny, syn):
        out = write_generic(data, tmp_path / data.name)
        assert sorted(p.name for p in out.iterdir()) == [
            "dataset.yaml", "interactions.csv", "items.txt", "users.txt"]
        back = load_dataset(out)
        assert same(data, back)


def test_convert_refuses_and_writes_nothing_on_failure(
    tmp_path: Path, tiny: MultiBehaviorData, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_generic(tiny, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    import pandas as pd

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError):
        write_generic(tiny, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    write_generic(tiny, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "interactions.csv").exists()


def test_convert_refuses_behavior_without_pairs(tmp_path: Path, tiny: MultiBehaviorData) -> None:
    gone = perturb_auxiliary(tiny, -1.0, seed=0, behaviors=["cart"])
    with pytest.raises(DataError, match="no pairs"):
        write_generic(gone, tmp_path / "g")
    assert not (tmp_path / "g").exists()
