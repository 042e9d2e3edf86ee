"""Hyperparameter search with Optuna on the **validation** metric (never test).

Each trial is a normal run folder ``OUT/trials/trial-NNNN`` trained with the sampled values;
the objective is the validation ``metric`` at the selected epoch, of the target behavior or, with
``protocol.select_behavior: sum`` (multi-task runs), summed over every evaluated behavior. The
protocol is forced to validation selection (a best-on-test preset such as ``copf`` would pick
epochs on test numbers); a dataset without a validation split is a clear error (carve one with
``--set data_options.carve_valid=true``). The study lives in ``OUT/study.db`` (SQLite): running
the same command again continues it (a trial left running by a killed process is marked failed).

Search space, one ``--param`` each::

    model_args.lambda_cl=float:0.1:2.0          uniform float
    train.lr=float:1e-4:1e-2:log                log-uniform float
    model_args.n_layers=int:1:4                 integer (inclusive)
    model_args.encoder=cat:official,lightgcn    categorical (values parsed as YAML)

Optuna is optional (extra ``tune``: ``pip install 'mbrec[tune]'``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mbrec.config import RunConfig, parse_value
from mbrec.errors import ConfigError, MbrecError
from mbrec.evaluate import task_metric
from mbrec.experiment.spec import nest


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # float | int | cat
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))



def objective_value(metrics: dict, target: str, metric: str, select_behavior: str = "target") -> float:
    """The validation ``metric`` of a finished run, combined over behaviors as the trainer selects
    epochs (:func:`mbrec.evaluate.task_metric`); NaN when no behavior reports ``metric``."""
    valid = metrics.get("valid") or {}
    if not any(isinstance(m, dict) and metric in m for m in valid.values()):
        return float("nan")
    return task_metric(valid, metric, target, select_behavior)


def parse_param(text: str) -> Param:
    """``key=float:LOW:HIGH[:log]`` | ``key=int:LOW:HIGH[:log]`` | ``key=cat:A,B,C``."""
    key, sep, rest = text.partition("=")
    kind, _, body = rest.partition(":")
    usage = "expected KEY=float:LOW:HIGH[:log], KEY=int:LOW:HIGH[:log] or KEY=cat:A,B,..."
    if not sep or not key.strip() or not body:
        raise ConfigError(f"--param {text!r}: {usage}")
    key = key.strip()
    if kind == "cat":
        choices = tuple(parse_value(v.strip()) for v in body.split(",") if v.strip())
        if not choices:
            raise ConfigError(f"--param {text!r}: no choices")
        return Param(key, "cat", choices=choices)
    if kind not in ("float", "int"):
        raise ConfigError(f"--param {text!r}: unknown kind {kind!r}; {usage}")
    parts = body.split(":")
    log = parts[-1] == "log"
    if log:
        parts = parts[:-1]
    try:
        low, high = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise ConfigError(f"--param {text!r}: {usage}") from None
    if len(parts) != 2 or low >= high or (log and low <= 0):
        raise ConfigError(f"--param {text!r}: need LOW < HIGH (and LOW > 0 with log)")
    return Param(key, kind, low, high, log)


def require_optuna() -> Any:
    try:
        import optuna
    except ModuleNotFoundError:
        raise MbrecError("mbrec tune needs Optuna: pip install 'mbrec[tune]' (or pip install optuna)") from None
    return optuna


def tune(
    make_config: Callable[[dict[str, Any]], RunConfig],
    params: list[Param],
    out_dir: str | Path,
    *,
    n_trials: int,
    metric: str,
    study_name: str = "mbrec",
    seed: int = 0,
    train_fn: Callable[..., dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> Any:
    """Run ``n_trials`` more trials of the persistent study in ``out_dir``; returns the study.

    ``make_config(overrides)`` builds a trial's :class:`RunConfig` from nested overrides."""
    optuna = require_optuna()
    from mbrec.evaluate import has_valid

    if train_fn is None:
        from mbrec.train import train as train_fn
    if not params:
        raise ConfigError("tune needs at least one --param")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                sampler=sampler, load_if_exists=True)
    # a trial left RUNNING by a killed process (single-process use) is marked failed, not waited for
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        log(f"trial {t.number} was interrupted; marked failed")
    data_cache: dict[str, Any] = {}

    def objective(trial: Any) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        cfg = make_config(nest(values, "tune"))
        if cfg.protocol.selection != "validation":
            import dataclasses

            cfg.protocol = dataclasses.replace(cfg.protocol, selection="validation")
        key = json.dumps([cfg.data, cfg.data_options, cfg.seed], sort_keys=True, default=str)
        if key not in data_cache:
            from mbrec.data.registry import load_dataset

            data_cache.clear()
            data_cache[key] = load_dataset(cfg.data, seed=cfg.seed, **cfg.data_options)
        data = data_cache[key]
        if not has_valid(data):
            raise ConfigError(f"dataset {data.name!r} has no validation split for {data.target!r}; tuning "
                              "never reads test: carve one with --set data_options.carve_valid=true")
        folder = out / "trials" / f"trial-{trial.number:04d}"
        if folder.exists():  # left by an interrupted trial of the same number
            import shutil

            shutil.rmtree(folder)
        log(f"trial {trial.number}: {values}")
        metrics = train_fn(cfg, folder, data=data, quiet=True)
        value = objective_value(metrics, data.target, metric, cfg.protocol.select_behavior)
        trial.set_user_attr("folder", str(folder))
        log(f"trial {trial.number}: valid {metric} = {value:.4f}")
        return value

    study.optimize(objective, n_trials=n_trials, catch=())
    done = [t for t in study.trials if t.value is not None]
    if done:
        best = study.best_trial
        summary = {"metric": f"valid {metric}", "best_value": best.value, "best_params": best.params,
                   "best_folder": best.user_attrs.get("folder"), "n_trials": len(study.trials)}
        (out / "best.json").write_text(json.dumps(summary, indent=1))
        lines = ["| trial | " + " | ".join(p.key for p in params) + f" | valid {metric} |",
                 "|---:|" + "---|" * len(params) + "---:|"]
        for t in sorted(done, key=lambda t: -float(t.value)):
            lines.append(f"| {t.number} | " + " | ".join(str(t.params.get(p.key)) for p in params) + f" | {t.value:.4f} |")
        (out / "trials.md").write_text("\n".join(lines) + "\n")
    return study


__all__ = ["Param", "parse_param", "require_optuna", "tune"]
