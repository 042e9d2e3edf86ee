"""Execute an experiment's runs, resumably.

* A run whose ``metrics.json`` exists is **skipped** (its numbers are read back), so a killed
  experiment continues where it stopped. If that run's ``config.yaml`` differs from what the
  spec now resolves to (an edited config file, a lowered epoch cap), the runner stops with the
  differing keys instead of mixing stale numbers into the table. A raised epoch cap is the
  exception: runs that reached their old cap are **extended** from ``last.pt``, runs that
  stopped early before it are kept as they are.
* A run folder with ``last.pt`` but no ``metrics.json`` was interrupted mid-training; it
  continues with ``train(..., resume=True)`` (a changed epoch limit is allowed, any other change
  to its configuration is refused).
* A run folder with neither (killed before its first epoch ended) is cleared and restarted.

Datasets are loaded once per (data, options, seed) and shared by consecutive runs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mbrec.config import read_yaml
from mbrec.data.container import MultiBehaviorData
from mbrec.errors import MbrecError
from mbrec.experiment.spec import RunPlan

#: keys that may differ between a finished run and the current spec without invalidating it
_IGNORED = {"device", "train.progress", "train.eval_memory_mb"}
#: files a run writes; a folder holding only these (and no metrics/last.pt) may be cleared
_RUN_FILES = {"config.yaml", "train.log", "best.pt", "last.pt.tmp"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every differing (flattened) key, ignoring device-like keys."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in _IGNORED:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, list):
            va = list(va)
        if isinstance(vb, (list, tuple)):
            vb = list(vb)
        if va != vb:
            diffs.append(f"{k}: {va!r} -> {vb!r}")
    return diffs


@dataclass
class RunOutcome:
    plan: RunPlan
    status: str  # "skipped" (finished before), "trained", "resumed"
    metrics: dict[str, Any]
    seconds: float = 0.0


@dataclass
class DataCache:
    """Keeps the last few loaded (and perturbed) datasets."""

    size: int = 2
    _items: dict[str, MultiBehaviorData] = field(default_factory=dict)

    def get(self, plan: RunPlan) -> MultiBehaviorData:
        from mbrec.data.registry import load_dataset

        cfg = plan.cfg
        base_key = json.dumps([cfg.data, cfg.data_options, cfg.seed], sort_keys=True, default=str)
        key = json.dumps([base_key, plan.noise_ratio, plan.noise_behaviors, plan.noise_seed], default=str)
        if key in self._items:
            return self._items[key]
        if base_key in self._items:
            data = self._items[base_key]
        else:
            data = load_dataset(cfg.data, seed=cfg.seed, **cfg.data_options)
            self._put(base_key, data)
        if plan.noise_ratio:
            from mbrec.data.perturb import perturb_auxiliary

            data = perturb_auxiliary(data, plan.noise_ratio, plan.noise_seed, behaviors=plan.noise_behaviors)
            self._put(key, data)
        return data

    def _put(self, key: str, data: MultiBehaviorData) -> None:
        self._items[key] = data
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))


def check_finished(plan: RunPlan) -> dict[str, Any] | None:
    """The metrics of a finished run (after checking its config matches), else ``None``.

    Only a raised epoch limit may differ: a run that stopped early (before its old limit) is
    final under any limit it did not reach, and a run that reached its old limit returns
    ``None`` so that it is extended from ``last.pt`` (resumption is exact, so the result is that
    of a fresh run with the new limit)."""
    metrics_path = plan.folder / "metrics.json"
    if not metrics_path.is_file():
        return None
    cfg_path = plan.folder / "config.yaml"
    if cfg_path.is_file():
        old = read_yaml(cfg_path)
        diffs = config_diff(old, plan.cfg.to_dict())
        if diffs and all(d.startswith("train.epochs:") for d in diffs):
            done = _read_metrics(metrics_path)
            old_limit = int((old.get("train") or {}).get("epochs", 0))
            ran = int(done.get("epochs_run", 0))
            if ran < old_limit and plan.cfg.train.epochs >= ran:
                return done  # stopped early: a higher limit changes nothing
            if ran == old_limit and plan.cfg.train.epochs > old_limit and (plan.folder / "last.pt").is_file():
                return None  # reached its limit: extend it
        if diffs:
            raise MbrecError(
                f"{plan.folder} was run with a different configuration ({'; '.join(diffs[:5])}"
                f"{' ...' if len(diffs) > 5 else ''}). Use another --out for the new settings, or delete that folder"
            )
    return _read_metrics(metrics_path)


def _read_metrics(metrics_path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(metrics_path.read_text()))
    except json.JSONDecodeError:
        raise MbrecError(f"{metrics_path} is not valid JSON; delete the run folder to redo it") from None


def run_plans(
    plans: list[RunPlan],
    *,
    train_fn: Callable[..., dict[str, Any]] | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[RunOutcome]:
    """Run (or skip) every plan in order; returns one outcome per plan."""
    if train_fn is None:
        from mbrec.train import train as train_fn
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cache = DataCache()
    outcomes: list[RunOutcome] = []
    n = len(plans)
    for i, plan in enumerate(plans, 1):
        done = check_finished(plan)
        if done is not None:
            outcomes.append(RunOutcome(plan, "skipped", done))
            say(f"[{i}/{n}] {plan.label}: finished before, skipped")
            continue
        resume = (plan.folder / "last.pt").is_file()
        if resume and (plan.folder / "config.yaml").is_file():
            diffs = [d for d in config_diff(read_yaml(plan.folder / "config.yaml"), plan.cfg.to_dict())
                     if not d.startswith("train.epochs:")]
            if diffs:
                raise MbrecError(f"{plan.folder} holds an interrupted run with a different configuration "
                                 f"({'; '.join(diffs[:5])}); use another --out, or delete that folder")
        if not resume and plan.folder.exists() and any(plan.folder.iterdir()):
            leftovers = {p.name for p in plan.folder.iterdir()}
            if leftovers - _RUN_FILES:
                raise MbrecError(f"{plan.folder} holds files that are not a run's ({sorted(leftovers - _RUN_FILES)}); "
                                 "move them away or use another --out")
            shutil.rmtree(plan.folder)
        plan.folder.parent.mkdir(parents=True, exist_ok=True)
        verb = "extending" if resume and (plan.folder / "metrics.json").is_file() else "resuming" if resume else "training"
        say(f"[{i}/{n}] {plan.label}: {verb} "
            f"({plan.cfg.train.epochs} epochs max) -> {plan.folder}")
        t0 = time.perf_counter()
        data = cache.get(plan)
        metrics = train_fn(plan.cfg, plan.folder, data=data, resume=resume, quiet=quiet)
        secs = time.perf_counter() - t0
        outcomes.append(RunOutcome(plan, "resumed" if resume else "trained", metrics, secs))
        say(f"[{i}/{n}] {plan.label}: done in {secs:.1f}s (best epoch {metrics.get('best_epoch')})")
    return outcomes


def metric_value(metrics: dict[str, Any], metric: str, split: str = "test", behavior: str | None = None) -> float:
    """One number from a run's metrics dict (``behavior`` None: the only / target behavior)."""
    block = metrics.get(split) or {}
    if not block:
        raise MbrecError(f"run of {metrics.get('model')} on {metrics.get('dataset')} has no {split!r} metrics")
    if behavior is None:
        behavior = metrics.get("target") or list(block)[-1]
        if behavior not in block:
            behavior = list(block)[-1]
    if behavior not in block:
        raise MbrecError(f"no {split} metrics for behavior {behavior!r}; have {list(block)}")
    vals = block[behavior]
    if metric not in vals:
        raise MbrecError(f"metric {metric!r} was not computed (have {sorted(vals)}); add its K to protocol.ks")
    return float(vals[metric])


__all__ = ["DataCache", "RunOutcome", "check_finished", "config_diff", "metric_value", "run_plans"]
