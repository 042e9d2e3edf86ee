"""The four shared datasets load with exactly the counts of ../shared/datasets/README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbrec.data.registry import load_dataset
from mbrec.data.stats import compute_stats

pytestmark = pytest.mark.realdata

EXPECTED = {
    # spec: (users, items, train per behavior, valid per behavior, test per behavior)
    "crgcn-beibei": (21716, 7977, {"view": 2412586, "cart": 642622, "buy": 261144},
                     {"buy": 21716}, {"buy": 21716}),
    "hkuds-beibei": (21716, 7977, {"pv": 2412586, "cart": 642622, "buy": 282860},
                     {}, {"buy": 21716}),
    "mule-taobao": (15449, 11953, {"view": 873954, "cart": 195476, "buy": 76731},
                    {"buy": 15449}, {"buy": 15449}),
    "mule-taobao/pkef_pickles": (15449, 11953, {"pv": 873954, "cart": 195476, "buy": 92180},
                                 {}, {"buy": 15449}),
    "bvae-jd": (10690, 13465, {"click": 217977, "favourite": 7380, "purchase": 60967},
                {"click": 20059, "favourite": 955, "purchase": 5892},
                {"click": 15967, "favourite": 954, "purchase": 5013}),
}


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_counts(shared_datasets: Path, spec: str) -> None:
    users, items, train, valid, test = EXPECTED[spec]
    d = load_dataset(shared_datasets / spec)
    assert (d.n_users, d.n_items) == (users, items)
    assert tuple(d.behaviors) == tuple(train)
    c = d.counts()
    assert c["train"] == train
    assert c["valid"] == {b: valid.get(b, 0) for b in d.behaviors}
    assert c["test"] == {b: test.get(b, 0) for b in d.behaviors}


def test_mule_taobao_ignore_policy(shared_datasets: Path) -> None:
    d = load_dataset(shared_datasets / "mule-taobao", valid_policy="ignore")
    assert d.train["buy"].nnz == 92180 and d.valid["buy"].nnz == 0
    assert "ignore" in d.description


def test_jd_keep_empty(shared_datasets: Path) -> None:
    d = load_dataset(shared_datasets / "bvae-jd", keep_empty=True)
    assert d.behaviors == ("click", "favourite", "cart", "purchase")
    assert d.counts()["valid"]["cart"] == 3967 and d.counts()["test"]["cart"] == 2617


@pytest.mark.parametrize(
    "spec, bar, dt",
    [
        ("crgcn-beibei", {"view": 0.9756, "cart": 0.9731}, 0.0244),
        ("mule-taobao", {"view": 0.8131, "cart": 0.2094}, 0.1530),
        ("bvae-jd", {"click": 0.6987, "favourite": 0.0540}, 0.2989),
    ],
)
def test_reference_statistics(shared_datasets: Path, spec: str, bar: dict, dt: float) -> None:
    s = compute_stats(load_dataset(shared_datasets / spec))
    for b, v in bar.items():
        assert s["bar"]["all"][b] == pytest.approx(v, abs=5e-5)
    assert s["dt"]["all"] == pytest.approx(dt, abs=5e-5)
    if spec == "crgcn-beibei":  # over training pairs only: 1.0, 1.0, 0.0 (README)
        assert s["bar"]["train"] == {"view": 1.0, "cart": 1.0} and s["dt"]["train"] == 0.0


def test_by_name_under_datasets_root(shared_datasets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBREC_DATASETS", str(shared_datasets))
    d = load_dataset("mule-taobao/pkef_pickles")
    assert d.name == "mule-taobao/pkef_pickles" and d.behaviors == ("pv", "cart", "buy")
