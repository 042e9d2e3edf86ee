"""Trainer: run folder contract, selection, early stopping, resume after interruption."""

from __future__ import annotations

import json

import pytest
import torch

from mbrec.config import build_config
from mbrec.errors import ConfigError, MbrecError
from mbrec.models.lightgcn import LightGCN
from mbrec.rundir import load_run
from mbrec.train import train
from conftest import tiny_data


def _cfg(*extra: str):
    # the tiny data have 15 items: K stays below that (K = 20 would rank every item)
    return build_config("lightgcn", "tiny", overrides=["model_args.batch_size=8", "train.patience=50", "protocol.ks=[5,10]", *extra])


def test_run_folder_contract(tmp_path, tiny):
    m = train(_cfg("train.epochs=3"), tmp_path / "run", data=tiny, quiet=True)
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.json", "train.log", "best.pt", "last.pt"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("model", "dataset", "seed", "protocol", "best_epoch", "epochs_run", "valid", "test",
                "train_seconds", "epoch_seconds_median", "eval_seconds", "device"):
        assert key in saved, key
    assert saved["test"]["buy"]["HR@10"] == pytest.approx(m["test"]["buy"]["HR@10"])
    assert saved["epochs_run"] == 3 and 1 <= saved["best_epoch"] <= 3
    assert saved["protocol"]["selection"] == "validation"
    log = (run / "train.log").read_text()
    assert log.count("epoch ") >= 3 and "bpr" in log


def test_refuses_to_overwrite_a_run(tmp_path, tiny):
    train(_cfg("train.epochs=1"), tmp_path / "run", data=tiny, quiet=True)
    with pytest.raises(MbrecError, match="already exists"):
        train(_cfg("train.epochs=1"), tmp_path / "run", data=tiny, quiet=True)


def test_same_seed_same_result(tmp_path, tiny):
    a = train(_cfg("train.epochs=2"), tmp_path / "a", data=tiny, quiet=True)
    b = train(_cfg("train.epochs=2"), tmp_path / "b", data=tiny, quiet=True)
    assert a["test"] == b["test"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny, monkeypatch):
    full = train(_cfg("train.epochs=5"), tmp_path / "full", data=tiny, quiet=True)

    calls = {"n": 0}
    original = LightGCN.loss

    def interrupted(self, graphs, batch):
        calls["n"] += 1
        if calls["n"] == 9:  # inside epoch 3 (4 batches of 8 per epoch on 31 pairs)
            raise KeyboardInterrupt
        return original(self, graphs, batch)

    monkeypatch.setattr(LightGCN, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg("train.epochs=5"), tmp_path / "cut", data=tiny, quiet=True)
    monkeypatch.setattr(LightGCN, "loss", original)
    resumed = train(_cfg("train.epochs=5"), tmp_path / "cut", data=tiny, resume=True, quiet=True)
    assert resumed["epochs_run"] == 5
    assert resumed["best_epoch"] == full["best_epoch"]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]])
    assert resumed["test"] == full["test"]


def test_early_stopping_uses_patience(tmp_path, tiny):
    m = train(_cfg("train.epochs=40", "train.patience=2", "train.min_epochs=0", "train.lr=0.0"), tmp_path / "r", data=tiny, quiet=True)
    # lr 0: nothing improves after epoch 1, so the run stops at epoch 1 + patience + 1
    assert m["best_epoch"] == 1
    assert m["epochs_run"] == 4


def test_best_on_test_is_labelled(tmp_path, tiny):
    m = train(_cfg("train.epochs=2", "protocol=copf"), tmp_path / "r", data=tiny, quiet=True)
    assert m["protocol"]["selection"] == "test"
    assert "paper parity" in m["selection"]


def test_validation_selection_needs_a_validation_split(tmp_path, tiny):
    no_valid = tiny.replace(valid={})
    with pytest.raises(ConfigError, match="no validation"):
        train(_cfg("train.epochs=1"), tmp_path / "r", data=no_valid, quiet=True)


