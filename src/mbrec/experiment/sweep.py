"""Sensitivity sweeps: a grid over one or two hyperparameters (dotted keys such as
``model_args.lambda_cl``), every point trained for every seed; a line plot (one parameter, one
line per model) or a heatmap per model (two parameters), plus a table.

The sweep reads the spec's ``split`` (``valid`` by default for ``mbrec sweep``: choosing a
hyperparameter on test numbers would leak the test set into model selection).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from mbrec.experiment.runner import RunOutcome, metric_value
from mbrec.experiment.spec import ExperimentSpec, safe_name


def _key(point: dict[str, Any]) -> str:
    return repr(sorted(point.items()))


def summarize_sweep(spec: ExperimentSpec, outcomes: list[RunOutcome], out_dir: str | Path) -> list[Path]:
    from mbrec.experiment.plots import plot_sweep_heatmap, plot_sweep_line

    assert spec.sweep is not None
    out = Path(out_dir)
    params = list(spec.sweep.params)
    written: list[Path] = []
    md: list[str] = []
    rows = [["dataset", "model", *params, "metric", "mean", "std", "n"]]
    for metric in spec.metrics:
        for ds in spec.datasets:
            stats: dict[tuple[str, str], tuple[float, float, int]] = {}
            for row in spec.row_names():
                groups: dict[str, list[float]] = {}
                for o in outcomes:
                    if o.plan.row == row and o.plan.dataset == ds.name:
                        groups.setdefault(_key(o.plan.point), []).append(
                            metric_value(o.metrics, metric, spec.split, spec.behavior))
                for k, xs in groups.items():
                    x = np.array(xs)
                    stats[(row, k)] = (float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))
            stem = f"sweep-{safe_name(ds.name)}-{safe_name(metric)}"
            title = f"{ds.label}: {metric} ({spec.split})"
            if len(params) == 1:
                values = spec.sweep.params[params[0]]
                series = {row: [stats.get((row, _key({params[0]: v})), (math.nan, 0.0, 0))[:2] for v in values]
                          for row in spec.row_names()}
                written.append(plot_sweep_line(params[0], values, series, out / f"{stem}.png", metric=metric, title=title))
                head = ["Model"] + [f"{params[0]}={v}" for v in values]
                md += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(values)) + "|"]
                for row, pts in series.items():
                    md.append("| " + " | ".join([row] + [f"{m:.4f} ± {s:.4f}" if math.isfinite(m) else "—" for m, s in pts]) + " |")
                md.append("")
            else:
                v0, v1 = spec.sweep.params[params[0]], spec.sweep.params[params[1]]
                for row in spec.row_names():
                    grid = [[stats.get((row, _key({params[0]: a, params[1]: b})), (math.nan, 0.0, 0))[0] for b in v1] for a in v0]
                    written.append(plot_sweep_heatmap((params[0], params[1]), (v0, v1), grid,
                                                      out / f"{stem}-{safe_name(row)}.png", metric=metric, title=f"{row}, {title}"))
                    md += [f"### {row}, {title} (rows {params[0]}, columns {params[1]})", "",
                           "| " + " | ".join([f"{params[0]} \\ {params[1]}"] + [str(b) for b in v1]) + " |",
                           "|" + "|".join(["---"] + ["---:"] * len(v1)) + "|"]
                    for a, line in zip(v0, grid):
                        md.append("| " + " | ".join([str(a)] + [f"{x:.4f}" if math.isfinite(x) else "—" for x in line]) + " |")
                    md.append("")
            for o_row in spec.row_names():
                for values in _points(spec):
                    s = stats.get((o_row, _key(values)))
                    if s:
                        rows.append([ds.name, o_row, *[values[p] for p in params], metric, f"{s[0]:.6f}", f"{s[1]:.6f}", s[2]])
    (out / "table.md").write_text("\n".join(md))
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    (out / "table.csv").write_text(buf.getvalue())
    return written + [out / "table.md", out / "table.csv"]


def _points(spec: ExperimentSpec) -> list[dict[str, Any]]:
    import itertools

    assert spec.sweep is not None
    keys = list(spec.sweep.params)
    return [dict(zip(keys, v)) for v in itertools.product(*spec.sweep.params.values())]


__all__ = ["summarize_sweep"]
