"""Experiments as one command: multi-seed tables with significance marks, ablations, the noise
study, sensitivity sweeps and Optuna search (see ``docs/experiments.md``).

``run_experiment(spec, out_dir)`` expands the spec into run folders under ``out_dir/runs``,
trains the missing ones (finished runs are skipped, interrupted ones resumed) and writes the
summary next to them: ``table.md`` / ``table.csv`` / ``runs.csv`` (and PNGs for noise and sweeps).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

from mbrec.experiment.aggregate import Table, aggregate, paired_t_test, significance_mark
from mbrec.experiment.runner import RunOutcome, metric_value, run_plans
from mbrec.experiment.spec import ExperimentSpec, RunPlan, default_out_dir, expand, load_spec, spec_from_dict


def collect_values(spec: ExperimentSpec, outcomes: list[RunOutcome]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(row, column group, metric) -> {seed: value}; a behavior a row does not score is left out."""
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    groups = {d.name: column_groups(spec, d.label) for d in spec.datasets}
    for o in outcomes:
        block = o.metrics.get(spec.split) or {}
        for behavior, group in zip(spec.behaviors, groups[o.plan.dataset]):
            if behavior is not None and behavior not in block:
                continue
            for m in spec.metrics:
                values.setdefault((o.plan.row, group, m), {})[o.plan.seed] = metric_value(
                    o.metrics, m, spec.split, behavior)
    return values


def column_groups(spec: ExperimentSpec, label: str) -> list[str]:
    """Column-group labels of one dataset: the label, or ``label behavior`` per reported behavior."""
    if spec.behaviors == (None,):
        return [label]
    return [label if b is None else f"{label} {b}" for b in spec.behaviors]


def summarize_table(spec: ExperimentSpec, outcomes: list[RunOutcome], out_dir: str | Path) -> Table:
    out = Path(out_dir)
    columns = [(g, m) for d in spec.datasets for g in column_groups(spec, d.label) for m in spec.metrics]
    table = aggregate(collect_values(spec, outcomes), spec.row_names(), columns, spec.reference,
                      title=spec.description or spec.name)
    protocols = sorted({o.metrics.get("protocol", {}).get("name", "?") + (
        " (best-on-test)" if o.metrics.get("protocol", {}).get("selection") == "test" else "") for o in outcomes})
    epochs = sorted({int(o.plan.cfg.train.epochs) for o in outcomes})
    table.notes.append(f"Split: {spec.split}; protocol(s): {', '.join(protocols)}; epoch limit(s): {epochs}.")
    (out / "table.md").write_text(table.to_markdown())
    (out / "table.csv").write_text(table.to_csv())
    return table


def write_runs_csv(spec: ExperimentSpec, outcomes: list[RunOutcome], out_dir: str | Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "model", "dataset", "seed", "noise_ratio", "point", "split", "behavior", "metric", "value",
                "best_epoch", "epochs_run", "train_seconds", "folder"])
    for o in outcomes:
        for behavior, vals in (o.metrics.get(spec.split) or {}).items():
            for m in spec.metrics:
                if m not in vals:
                    continue
                w.writerow([o.plan.row, o.plan.cfg.model, o.plan.dataset, o.plan.seed,
                            "" if o.plan.noise_ratio is None else o.plan.noise_ratio,
                            ";".join(f"{k}={v}" for k, v in o.plan.point.items()), spec.split, behavior, m,
                            f"{float(vals[m]):.6f}", o.metrics.get("best_epoch"), o.metrics.get("epochs_run"),
                            f"{o.metrics.get('train_seconds', 0.0):.1f}", o.plan.folder])
    path = Path(out_dir) / "runs.csv"
    path.write_text(buf.getvalue())
    return path


def run_experiment(
    spec: ExperimentSpec,
    out_dir: str | Path | None = None,
    *,
    epochs_cap: int | None = None,
    device: str | None = None,
    seeds: tuple[int, ...] | None = None,
    quiet: bool = True,
    train_fn: Callable[..., dict[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[RunOutcome], Path]:
    """Run every missing run of ``spec`` and write its summary; returns the outcomes and the folder."""
    out = Path(out_dir) if out_dir else default_out_dir(spec)
    plans = expand(spec, out, epochs_cap=epochs_cap, device=device, seeds=seeds)
    out.mkdir(parents=True, exist_ok=True)
    if spec.source is not None:
        (out / "spec.yaml").write_text(Path(spec.source).read_text())
    outcomes = run_plans(plans, train_fn=train_fn, quiet=quiet, log=log)
    write_runs_csv(spec, outcomes, out)
    if spec.kind == "noise":
        from mbrec.experiment.noise import summarize_noise

        summarize_noise(spec, outcomes, out)
    elif spec.kind == "sweep":
        from mbrec.experiment.sweep import summarize_sweep

        summarize_sweep(spec, outcomes, out)
    else:
        summarize_table(spec, outcomes, out)
    return outcomes, out


__all__ = [
    "ExperimentSpec", "RunOutcome", "RunPlan", "Table", "aggregate", "collect_values", "default_out_dir",
    "expand", "load_spec", "paired_t_test", "run_experiment", "significance_mark", "spec_from_dict",
    "summarize_table", "write_runs_csv",
]