def test_staircase_lr_decay(tmp_path, tiny):
    cfg = _cfg("train.epochs=2", "train.lr_decay=0.5", "train.lr_decay_steps=2")
    train(cfg, tmp_path / "r", data=tiny, quiet=True)
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    # 8 steps: the last step ran with lr * 0.5 ** (7 // 2)
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5**3)


def test_load_run_rebuilds_the_model(tmp_path, monkeypatch, tiny):
    train(_cfg("train.epochs=1"), tmp_path / "r", data=tiny, quiet=True)
    import mbrec.rundir as r

    monkeypatch.setattr(r, "load_data", lambda cfg: tiny_data())
    cfg, data, model, graphs = load_run(tmp_path / "r")
    assert cfg.model == "lightgcn"
    assert model(graphs).shape[-1] == 64


def test_select_each_keeps_a_checkpoint_per_task(tmp_path, capsys):
    """``select_behavior: each``: every behavior is reported at its own best validation epoch, from
    its own checkpoint; the picks agree with `mbrec reselect` on the same history."""
    from mbrec.reselect import reselect
    from mbrec.rundir import load_data, task_checkpoint

    cfg = build_config("lightgcn", "synthetic", overrides=[
        "data_options.n_users=150", "data_options.n_items=120", "model_args.mode=per_behavior", "protocol=mmr", "protocol.select_behavior=each",
        "train.epochs=10", "train.patience=0", "train.test_every_eval=true", "train.lr=0.05"])
    run = tmp_path / "run"
    data = load_data(cfg)
    m = train(cfg, run, data=data, quiet=True)
    picks = reselect(m, "each")
    assert m["best_epochs"] == picks.epochs and len(set(picks.epochs.values())) > 1  # tasks peak apart
    for b, epoch in picks.epochs.items():
        assert task_checkpoint(run, b).is_file()
        # the final metrics of each task are its metrics at its own epoch, recomputed from its checkpoint
        assert m["test"][b]["NDCG@5"] == pytest.approx(picks.test[b]["NDCG@5"], abs=1e-6)
        assert m["valid"][b]["NDCG@5"] == pytest.approx(picks.valid[b]["NDCG@5"], abs=1e-6)
    assert m["best_epoch"] == picks.epochs[data.target]
    assert "own selected epoch" in m["selection"]
    # best.pt is the target's checkpoint; load_run(behavior=B) loads B's
    target_w = torch.load(task_checkpoint(run, data.target))
    assert all(torch.equal(target_w[k], v) for k, v in torch.load(run / "best.pt").items())
    other = next(b for b in picks.epochs if picks.epochs[b] != picks.epochs[data.target])
    _, _, model, _ = load_run(run, behavior=other)
    own = torch.load(task_checkpoint(run, other))
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())
    # `mbrec evaluate` reproduces the per-task numbers of metrics.json
    from mbrec.cli.main import main

    assert main(["evaluate", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for b in picks.epochs:
        assert out["test"][b]["NDCG@5"] == pytest.approx(m["test"][b]["NDCG@5"], abs=1e-6)


def test_select_each_patience_waits_for_every_task(tmp_path):
    from mbrec.data.synthetic import load_builtin
    from mbrec.reselect import reselect

    data = load_builtin("synthetic", seed=0, n_users=150, n_items=120)
    over = ["model_args.mode=per_behavior", "protocol=mmr", "protocol.select_behavior=each",
            "train.epochs=30", "train.patience=2", "train.min_epochs=0", "train.test_every_eval=true", "train.lr=0.05"]
    m = train(build_config("lightgcn", "synthetic", overrides=over), tmp_path / "run", data=data, quiet=True)
    last_gain = max(m["best_epochs"].values())
    assert m["epochs_run"] == last_gain + 3 < 30  # stopped 3 epochs after the last task improved
    assert reselect(m, "each", patience=2).epochs == m["best_epochs"]
