"""The command line: train -> evaluate -> recommend on the built-in synthetic dataset."""

from __future__ import annotations

import csv
import json

import pytest

from mbrec.cli.main import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "lightgcn", "synthetic", "--epochs", "2", "--out", str(out), "--quiet",
                 "--set", "model_args.n_layers=1"])
    assert code == 0
    return out


def test_train_writes_run_and_prints_table(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "lightgcn" and metrics["epochs_run"] == 2
    assert 0.0 <= metrics["test"]["buy"]["HR@10"] <= 1.0


def test_evaluate_json_under_another_protocol(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--protocol", "copf", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"]["hr"] == "hits_per_user"
    assert set(out["test"]["buy"]) >= {"HR@10", "NDCG@10"}
    assert main(["evaluate", str(run_dir)]) == 0
    assert "HR@10" in capsys.readouterr().out


def test_recommend_uses_dataset_ids_and_excludes_training_items(run_dir, tmp_path, capsys):
    from mbrec.data.registry import load_dataset

    data = load_dataset("synthetic")
    user = data.user_ids[3]
    out = tmp_path / "rec.csv"
    assert main(["recommend", str(run_dir), "--user", str(user), "--k", "15", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == [str(k) for k in range(1, 16)]
    assert {r["user"] for r in rows} == {str(user)}
    seen = set(data.item_ids[data.train["buy"][3].indices].tolist())
    assert not seen & {r["item"] for r in rows}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_recommend_unknown_user_is_a_clear_error(run_dir, capsys):
    assert main(["recommend", str(run_dir), "--user", "no-such-user"]) == 2
    err = capsys.readouterr().err
    assert "unknown user 'no-such-user'" in err and "Traceback" not in err


def test_recommend_unknown_behavior_is_a_clear_error(run_dir, capsys):
    assert main(["recommend", str(run_dir), "--user", "x", "--behavior", "teleport"]) == 2
    assert "unknown behavior" in capsys.readouterr().err


def test_models_lists_lightgcn(capsys):
    assert main(["models"]) == 0
    assert "lightgcn" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(capsys, tmp_path):
    assert main(["train", "lightgcn", "synthetic", "--set", "train.epochz=1", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_threads_flag_sets_torch_threads_and_rejects_zero(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "models"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["--threads", "0", "models"]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_models_lists_one_models_options(capsys) -> None:
    from mbrec.cli.main import main

    assert main(["models", "lightgcn"]) == 0
    out = capsys.readouterr().out
    assert "embedding_dim" in out and "default 64" in out and ">= 1" in out
    assert main(["models", "no-such-model"]) == 2
