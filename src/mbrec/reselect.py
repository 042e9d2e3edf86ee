"""Apply another checkpoint-selection rule to a finished run, from its recorded history.

A run trained with ``train.test_every_eval: true`` stores validation *and* test metrics of every
evaluated epoch in ``metrics.json`` (``history``). Any selection rule can then be applied
afterwards without retraining, which is how one run answers "what would the table say under the
other rule?" (multi-task papers disagree on it: BiGEL-style tables select on the target, BVAE's
code on the sum over tasks, some report each task at its own best epoch).

Rules (``rule``):

* ``target``: the target behavior's ``metric`` picks one epoch for every task (the default of
  ``protocol.select_behavior``);
* ``sum``: the metric summed over the behaviors picks one epoch for every task;
* ``each``: every behavior is reported at its own best epoch (one checkpoint per task);
* a behavior name: that behavior's metric picks one epoch for every task.

``on="valid"`` selects on validation (the honest choice); ``on="test"`` selects on test, as the
COPF / PKEF / BVAE code does, and is labelled so wherever it is printed.

``patience`` replays the trainer's early stop: after each recorded epoch the run stops once
``epoch - best_epoch > patience`` (for ``each``: once no task has improved for that long), and
only the epochs before the stop are candidates. ``0`` uses the whole history. The history ends
where the run itself stopped, so a run that early-stopped under one rule can only be reselected
within the epochs it trained.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mbrec.errors import MbrecError
from mbrec.evaluate import task_metric

RULES = ("target", "sum", "each")


@dataclass
class Selection:
    """What a rule selects in one run: per behavior, the epoch and its metrics."""

    rule: str
    metric: str
    on: str
    patience: int
    epochs: dict[str, int]
    valid: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    last_epoch: int  # the last epoch the (replayed) run trained
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


def _evaluations(metrics: Mapping[str, Any], on: str, where: str) -> list[dict[str, Any]]:
    history = metrics.get("history")
    if not isinstance(history, list) or not history:
        raise MbrecError(f"{where}: no per-epoch history in metrics.json")
    evals = [h for h in history if h.get("valid") or h.get("test")]
    if not evals:
        raise MbrecError(f"{where}: the history holds no evaluation")
    missing = [h["epoch"] for h in evals if not h.get("test")]
    if missing:
        raise MbrecError(
            f"{where}: test metrics were recorded at {len(evals) - len(missing)} of {len(evals)} evaluations "
            f"(missing e.g. epoch {missing[0]}); reselection needs the run trained with "
            "--set train.test_every_eval=true"
        )
    if on == "valid" and any(not h.get("valid") for h in evals):
        raise MbrecError(f"{where}: the run has no validation metrics (protocol selects on test?); use on='test'")
    return evals


def reselect(
    metrics: Mapping[str, Any],
    rule: str = "target",
    metric: str | None = None,
    *,
    on: str = "valid",
    patience: int = 0,
    where: str = "run",
) -> Selection:
    """Apply ``rule`` to one run's ``metrics.json`` content (see the module docstring)."""
    if on not in ("valid", "test"):
        raise MbrecError(f"{where}: on must be 'valid' or 'test', got {on!r}")
    if patience < 0:
        raise MbrecError(f"{where}: patience must be >= 0, got {patience}")
    metric = metric or str((metrics.get("protocol") or {}).get("select_metric") or "")
    if not metric:
        raise MbrecError(f"{where}: no metric given and the run's protocol names none")
    target = str(metrics.get("target", ""))
    evals = _evaluations(metrics, on, where)
    behaviors = list(evals[0]["test"])
    if rule not in RULES and rule not in behaviors:
        raise MbrecError(f"{where}: unknown rule {rule!r}; choose from {list(RULES) + behaviors}")
    if metric not in evals[0][on][behaviors[0]]:
        raise MbrecError(f"{where}: metric {metric!r} is not recorded; recorded: {sorted(evals[0][on][behaviors[0]])}")
    tasks = behaviors if rule == "each" else ["*"]

    def value(h: Mapping[str, Any], task: str) -> float:
        scores = h[on]
        if task != "*":
            return float(scores.get(task, {}).get(metric, float("nan")))
        if rule == "sum":
            return task_metric(scores, metric, target, "sum")
        return task_metric(scores, metric, rule if rule != "target" else target, "target")

    best_val = {t: -math.inf for t in tasks}
    best: dict[str, Mapping[str, Any] | None] = {t: None for t in tasks}
    by_epoch = {h["epoch"]: h for h in evals}
    last, stopped = 0, False
    for h in metrics["history"]:
        epoch = int(h["epoch"])
        last = epoch
        if epoch in by_epoch:
            for t in tasks:
                v = value(by_epoch[epoch], t)
                if math.isfinite(v) and v > best_val[t]:
                    best_val[t], best[t] = v, by_epoch[epoch]
        if patience > 0:
            latest = max((int(b["epoch"]) for b in best.values() if b is not None), default=0)
            if latest > 0 and epoch - latest > patience:
                stopped = True
                break
    if any(b is None for b in best.values()):
        raise MbrecError(f"{where}: no finite {metric} on {on} for rule {rule!r}")
    pick = {b: best[b if rule == "each" else "*"] for b in behaviors}
    notes = []
    if on == "test":
        notes.append("selected on TEST (optimistic; for parity with code that does so)")
    return Selection(
        rule=rule,
        metric=metric,
        on=on,
        patience=patience,
        epochs={b: int(h["epoch"]) for b, h in pick.items() if h is not None},
        valid={b: dict(h.get("valid", {}).get(b, {})) for b, h in pick.items() if h is not None},
        test={b: dict(h["test"].get(b, {})) for b, h in pick.items() if h is not None},
        last_epoch=last,
        stopped_early=stopped,
        notes=notes,
    )


