"""``mbrec.reselect``: selection rules replayed on a hand-written history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbrec.cli.main import main
from mbrec.errors import MbrecError
from mbrec.reselect import reselect


def _m(a: float, b: float) -> dict[str, dict[str, float]]:
    return {"click": {"NDCG@5": a}, "purchase": {"NDCG@5": b}}


def _metrics() -> dict:
    """Evaluations at epochs 2, 4, 6, 8 (odd epochs are training only). Validation, by hand:

    epoch  click  purchase  sum
      2    .30    .10       .40
      4    .20    .25       .45
      6    .10    .20       .30
      8    .05    .40       .45   (ties the sum of epoch 4: not an improvement)
    Test is validation + .01 on click and + .02 on purchase, so every pick is recognisable."""
    valid = {2: _m(.30, .10), 4: _m(.20, .25), 6: _m(.10, .20), 8: _m(.05, .40)}
    history = []
    for epoch in range(1, 9):
        h: dict = {"epoch": epoch, "loss": 1.0 / epoch}
        if epoch in valid:
            v = valid[epoch]
            h["valid"] = v
            h["test"] = _m(v["click"]["NDCG@5"] + .01, v["purchase"]["NDCG@5"] + .02)
        history.append(h)
    return {"target": "purchase", "protocol": {"select_metric": "NDCG@5"}, "history": history}


def test_rules_pick_the_hand_computed_epochs() -> None:
    m = _metrics()
    s = reselect(m, "target")
    assert s.epochs == {"click": 8, "purchase": 8}
    assert s.test["purchase"]["NDCG@5"] == pytest.approx(.42) and s.test["click"]["NDCG@5"] == pytest.approx(.06)
    s = reselect(m, "sum")  # .45 at epoch 4; epoch 8's equal sum is not strictly better
    assert s.epochs == {"click": 4, "purchase": 4} and s.test["click"]["NDCG@5"] == pytest.approx(.21)
    s = reselect(m, "each")  # each task at its own best epoch
    assert s.epochs == {"click": 2, "purchase": 8}
    assert s.test["click"]["NDCG@5"] == pytest.approx(.31) and s.test["purchase"]["NDCG@5"] == pytest.approx(.42)
    s = reselect(m, "click")  # one behavior's metric picks the epoch for all
    assert s.epochs == {"click": 2, "purchase": 2} and s.test["purchase"]["NDCG@5"] == pytest.approx(.12)
    s = reselect(m, "target", on="test")
    assert s.epochs["purchase"] == 8 and "TEST" in s.notes[0]


def test_patience_replays_the_trainers_early_stop() -> None:
    m = _metrics()
    # target: best at 4 (.25); epoch 6 does not improve; 7 - 4 = 3 > 2 -> stops after epoch 7
    s = reselect(m, "target", patience=2)
    assert s.stopped_early and s.last_epoch == 7 and s.epochs["purchase"] == 4
    assert reselect(m, "target", patience=4).epochs["purchase"] == 8  # 8 - 4 = 4, not > 4
    # each: stops only once no task has improved for > patience epochs
    s = reselect(m, "each", patience=2)
    assert s.last_epoch == 7 and s.epochs == {"click": 2, "purchase": 4}


def test_errors_say_what_is_missing() -> None:
    m = _metrics()
    del m["history"][3]["test"]  # epoch 4 evaluated without test
    with pytest.raises(MbrecError, match=r"3 of 4 evaluations.*test_every_eval"):
        reselect(m, "target", where="runs/x")
    with pytest.raises(MbrecError, match="unknown rule 'favourite'"):
        reselect(_metrics(), "favourite")
    with pytest.raises(MbrecError, match=r"metric 'HR@5' is not recorded"):
        reselect(_metrics(), "target", "HR@5")
    with pytest.raises(MbrecError, match="no per-epoch history"):
        reselect({"target": "purchase"}, "target", "NDCG@5")


def _write_seeds(folder: Path, shifts: tuple[float, ...]) -> None:
    """seed<k>/metrics.json under ``folder``: the hand history with test purchase + shifts[k]."""
    for seed, shift in enumerate(shifts):
        run = folder / f"seed{seed}"
        run.mkdir(parents=True)
        m = _metrics()
        for h in m["history"]:
            if "test" in h:
                h["test"]["purchase"]["NDCG@5"] += shift
        (run / "metrics.json").write_text(json.dumps(m))


def test_cli_groups_seed_folders_with_mean_and_std(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_seeds(tmp_path / "BiGEL", (0.0, 0.02))
    assert main(["reselect", str(tmp_path / "BiGEL" / "seed0"), str(tmp_path / "BiGEL" / "seed1"),
                 "--rule", "target"]) == 0
    out = capsys.readouterr().out
    assert "| BiGEL | seed0 | 8 | 0.0600 | 0.4200 |" in out
    assert "| BiGEL | seed1 | 8 | 0.0600 | 0.4400 |" in out
    # mean .43, sample std of (.42, .44) = .0141
    assert "**0.4300** ± 0.0141" in out
    # a second model with the same seeds: paired t-test against the reference group
    _write_seeds(tmp_path / "Other", (0.01, 0.04))
    seeds = [str(p) for p in sorted(tmp_path.glob("*/seed*"))]
    assert main(["reselect", *seeds, "--rule", "target", "--reference", "BiGEL"]) == 0
    out = capsys.readouterr().out
    # purchase differences (.01, .02): mean .015, sd .00707, t = 3, df 1 -> p = 0.2048
    assert "**0.4450** ± 0.0212 (p 0.205)" in out
    # click is identical in both groups: t = 0, p = 1
    assert "**0.0600** ± 0.0000 (p 1.000)" in out
    assert main(["reselect", *seeds, "--reference", "Nope"]) == 2
    assert "reference 'Nope' is not one of the groups" in capsys.readouterr().err
    assert main(["reselect", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
