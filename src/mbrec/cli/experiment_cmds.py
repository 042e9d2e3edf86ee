"""``mbrec experiment``, ``noise``, ``sweep`` and ``tune`` (see ``docs/experiments.md``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mbrec.errors import ConfigError


def _seeds(text: str | None) -> tuple[int, ...] | None:
    """``"5"`` -> seeds 0..4; ``"0,1,7"`` -> those seeds."""
    if text is None:
        return None
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects a count (5) or a comma list (0,1,2), got {text!r}") from None
    if len(parts) == 1 and "," not in text:
        if parts[0] < 1:
            raise ConfigError(f"--seeds count must be >= 1, got {text!r} (for one seed, write it with a comma: '{parts[0]},')")
        return tuple(range(parts[0]))
    return tuple(parts)


def _names(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x.strip().rstrip("%")) / (100.0 if x.strip().endswith("%") else 1.0) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers (e.g. -0.5,-0.1,0.1,0.5 or -50%,50%), got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="experiment folder (default runs/experiments/<name>)")
    p.add_argument("--epochs", type=int, help="epoch cap for every run (a quick CPU version)")
    p.add_argument("--seeds", help="a count (5: seeds 0-4) or a comma list (0,2 or, for one seed, 3,); overrides the spec's seeds")
    p.add_argument("--device", help="cpu or cuda for every run")
    p.add_argument("--dry-run", action="store_true", help="resolve and list the runs (done / to resume / new), train nothing")
    p.add_argument("--verbose", action="store_true", help="show each run's per-epoch log")


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="model names; each uses configs/<model>/<data>.yaml when present")
    p.add_argument("--data", required=True, help="dataset (name, folder or built-in); also picks the config files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeatable)")
    p.add_argument("--metric", action="append", metavar="METRIC@K", help="metric(s) to report (repeatable; default HR@10)")
    p.add_argument("--config-dir", default="configs", help="where <model>/<data>.yaml configs live")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("experiment", help="run a spec (models x variants x datasets x seeds) and build its tables",
                       description="Runs every missing run of the spec (finished runs are skipped, interrupted ones "
                       "resumed) and writes table.md / table.csv / runs.csv (plus PNGs for noise and sweep specs).")
    p.add_argument("spec", help="experiment YAML (experiments/*.yaml)")
    p.add_argument("--rows", help="comma list of model rows to run (default all); the tables then cover those "
                   "rows, and a later run of the whole spec reuses their runs")
    p.add_argument("--datasets", help="comma list of the spec's dataset names to run (default all); like --rows, "
                   "a later run of the whole spec reuses their runs")
    _common(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("noise", help="retrain on data with auxiliary edges added/removed; table and PNG (RMBRec Fig. 3)")
    _grid_args(p)
    p.add_argument("--ratios", default="-0.5,-0.3,-0.1,0.1,0.3,0.5",
                   help="negative: remove that share of each auxiliary behavior's edges, positive: add (default ±10/30/50%%)")
    p.add_argument("--behaviors", help="comma list of auxiliary behaviors to perturb (default: all)")
    _common(p)
    p.set_defaults(func=cmd_noise)

    p = sub.add_parser("sweep", help="grid over one or two hyperparameters; line plot or heatmap")
    _grid_args(p)
    p.add_argument("--param", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="dotted key and its values, e.g. model_args.lambda_cl=0.2,0.5,1.0 (once or twice)")
    p.add_argument("--split", default="valid", choices=["valid", "test"], help="split the curves read (default valid)")
    _common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("tune", help="Optuna search on the validation metric (study kept in OUT/study.db)")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--config", help="base YAML config (default configs/<model>/<data>.yaml when present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--param", action="append", required=True,
                   metavar="KEY=SPACE", help="float:LOW:HIGH[:log] | int:LOW:HIGH[:log] | cat:A,B (repeatable)")
    p.add_argument("--trials", type=int, default=20, help="trials to add to the study (default 20)")
    p.add_argument("--metric", default="NDCG@10", help="validation metric to maximise (default NDCG@10)")
    p.add_argument("--epochs", type=int, help="epoch cap per trial")
    p.add_argument("--seed", type=int, help="run seed (default: the config's)")
    p.add_argument("--device")
    p.add_argument("--out", help="study folder (default runs/tune/<model>-<data>)")
    p.add_argument("--study-name", default="mbrec")
    p.set_defaults(func=cmd_tune)


def _execute(spec: Any, args: argparse.Namespace) -> int:
    from mbrec.experiment import default_out_dir, expand, run_experiment
    from mbrec.experiment.runner import check_finished

    out = Path(args.out) if args.out else default_out_dir(spec)
    seeds = _seeds(args.seeds)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.dry_run:
        plans = expand(spec, out, epochs_cap=args.epochs, device=args.device, seeds=seeds)
        counts = {"done": 0, "resume": 0, "new": 0}
        for plan in plans:
            state = "done" if check_finished(plan) is not None else "resume" if (plan.folder / "last.pt").is_file() else "new"
            counts[state] += 1
            print(f"{state:6s} {plan.label}: {plan.cfg.model}, {plan.cfg.train.epochs} epochs, "
                  f"protocol {plan.cfg.protocol.name}, data {plan.cfg.data} -> {plan.folder}")
        print(f"{len(plans)} runs: {counts['done']} done, {counts['resume']} to resume, {counts['new']} new (dry run)")
        return 0
    outcomes, folder = run_experiment(spec, out, epochs_cap=args.epochs, device=args.device, seeds=seeds,
                                      quiet=not args.verbose)
    table = folder / "table.md"
    if table.is_file():
        print(table.read_text())
    trained = sum(o.status != "skipped" for o in outcomes)
    print(f"{len(outcomes)} runs ({trained} trained, {len(outcomes) - trained} reused); results in {folder}", file=sys.stderr)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from mbrec.experiment import load_spec
    from mbrec.experiment.spec import select_datasets, select_rows

    spec = load_spec(args.spec)
    if args.rows is not None:
        spec = select_rows(spec, _names(args.rows))
    if args.datasets is not None:
        spec = select_datasets(spec, _names(args.datasets))
    return _execute(spec, args)


def _grid_spec(args: argparse.Namespace, kind: str, extra: dict[str, Any]) -> Any:
    from mbrec.experiment.spec import safe_name, spec_from_dict

    data = args.data
    raw: dict[str, Any] = {
        "name": f"{kind}-{safe_name(Path(data).name)}-{'-'.join(args.models)}",
        "kind": kind,
        "models": [{"name": m, "model": m, "config": "auto"} for m in args.models],
        "datasets": [{"name": Path(data).name, "label": Path(data).name, "data": data}],
        "metrics": args.metric or ["HR@10"],
        "set": list(args.set),
        "config_dir": args.config_dir,
        **extra,
    }
    if args.seeds is None:
        raw["seeds"] = [0]
    return spec_from_dict(raw)


def cmd_noise(args: argparse.Namespace) -> int:
    noise: dict[str, Any] = {"ratios": _floats(args.ratios, "--ratios")}
    if args.behaviors:
        noise["behaviors"] = _names(args.behaviors)
    return _execute(_grid_spec(args, "noise", {"noise": noise}), args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from mbrec.config import parse_value

    if len(args.param) > 2:
        raise ConfigError("sweep takes one or two --param (a line plot or a heatmap)")
    params: dict[str, list[Any]] = {}
    for text in args.param:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--param expects KEY=V1,V2,..., got {text!r}")
        params[key.strip()] = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    return _execute(_grid_spec(args, "sweep", {"sweep": {"params": params}, "split": args.split}), args)


def cmd_tune(args: argparse.Namespace) -> int:
    from mbrec.config import build_config, deep_merge, parse_overrides
    from mbrec.experiment.spec import safe_name
    from mbrec.experiment.tune import parse_param, require_optuna, tune

    require_optuna()
    params = [parse_param(t) for t in args.param]
    config = args.config
    if config is None:
        guess = Path("configs") / args.model / f"{Path(args.data).name}.yaml"
        config = str(guess) if guess.is_file() else None
    base = parse_overrides(args.set)
    if args.seed is not None:
        base["seed"] = args.seed
    if args.device:
        base["device"] = args.device

    def make_config(extra: dict[str, Any]) -> Any:
        cfg = build_config(args.model, args.data, config_file=config, overrides=deep_merge(base, extra))
        if args.epochs is not None:
            cfg.train.epochs = min(cfg.train.epochs, args.epochs)
        return cfg

    make_config({})  # fail early on a bad base config
    out = Path(args.out) if args.out else Path("runs") / "tune" / f"{args.model}-{safe_name(Path(args.data).name)}"
    study = tune(make_config, params, out, n_trials=args.trials, metric=args.metric, study_name=args.study_name,
                 seed=args.seed or 0, log=lambda s: print(s, file=sys.stderr, flush=True))
    if (out / "trials.md").is_file():
        print((out / "trials.md").read_text())
        print(f"best valid {args.metric} {study.best_value:.4f} with {study.best_params}; study: {out / 'study.db'}")
    return 0
