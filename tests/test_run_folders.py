"""Run folders you can trust: every case of the "run folders" issue ends in one line and exit
code 2 (or succeeds where it should), never in a traceback or a silently wrong answer.

The before/after table of these cases is in ``docs/run-folders.md``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from mbrec.cli.main import main
from mbrec.config import build_config
from mbrec.errors import MbrecError, NonFiniteError
from mbrec.rundir import RunFolder
from mbrec.train import train


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``mbrec ARGV`` run in-process; asserts no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in synthetic data in the generic format (with users.txt/items.txt)."""
    out = tmp_path_factory.mktemp("data") / "syn"
    assert main(["convert", "synthetic", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """A finished 2-epoch LightGCN run on ``dataset``."""
    run = tmp_path_factory.mktemp("runs") / "done"
    assert main(["train", "lightgcn", str(dataset), "--epochs", "2", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture
def run_copy(tmp_path: Path, finished: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _data_copy(tmp_path: Path, dataset: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(dataset, dst)
    return dst


# -- 1. the data or the config changed under the run folder ---------------------------------------
def test_changed_data_is_refused_by_evaluate_recommend_and_resume(tmp_path, capsys, dataset, finished) -> None:
    data = _data_copy(tmp_path, dataset)
    run = tmp_path / "run"
    assert main(["train", "lightgcn", str(data), "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    users = (data / "users.txt").read_text().splitlines()
    (data / "users.txt").write_text("\n".join(users[1:] + users[:1]) + "\n")  # one line rotated
    for argv in (["evaluate", str(run)], ["recommend", str(run), "--user", "u3"],
                 ["train", "lightgcn", str(data), "--out", str(run), "--resume", "--epochs", "3"]):
        code, err = run_cli(capsys, *argv)
        assert code == 2 and "changed since it was trained" in err and "id maps" in err, err


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: None, "lacks model, data"),  # empty config.yaml
        (lambda raw: {k: v for k, v in raw.items() if k != "model_args"}, "lacks model_args"),
        (lambda raw: {**raw, "train": {**raw["train"], "lr": 0.5}}, "was changed after the run was trained"),
    ],
    ids=["empty", "no-model_args", "edited"],
)
def test_damaged_or_edited_config_is_an_error_not_defaults(run_copy, capsys, dataset, edit, message) -> None:
    cfg = run_copy / "config.yaml"
    new = edit(yaml.safe_load(cfg.read_text()))
    cfg.write_text("" if new is None else yaml.safe_dump(new, sort_keys=False))
    for argv in (["evaluate", str(run_copy)],
                 ["train", "lightgcn", str(dataset), "--out", str(run_copy), "--resume", "--epochs", "3"]):
        code, err = run_cli(capsys, *argv)
        assert code == 2 and message in err, err


# -- 2. --resume keeps the run's settings; one writer at a time ------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.lr=0.5", "--seed", "7"], "seed 0 -> 7; train.lr 0.001 -> 0.5"),
        (["--epochs", "1"], "may raise the epoch cap (2), not lower it to 1"),
        (["--protocol", "copf"], "protocol."),
        (["--set", "model_args.n_layers=2"], "model_args.n_layers 3 -> 2"),
    ],
    ids=["lr-seed", "lower-epochs", "protocol", "model-arg"],
)
def test_resume_refuses_flags_that_change_the_run(run_copy, capsys, dataset, extra, message) -> None:
    before = (run_copy / "config.yaml").read_text()
    code, err = run_cli(capsys, "train", "lightgcn", str(dataset), "--out", str(run_copy), "--resume", *extra)
    assert code == 2 and message in err, err
    assert (run_copy / "config.yaml").read_text() == before


def test_resume_refuses_another_model(run_copy, capsys, dataset) -> None:
    code, err = run_cli(capsys, "train", "rmbrec", str(dataset), "--out", str(run_copy), "--resume")
    assert code == 2 and "trains 'lightgcn', not 'rmbrec'" in err


def test_resume_may_raise_the_epoch_cap(run_copy, capsys, dataset) -> None:
    code, _ = run_cli(capsys, "train", "lightgcn", str(dataset), "--out", str(run_copy), "--resume", "--epochs", "3",
                      "--quiet")
    assert code == 0
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["epochs"] == 3
    assert main(["evaluate", str(run_copy)]) == 0  # the fingerprint follows the raised cap


def test_resume_with_a_config_naming_other_data_keeps_the_runs_data(tmp_path, capsys, dataset) -> None:
    """A config file's ``data:`` loses to the DATA argument on --resume as it does in a fresh run
    (a paper config reused on another split resumed on the config's dataset before)."""
    cfg = tmp_path / "other.yaml"
    cfg.write_text("model: lightgcn\ndata: crgcn-beibei\ntrain:\n  epochs: 2\n")
    run = tmp_path / "run"
    assert main(["train", "lightgcn", str(dataset), "--config", str(cfg), "--epochs", "1", "--out", str(run),
                 "--quiet"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(dataset)
    code, err = run_cli(capsys, "train", "lightgcn", str(dataset), "--config", str(cfg), "--out", str(run),
                        "--resume", "--epochs", "2", "--quiet")
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(dataset)


def test_a_second_writer_is_refused_at_once(run_copy, capsys, dataset) -> None:
    with RunFolder(run_copy).locked():
        code, err = run_cli(capsys, "train", "lightgcn", str(dataset), "--out", str(run_copy), "--resume",
                            "--epochs", "3")
    assert code == 2 and "being written by another mbrec process" in err
    assert main(["train", "lightgcn", str(dataset), "--out", str(run_copy), "--resume", "--epochs", "3", "--quiet"]) == 0


# -- 3. a run that fails before its first checkpoint -----------------------------------------------
def test_failure_before_the_first_checkpoint_leaves_nothing(tmp_path) -> None:
    cfg = build_config("lightgcn", "synthetic", overrides=["train.epochs=1"])
    cfg.train.lr = 1e30  # past the declared range: built in Python to reach the divergence itself
    with pytest.raises(NonFiniteError, match="nothing was kept"):
        train(cfg, tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


def test_remains_of_a_killed_first_epoch_are_reused(tmp_path, capsys, finished) -> None:
    run = tmp_path / "r"
    run.mkdir()
    for name in ("config.yaml", "train.log", "fingerprint.json"):  # what a kill in epoch 1 leaves
        shutil.copy(finished / name, run / name)
    code, err = run_cli(capsys, "train", "lightgcn", "synthetic", "--out", str(run), "--resume")
    assert code == 2 and "rerun the same command without --resume" in err
    code, _ = run_cli(capsys, "train", "lightgcn", "synthetic", "--epochs", "1", "--out", str(run), "--quiet")
    assert code == 0 and (run / "metrics.json").is_file()


def test_a_folder_with_other_files_is_not_reused(tmp_path, capsys) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "train", "lightgcn", "synthetic", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert code == 2 and "already exists and is not empty" in err
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


# -- 4. settings that mean nothing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-5"], "train.epochs = -5; allowed: >= 0"),
        (["--set", "model_args.embedding_dim=0"], "model_args.embedding_dim = 0; allowed: >= 1"),
        (["--set", "model_args.embedding_dim=-4"], "model_args.embedding_dim = -4; allowed: >= 1"),
        (["--set", "protocol.ks=[2.5]"], "protocol.ks = [2.5]"),
        (["--set", "protocol.ks=[100000]"], "K can be at most the number of items (400)"),
        (["--set", "protocol.ks=[a]"], "protocol.ks = ('a',)"),
        (["--set", "seed=abc"], "seed = 'abc'; allowed: a whole number"),
        (["--set", "model_args.batch_size=0"], "model_args.batch_size = 0; allowed: >= 1"),
        (["--set", "train.lr=-1"], "train.lr = -1.0; allowed: >= 0 and <= 100"),
        (["--set", "train.lr=1e38"], "train.lr = 1e+38; allowed: >= 0 and <= 100"),
    ],
    ids=["epochs", "dim0", "dim-4", "ks2.5", "ks-huge", "ks-a", "seed", "batch0", "lr-neg", "lr-huge"],
)
def test_bad_settings_are_one_line(tmp_path, capsys, argv, message) -> None:
    code, err = run_cli(capsys, "train", "lightgcn", "synthetic", "--out", str(tmp_path / "r"), *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_rmbrec_negative_temperature(tmp_path, capsys) -> None:
    code, err = run_cli(capsys, "train", "rmbrec", "synthetic", "--out", str(tmp_path / "r"),
                        "--set", "model_args.tau=-1")
    assert code == 2 and "model_args.tau = -1.0" in err


def test_evaluate_names_an_unknown_protocol_field(finished, capsys) -> None:
    code, err = run_cli(capsys, "evaluate", str(finished), "--set", "kss=[5]")
    assert code == 2 and "'kss' (did you mean 'ks'?)" in err


# -- 5. non-finite results ----------------------------------------------------------------------------
def test_non_finite_scores_stop_a_one_epoch_run(tmp_path) -> None:
    cfg = build_config("lightgcn", "synthetic", overrides=["train.epochs=1"])
    cfg.train.lr = 1e30
    with pytest.raises(NonFiniteError, match="non-finite"):
        train(cfg, tmp_path / "r", quiet=True)


def test_an_exploding_loss_is_warned_about(tmp_path) -> None:
    from mbrec.train import Trainer

    t = Trainer(build_config("lightgcn", "synthetic"), tmp_path / "r")
    t.state.history = [{"epoch": 1, "loss": 0.5}]
    warnings: list[str] = []
    t.log = type("L", (), {"warning": lambda self, m: warnings.append(m)})()
    t._warn_if_exploding(2, 0.6)
    t._warn_if_exploding(2, 1e3)
    t.state.history = []
    t._warn_if_exploding(1, 1e11)
    assert len(warnings) == 2 and "grew from 0.5 to 1000" in warnings[0] and "is 1e+11" in warnings[1]


# -- 6. no tracebacks --------------------------------------------------------------------------------
def test_recommend_k_and_row_count(finished, capsys, tmp_path) -> None:
    code, err = run_cli(capsys, "recommend", str(finished), "--user", "u1", "--k", "1000")
    assert code == 2 and "more than the 400 items" in err
    out = tmp_path / "rec.csv"
    assert main(["recommend", str(finished), "--users", "all", "--k", "400", "--out", str(out)]) == 0
    rows = len(out.read_text().splitlines()) - 1
    assert f"wrote {rows:,} rows" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["folder", "missing-folder"])
def test_recommend_out_must_be_a_writable_file(finished, capsys, tmp_path, where) -> None:
    out = tmp_path if where == "folder" else tmp_path / "nope" / "x.csv"
    code, err = run_cli(capsys, "recommend", str(finished), "--user", "u1", "--out", str(out))
    assert code == 2 and ("is a folder" in err or "does not exist" in err)


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_train_out_must_be_a_folder(tmp_path, capsys, where) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    out = f if where == "file" else f / "sub"
    code, err = run_cli(capsys, "train", "lightgcn", "synthetic", "--epochs", "1", "--out", str(out))
    assert code == 2 and ("is a file" in err or "cannot create run folder" in err), err


@pytest.mark.parametrize(
    "damage",
    [lambda p: p.write_bytes(p.read_bytes()[:100]), lambda p: p.write_bytes(b"")],
    ids=["truncated", "empty"],
)
@pytest.mark.parametrize("command", ["evaluate", "recommend"])
def test_damaged_best_pt(run_copy, capsys, damage: Callable[[Path], None], command: str) -> None:
    damage(run_copy / "best.pt")
    argv = [command, str(run_copy)] + (["--user", "u1"] if command == "recommend" else [])
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "best.pt is damaged or not a checkpoint" in err


def test_truncated_last_pt_on_resume(run_copy, capsys, dataset) -> None:
    last = run_copy / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    code, err = run_cli(capsys, "train", "lightgcn", str(dataset), "--out", str(run_copy), "--resume", "--epochs", "3")
    assert code == 2 and "last.pt is damaged or not a checkpoint" in err


def test_unreadable_data_is_one_line(capsys, monkeypatch, tmp_path) -> None:
    import mbrec.train

    def denied(cfg):  # noqa: ANN001 - a stand-in for a dataset the OS refuses to read (tests run as root)
        raise PermissionError(13, "Permission denied", "/data/interactions.csv")

    monkeypatch.setattr(mbrec.train, "load_data", denied)
    code, err = run_cli(capsys, "train", "lightgcn", "synthetic", "--out", str(tmp_path / "r"))
    assert code == 2 and err.strip() == "mbrec train: error: Permission denied: /data/interactions.csv"


def test_a_closed_pipe_ends_quietly(finished) -> None:
    cmd = f"{sys.executable} -m mbrec recommend {finished} --users all --k 20 | head -1"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.stdout == "user,behavior,rank,item,score\n" and done.stderr == ""


# -- 7. ambiguous tables ------------------------------------------------------------------------------
def test_csv_and_tsv_together_is_an_error(tmp_path, capsys, dataset) -> None:
    data = _data_copy(tmp_path, dataset)
    shutil.copy(data / "interactions.csv", data / "interactions.tsv")
    code, err = run_cli(capsys, "stats", str(data))
    assert code == 2 and "several interaction tables (interactions.csv, interactions.tsv)" in err


@pytest.mark.parametrize("sep, hint", [("\t", "rename it to interactions.tsv"), (";", "replace ';' by commas")])
def test_header_with_another_separator_gets_a_hint(tmp_path, capsys, sep, hint) -> None:
    (tmp_path / "interactions.csv").write_text(sep.join(["user", "item", "behavior"]) + "\n" + sep.join("ab") + sep + "buy\n")
    (tmp_path / "dataset.yaml").write_text("behaviors: [buy]\n")
    code, err = run_cli(capsys, "stats", str(tmp_path))
    assert code == 2 and hint in err


def test_mbrec_error_is_the_base_of_the_new_errors() -> None:
    assert issubclass(NonFiniteError, MbrecError)
