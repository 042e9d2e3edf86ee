"""The default torch thread count (``mbrec.threads``) and ``mbrec --threads N``."""

from __future__ import annotations

import pytest
import torch

from mbrec import threads
from mbrec.cli.main import main
from mbrec.threads import MAX_THREADS, default_threads


@pytest.fixture
def keep_torch_threads():
    """Every test here may change torch's process-wide count: put it back afterwards."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in threads.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# -- the rule ---------------------------------------------------------------------------------
def test_env_var_wins_over_cpus_load_and_cap():
    assert default_threads({"OMP_NUM_THREADS": "3"}, cpus=2, load=5.0) == 3
    assert default_threads({"OMP_NUM_THREADS": "16"}, cpus=64, load=0.0) == 16  # no cap on the user's choice
    assert default_threads({"MKL_NUM_THREADS": "2"}, cpus=8, load=7.0) == 2
    assert default_threads({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "4"}, cpus=8, load=0.0) == 1


@pytest.mark.parametrize("value", ["", "0", "-2", "two", "1.5"])
def test_unusable_env_values_are_ignored(value):
    assert default_threads({"OMP_NUM_THREADS": value}, cpus=4, load=0.0) == 4
    assert default_threads({"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": "3"}, cpus=4, load=0.0) == 3


def test_load_reduces_the_count_but_never_below_one():
    assert default_threads({}, cpus=2, load=0.1) == 2
    assert default_threads({}, cpus=2, load=0.9) == 1  # another job: one thread
    assert default_threads({}, cpus=4, load=1.2) == 3
    assert default_threads({}, cpus=4, load=2.6) == 1
    assert default_threads({}, cpus=2, load=24.0) == 1
    assert default_threads({}, cpus=1, load=0.0) == 1


def test_cap_applies_after_the_load():
    assert default_threads({}, cpus=64, load=0.0) == MAX_THREADS
    assert default_threads({}, cpus=64, load=10.0) == MAX_THREADS  # 54 free CPUs: still the cap
    assert default_threads({}, cpus=12, load=6.0) == 6
    assert default_threads({}, cpus=16, load=0.0, cap=4) == 4


def test_defaults_read_this_process(no_thread_env, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 6)
    monkeypatch.setattr(threads, "load_average", lambda: 2.2)
    assert default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert default_threads() == 5


def test_usable_cpus_and_cgroup_quota(tmp_path):
    assert 1 <= threads.usable_cpus()
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads._cgroup_cpus(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpus(tmp_path) is None
    assert threads._cgroup_cpus(tmp_path / "absent") is None


# -- the command line ---------------------------------------------------------------------------
def test_threads_flag_sets_torch_count(keep_torch_threads, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(3)
    # a command that evaluates, on a run folder that does not exist: fails after the threads are set
    assert main(["--threads", "1", "evaluate", str(tmp_path / "no-run")]) == 2
    assert torch.get_num_threads() == 1


def test_training_commands_get_the_default(keep_torch_threads, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(3)
    assert main(["evaluate", str(tmp_path / "no-run")]) == 2
    assert torch.get_num_threads() == 2
    assert "thread" not in capsys.readouterr().err  # nothing printed about it


def test_other_commands_leave_the_count_alone(keep_torch_threads, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(3)
    assert main(["models"]) == 0
    assert torch.get_num_threads() == 3


def test_invalid_threads_is_refused_with_a_message(keep_torch_threads, capsys):
    assert main(["--threads", "0", "train", "lightgcn", "synthetic"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_train_logs_the_thread_count(keep_torch_threads, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--threads", "1", "train", "lightgcn", "synthetic", "--epochs", "1", "--out", str(out), "--quiet",
                 "--set", "model_args.n_layers=1"]) == 0
    log = (out / "train.log").read_text()
    assert "parameters, device cpu, seed 0, 1 threads" in log
