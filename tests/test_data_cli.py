"""`stats`, `convert`, `perturb` handlers through a tiny argparse parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mbrec.cli import data_cmds
from mbrec.data.registry import load_dataset
from mbrec.errors import DataError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_cmds.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_stats_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["stats", "synthetic", "--json", "--option", "n_users=80", "--option", "n_items=60"]) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)
    assert obj["users"] == 80 and set(obj["bar"]["all"]) == {"view", "cart"}
    assert out.count("\n") == 1


def test_stats_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["stats", "synthetic", "--option", "n_users=80"]) == 0
    out = capsys.readouterr().out
    assert "BAR(view)" in out and "patterns" in out


def test_convert_and_perturb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = ["--option", "n_users=80", "--option", "n_items=60"]
    assert run(["convert", "synthetic", str(tmp_path / "c"), *opts]) == 0
    base = load_dataset("synthetic", n_users=80, n_items=60)
    conv = load_dataset(tmp_path / "c")
    assert conv.counts() == base.counts()
    assert run(["perturb", str(tmp_path / "c"), str(tmp_path / "p"), "--ratio", "-0.5", "--seed", "3"]) == 0
    noisy = load_dataset(tmp_path / "p")
    assert noisy.train["view"].nnz == base.train["view"].nnz - round(0.5 * base.train["view"].nnz)
    assert noisy.train["buy"].nnz == base.train["buy"].nnz
    with pytest.raises(DataError, match="not empty"):
        run(["convert", "synthetic", str(tmp_path / "c")])


def test_bad_option_syntax() -> None:
    with pytest.raises(DataError, match="KEY=VALUE"):
        run(["stats", "synthetic", "--option", "n_users"])


def test_stats_plot_writes_png_and_keeps_json_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "stats.png"
    assert run(["stats", "synthetic", "--json", "--plot", str(png), "--option", "n_users=80"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["users"] == 80  # stdout is still exactly one JSON object
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out.err
