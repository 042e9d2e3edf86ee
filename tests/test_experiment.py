"""Experiments: spec loading and errors, resumable runner, aggregation and the paired t-test
(hand-computed), noise / sweep summaries, plots, Optuna study continuation.

Runs use the built-in synthetic data shrunk to 60 users x 50 items and LightGCN with one layer,
one epoch."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

import mbrec.train
from mbrec.cli.main import main
from mbrec.errors import ConfigError, MbrecError
from mbrec.experiment import aggregate, load_spec, paired_t_test, run_experiment, spec_from_dict
from mbrec.experiment.spec import expand

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"train.epochs": 1, "train.patience": 0, "data_options.n_users": 60, "data_options.n_items": 50,
        "model_args.embedding_dim": 8, "model_args.n_layers": 1}


def tiny_spec(tmp_path: Path, **extra: object) -> Path:
    raw = {
        "name": "t",
        "seeds": [0, 1],
        "reference": "lightgcn",
        "metrics": ["HR@10", "NDCG@10"],
        "set": dict(TINY),
        "datasets": [{"name": "synthetic", "label": "Syn"}],
        "models": [{"name": "lightgcn", "model": "lightgcn", "config": "none"},
                   {"name": "merged", "model": "lightgcn", "config": "none", "set": {"model_args.mode": "merged"}}],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def count_train(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Counts calls of ``mbrec.train.train`` (the runner imports it at call time); records ``resume``."""
    calls: list[bool] = []
    real = mbrec.train.train

    def counting(cfg, out_dir=None, *, data=None, resume=False, quiet=False):  # type: ignore[no-untyped-def]
        calls.append(resume)
        return real(cfg, out_dir, data=data, resume=resume, quiet=quiet)

    monkeypatch.setattr(mbrec.train, "train", counting)
    return calls