def load_run(path: str | Path) -> dict[str, Any]:
    """``metrics.json`` of a run folder (or the file itself)."""
    p = Path(path)
    f = p / "metrics.json" if p.is_dir() else p
    if not f.is_file():
        raise MbrecError(f"{path}: no metrics.json (is it a finished run folder?)")
    try:
        return dict(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise MbrecError(f"{f}: not valid JSON (line {e.lineno}: {e.msg})") from None


def selection_table(
    groups: Mapping[str, list[tuple[str, Selection]]],
    columns: list[str],
    behaviors: list[str] | None = None,
    reference: str | None = None,
) -> str:
    """A markdown table: one row per run, then mean ± std (sample std) per group.

    ``groups`` maps a row label (e.g. the model) to ``(run label, selection)`` pairs. With
    ``reference`` (a group), every other group's mean cell also gets the two-sided paired t-test
    p-value against it, pairing runs by label (seed folders); cells with < 2 pairs get none."""
    from mbrec.experiment.aggregate import paired_t_test

    if reference is not None and reference not in groups:
        raise MbrecError(f"reference {reference!r} is not one of the groups {list(groups)}")
    first = next((s for runs in groups.values() for _, s in runs), None)
    if first is None:
        return "(no runs)"
    behaviors = behaviors or list(first.test)
    head = ["model", "run", "epoch(s)"] + [f"{b} {c}" for b in behaviors for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def values(runs: list[tuple[str, Selection]], b: str, c: str) -> dict[str, float]:
        return {label: float(s.test[b][c]) for label, s in runs if c in s.test.get(b, {})}

    for name, runs in groups.items():
        cells: dict[tuple[str, str], list[float]] = {}
        for label, s in runs:
            eps = sorted(set(s.epochs.values()))
            ep = "/".join(str(s.epochs[b]) for b in behaviors if b in s.epochs) if len(eps) > 1 else str(eps[0])
            row = [name, label, ep]
            for b in behaviors:
                for c in columns:
                    v = s.test.get(b, {}).get(c)
                    row.append("—" if v is None else f"{v:.4f}")
                    if v is not None:
                        cells.setdefault((b, c), []).append(float(v))
            lines.append("| " + " | ".join(row) + " |")
        if len(runs) > 1:
            row = [f"**{name}**", f"mean ± std (n={len(runs)})", ""]
            for b in behaviors:
                for c in columns:
                    vals = cells.get((b, c), [])
                    if not vals:
                        row.append("—")
                    else:
                        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                        cell = f"**{statistics.fmean(vals):.4f}** ± {sd:.4f}"
                        if reference is not None and name != reference:
                            mine, ref = values(runs, b, c), values(groups[reference], b, c)
                            common = sorted(set(mine) & set(ref))
                            if len(common) >= 2:
                                _, p = paired_t_test([mine[k] for k in common], [ref[k] for k in common])
                                cell += f" (p {p:.3f})"
                        row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