# -- the paired t-test and aggregation, by hand ----------------------------------------------
def test_paired_t_test_by_hand() -> None:
    # d = [.01, .02, .01, .02]: mean .015, sd (ddof 1) = sqrt(4 * .005^2 / 3), t = .015 / (sd / 2) = 3 sqrt(3)
    t, p = paired_t_test([0.10, 0.12, 0.11, 0.13], [0.09, 0.10, 0.10, 0.11])
    assert t == pytest.approx(3 * math.sqrt(3))
    # Student t with 3 df: F(t) = 1/2 + (t / (sqrt(3)(1 + t^2/3)) + atan(t / sqrt(3))) / pi;
    # t / sqrt(3) = 3, so F = 1/2 + (0.3 + atan 3) / pi and p = 2 (1 - F)
    p_hand = 2 * (0.5 - (0.3 + math.atan(3.0)) / math.pi)
    assert p == pytest.approx(p_hand, rel=1e-9)
    assert p == pytest.approx(0.013847, abs=1e-6)
    assert paired_t_test([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)  # no difference at all
    assert paired_t_test([2, 3, 4], [1, 2, 3])[1] == 0.0  # constant non-zero difference
    assert all(math.isnan(v) for v in paired_t_test([1.0], [0.5]))  # one pair: no test


def test_aggregate_by_hand() -> None:
    values = {
        ("ref", "D", "HR@10"): {0: 0.20, 1: 0.22, 2: 0.24},
        ("a", "D", "HR@10"): {0: 0.10, 1: 0.11, 2: 0.15},
        ("b", "D", "HR@10"): {0: 0.18, 1: 0.21, 2: 0.21},
    }
    table = aggregate(values, ["a", "b", "ref"], [("D", "HR@10")], reference="ref")
    ref = table.cell("ref", ("D", "HR@10"))
    assert ref is not None and ref.mean == pytest.approx(0.22) and ref.std == pytest.approx(0.02) and ref.n == 3
    a = table.cell("a", ("D", "HR@10"))
    assert a is not None and a.mean == pytest.approx(0.12)
    # a - ref = [-.10, -.11, -.09]: mean -.10, sd .01, t = -.10 / (.01 / sqrt 3) = -10 sqrt 3
    assert a.t == pytest.approx(-10 * math.sqrt(3))
    assert a.mark == "**"  # 2 df, |t| = 17.3: p = 0.0033
    b = table.cell("b", ("D", "HR@10"))
    # b - ref = [-.02, -.01, -.03]: t = -.02 / (.01 / sqrt 3) = -2 sqrt 3, p = 0.074 (not significant)
    assert b is not None and b.t == pytest.approx(-2 * math.sqrt(3)) and b.mark == ""
    # improvement row: (0.22 - best other 0.2) / 0.2 = +10%, against row b, not significant
    imp, best, p = table.improvement[("D", "HR@10")]
    assert imp == pytest.approx(0.10) and best == "b" and p == pytest.approx(b.p)
    md = table.to_markdown()
    assert "| a | 0.1200 ± 0.0265\\*\\* |" in md
    assert "| **ref** | **0.2200 ± 0.0200** |" in md
    assert "| Improv. | +10.00% |" in md
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[0][:4] == ["model", "D HR@10 mean", "D HR@10 std", "D HR@10 n"]
    assert rows[1][0] == "a" and float(rows[1][1]) == pytest.approx(0.12) and rows[1][5] == "**"
    assert rows[-1][0] == "Improv." and float(rows[-1][1]) == pytest.approx(0.10)


# -- spec errors -------------------------------------------------------------------------------
def test_spec_errors_are_clear(tmp_path: Path) -> None:
    base = {"name": "x", "datasets": ["nowhere-data"], "models": ["lightgcn"], "config_dir": str(tmp_path / "cfg")}
    spec = spec_from_dict(base)
    with pytest.raises(ConfigError, match=r"needs the config file .*lightgcn/nowhere-data\.yaml.*config: none"):
        expand(spec, tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown key"):
        spec_from_dict({**base, "seed": 3})
    # `{name: BiGEL (layers 3,3,3), model: bigel}` in YAML: the comma splits the unquoted name and
    # leaves integer keys, which once crashed the message itself (sorted() of str and int)
    flow = yaml.safe_load("models: [{name: BiGEL (layers 3,3,3), model: bigel}]")["models"]
    with pytest.raises(ConfigError, match=r"models\[0\]: unknown key\(s\) 3, '3\)'.*quote that value"):
        spec_from_dict({**base, "models": flow})
    with pytest.raises(ConfigError, match="reference 'copf' is not a model row"):
        spec_from_dict({**base, "reference": "copf"})
    with pytest.raises(ConfigError, match="duplicate model name"):
        spec_from_dict({**base, "models": ["lightgcn", "lightgcn"]})
    with pytest.raises(ConfigError, match="'models' must be a non-empty list"):
        spec_from_dict({**base, "models": []})
    with pytest.raises(ConfigError, match="seeds"):
        spec_from_dict({**base, "seeds": [1, 1]})
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    # a bad override names the row and the dataset
    bad = spec_from_dict({**base, "models": [{"name": "r", "model": "lightgcn", "config": "none",
                                              "set": {"model_args.n_layerz": 2}}]})
    with pytest.raises(ConfigError, match=r"row 'r' on 'nowhere-data'.*n_layerz.*did you mean 'n_layers'"):
        expand(bad, tmp_path / "out")



def test_spec_protocol_override_refines_a_config_preset_given_by_name(tmp_path: Path) -> None:
    """A config file with ``protocol: mmr`` and a spec-level ``protocol.select_behavior: sum`` keep
    the mmr preset (this path once fell back to the default preset, unlike ``mbrec train --set``)."""
    cfg_dir = tmp_path / "cfg" / "lightgcn"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "synthetic.yaml").write_text("model: lightgcn\ndata: synthetic\nprotocol: mmr\n")
    spec = spec_from_dict({"name": "x", "datasets": ["synthetic"], "config_dir": str(tmp_path / "cfg"),
                           "set": {"protocol.select_behavior": "sum"},
                           "models": ["lightgcn", {"name": "k5", "model": "lightgcn", "set": {"protocol.ks": [5]}}]})
    plans = expand(spec, tmp_path / "out")
    assert [p.cfg.protocol.name for p in plans] == ["mmr", "mmr"]
    assert all(p.cfg.protocol.select_behavior == "sum" and p.cfg.protocol.mask == "behavior" for p in plans)
    assert plans[1].cfg.protocol.ks == (5,)

def test_paper_specs_resolve() -> None:
    """Every shipped spec expands (config files exist, overrides are valid model options)."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    specs = sorted(root.glob("*.yaml"))
    assert {"copf-table2.yaml", "copf-table3.yaml", "rmbrec-table2.yaml", "rmbrec-table3.yaml",
            "rmbrec-table5.yaml", "bigel-jd.yaml", "smoke.yaml"} <= {p.name for p in specs}
    for path in specs:
        spec = load_spec(path)
        plans = expand(spec, Path("/nonexistent-out"), epochs_cap=2)
        assert plans and all(p.cfg.train.epochs <= 2 for p in plans), path
        if spec.kind == "table" and path.name not in ("smoke.yaml", "rmbrec-adaptive.yaml", "noconfig.yaml"):  # not paper tables
            assert len(spec.seeds) == 5, path


# -- running, skipping, resuming ----------------------------------------------------------------
def test_experiment_resumes_and_skips(tmp_path: Path, count_train: list[bool]) -> None:
    spec = load_spec(tiny_spec(tmp_path))
    out = tmp_path / "exp"
    outcomes, folder = run_experiment(spec, out, log=lambda s: None)
    assert len(count_train) == 4 and not any(count_train)
    for name in ("table.md", "table.csv", "runs.csv", "spec.yaml"):
        assert (folder / name).stat().st_size > 0
    md = (folder / "table.md").read_text()
    assert "| Model | Syn HR@10 | Syn NDCG@10 |" in md and "| Improv." in md

    # all finished: nothing is trained again, the table is identical
    count_train.clear()
    run_experiment(spec, out, log=lambda s: None)
    assert count_train == []
    assert (folder / "table.md").read_text() == md

    # an interrupted run (last.pt, no metrics.json) resumes; a run killed before its first
    # checkpoint (config.yaml only) restarts; the other two are skipped
    run_a = out / "runs" / "synthetic" / "merged" / "seed1"
    (run_a / "metrics.json").unlink()
    run_b = out / "runs" / "synthetic" / "lightgcn" / "seed0"
    for f in run_b.iterdir():
        if f.name != "config.yaml":
            f.unlink()
    count_train.clear()
    outcomes, _ = run_experiment(spec, out, log=lambda s: None)
    assert sorted(count_train) == [False, True]
    assert [o.status for o in outcomes].count("skipped") == 2
    assert (folder / "table.md").read_text() == md  # same seeds, same numbers

    # a raised epoch cap extends the runs that reached the old one (patience 0: all four) from
    # last.pt; the result is that of a fresh run with the new cap
    count_train.clear()
    outcomes, _ = run_experiment(load_spec(tiny_spec(tmp_path, set={**TINY, "train.epochs": 2})), out,
                                 log=lambda s: None)
    assert count_train == [True] * 4 and all(o.metrics["epochs_run"] == 2 for o in outcomes)
    fresh = mbrec.train.train(outcomes[0].plan.cfg, tmp_path / "fresh", quiet=True)
    assert fresh["test"] == outcomes[0].metrics["test"]
    # a lowered cap would mix stale numbers: refused with the differing key
    with pytest.raises(MbrecError, match=r"train\.epochs: 2 -> 1"):
        run_experiment(spec, out, log=lambda s: None)


def test_cli_experiment_dry_run_and_epoch_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              count_train: list[bool]) -> None:
    spec = tiny_spec(tmp_path, set={**TINY, "train.epochs": 50})
    assert main(["experiment", str(spec), "--out", str(tmp_path / "o"), "--epochs", "1", "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 done, 0 to resume, 2 new (dry run)" in out and "1 epochs" in out
    assert count_train == []
    assert main(["experiment", str(spec), "--out", str(tmp_path / "o"), "--epochs", "1", "--seeds", "1"]) == 0
    assert len(count_train) == 2
    assert "| **lightgcn** |" in capsys.readouterr().out
    cfg = yaml.safe_load((tmp_path / "o" / "runs" / "synthetic" / "lightgcn" / "seed0" / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 1
    assert main(["experiment", str(tmp_path / "nope.yaml")]) == 2
    assert "experiment spec not found" in capsys.readouterr().err
    # "0" is a count of zero seeds; one seed is named with a trailing comma
    assert main(["experiment", str(spec), "--seeds", "0", "--dry-run"]) == 2
    assert "write it with a comma: '0,'" in capsys.readouterr().err
    assert main(["experiment", str(spec), "--out", str(tmp_path / "o"), "--seeds", "1,", "--dry-run"]) == 0
    assert "seed 1:" in capsys.readouterr().out


def test_rows_split_an_experiment_and_the_full_spec_reuses_them(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 count_train: list[bool]) -> None:
    spec, out = tiny_spec(tmp_path), str(tmp_path / "o")
    assert main(["experiment", str(spec), "--out", out, "--rows", "merged", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "2 runs: 0 done, 0 to resume, 2 new" in listed and "lightgcn on" not in listed
    assert main(["experiment", str(spec), "--out", out, "--rows", "merged"]) == 0
    table = capsys.readouterr().out
    assert len(count_train) == 2 and "| merged |" in table and "lightgcn |" not in table
    # the reference row was not selected: no t-test marks against it, and no error
    assert main(["experiment", str(spec), "--out", out]) == 0
    assert len(count_train) == 4  # only the lightgcn rows were trained
    full = capsys.readouterr().out
    assert "| **lightgcn** |" in full and "merged" in full
    assert main(["experiment", str(spec), "--rows", "merged,nope", "--dry-run"]) == 2
    assert "no model row named ['nope']" in capsys.readouterr().err


def test_datasets_select_columns_and_name_the_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path, datasets=[{"name": "synthetic", "label": "Syn"},
                                         {"name": "other", "label": "Other", "data": "synthetic"}])
    out = str(tmp_path / "o")
    assert main(["experiment", str(spec), "--out", out, "--datasets", "other", "--rows", "merged", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "2 runs: 0 done, 0 to resume, 2 new" in listed
    assert "on other" in listed and "on synthetic" not in listed
    assert main(["experiment", str(spec), "--datasets", "other,nope", "--dry-run"]) == 2
    assert "no dataset named ['nope']; datasets: ['synthetic', 'other']" in capsys.readouterr().err


# -- noise, sweep, plots, tune ------------------------------------------------------------------
def test_noise_command_writes_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    rc = main(["noise", "lightgcn", "--data", "synthetic", "--ratios=-50%,0.5", "--out", str(tmp_path / "n"),
               "--set", "model_args.mode=merged", *sets])
    assert rc == 0
    out = tmp_path / "n"
    png = (out / "noise-synthetic-HR_10.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    rows = list(csv.DictReader(io.StringIO((out / "noise-synthetic-HR_10.csv").read_text())))
    assert [float(r["ratio"]) for r in rows] == [-0.5, 0.0, 0.5]
    assert float(rows[1]["relative_change"]) == 0.0
    assert "| Model | -50% | clean | +50% |" in capsys.readouterr().out
    # the perturbed runs really saw other data: the removed share shows in the run's log
    log = (out / "runs" / "synthetic" / "lightgcn" / "noise-0.50" / "seed0" / "train.log").read_text()
    assert "Auxiliary perturbation (remove 50%" in log


def test_sweep_heatmap_and_line_plot(tmp_path: Path) -> None:
    from mbrec.experiment.plots import plot_sweep_line

    sets = [x for k, v in TINY.items() if k != "model_args.n_layers" for x in ("--set", f"{k}={v}")]
    assert main(["sweep", "lightgcn", "--data", "synthetic", "--param", "model_args.n_layers=1,2",
                 "--param", "train.lr=0.01", "--out", str(tmp_path / "s2"), *sets]) == 0
    heat = tmp_path / "s2" / "sweep-synthetic-HR_10-lightgcn.png"
    assert heat.read_bytes().startswith(PNG) and heat.stat().st_size > 1000
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s2" / "table.csv").read_text())))
    assert [r["model_args.n_layers"] for r in rows] == ["1", "2"] and {r["metric"] for r in rows} == {"HR@10"}
    # the sweep reads validation numbers by default: the table equals the runs' valid HR@10
    run = json.loads((tmp_path / "s2" / "runs" / "synthetic" / "lightgcn" / "n_layers=1_lr=0.01" / "seed0"
                      / "metrics.json").read_text())
    assert float(rows[0]["mean"]) == pytest.approx(run["valid"]["buy"]["HR@10"], abs=1e-6)
    line = plot_sweep_line("model_args.lambda_cl", [0.1, 1.0, 10.0],
                           {"a": [(0.1, 0.01), (0.2, 0.0), (0.15, 0.02)], "b": [(0.05, 0.0)] * 3},
                           tmp_path / "line.png", metric="HR@10")
    assert line.read_bytes().startswith(PNG) and line.stat().st_size > 1000


def test_plot_stats(tmp_path: Path) -> None:
    from mbrec.data.registry import load_dataset
    from mbrec.data.stats import compute_stats
    from mbrec.experiment.plots import plot_stats

    stats = compute_stats(load_dataset("synthetic", n_users=60, n_items=50))
    path = plot_stats(json.loads(json.dumps(stats)), tmp_path / "sub" / "stats.png")
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def test_tune_continues_its_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    args = ["tune", "lightgcn", "synthetic", "--param", "train.lr=float:1e-3:1e-1:log", "--trials", "1",
            "--metric", "HR@10", "--out", str(tmp_path / "t"), *sets]
    assert main(args) == 0
    assert main([*args[:5], "--trials", "1", *args[7:]]) == 0
    study = optuna.load_study(study_name="mbrec", storage=f"sqlite:///{tmp_path / 't' / 'study.db'}")
    assert len(study.trials) == 2
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert best["metric"] == "valid HR@10" and best["n_trials"] == 2
    assert "best valid HR@10" in capsys.readouterr().out
    # the objective is the validation metric of the trial's run, never test
    folder = Path(best["best_folder"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert best["best_value"] == pytest.approx(metrics["valid"]["buy"]["HR@10"])
    assert metrics["protocol"]["selection"] == "validation"


def test_behavior_columns_leave_unscored_behaviors_empty(tmp_path: Path) -> None:
    """``behavior: [buy, view]`` gives a column group per behavior; a row that scores only the
    target (no ``view`` metrics) gets empty view cells instead of an error."""
    from mbrec.experiment import collect_values, summarize_table
    from mbrec.experiment.runner import RunOutcome

    spec = spec_from_dict({"name": "b", "seeds": [0, 1], "reference": "multi", "metrics": ["HR@5"],
                           "behavior": ["buy", "view"], "datasets": [{"name": "d", "label": "D"}],
                           "models": [{"name": "multi", "model": "lightgcn", "config": "none"},
                                      {"name": "target", "model": "lightgcn", "config": "none"}]})
    plans = expand(spec, tmp_path)
    scores = {("multi", 0): {"buy": 0.3, "view": 0.5}, ("multi", 1): {"buy": 0.4, "view": 0.7},
              ("target", 0): {"buy": 0.2}, ("target", 1): {"buy": 0.2}}
    outcomes = [RunOutcome(p, "skipped", {"protocol": {"name": "mmr", "selection": "validation"},
                                          "test": {b: {"HR@5": v} for b, v in scores[(p.row, p.seed)].items()}})
                for p in plans]
    values = collect_values(spec, outcomes)
    assert values[("multi", "D view", "HR@5")] == {0: 0.5, 1: 0.7}
    assert ("target", "D view", "HR@5") not in values
    md = summarize_table(spec, outcomes, tmp_path).to_markdown()
    assert "| Model | D buy HR@5 | D view HR@5 |" in md
    assert "| target | 0.2000 ± 0.0000 | — |" in md
    # Improv. on buy: (0.35 - 0.2) / 0.2 = +75%; no other row on view
    assert "| Improv. | +75.00% | — |" in md


def test_tune_objective_follows_the_selection_rule() -> None:
    """The tuned value is what the trainer selects epochs on: the target's validation metric,
    or with ``select_behavior: sum`` the sum over the evaluated behaviors."""
    import math

    from mbrec.experiment.tune import objective_value

    m = {"valid": {"click": {"NDCG@5": 0.05}, "favourite": {"NDCG@5": 0.07}, "purchase": {"NDCG@5": 0.06}}}
    assert objective_value(m, "purchase", "NDCG@5") == pytest.approx(0.06)
    assert objective_value(m, "purchase", "NDCG@5", "sum") == pytest.approx(0.18)
    assert math.isnan(objective_value(m, "purchase", "HR@5", "sum"))
    assert math.isnan(objective_value({}, "purchase", "NDCG@5"))


def test_raised_cap_keeps_a_run_that_stopped_early(tmp_path: Path) -> None:
    from mbrec.experiment.runner import check_finished

    plan = expand(load_spec(tiny_spec(tmp_path, set={**TINY, "train.epochs": 20})), tmp_path / "out")[0]
    plan.folder.mkdir(parents=True)
    old = plan.cfg.to_dict()
    old["train"]["epochs"] = 10
    (plan.folder / "config.yaml").write_text(yaml.safe_dump(old))
    (plan.folder / "last.pt").write_bytes(b"")
    (plan.folder / "metrics.json").write_text(json.dumps({"epochs_run": 4, "test": {}}))
    assert check_finished(plan) == {"epochs_run": 4, "test": {}}  # early stop at 4 < 10: final
    (plan.folder / "metrics.json").write_text(json.dumps({"epochs_run": 10, "test": {}}))
    assert check_finished(plan) is None  # reached 10: to be extended to 20
