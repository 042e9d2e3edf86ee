"""The noise-robustness study (RMBRec §4.4, Fig. 3/5): retrain on data whose auxiliary edges
were randomly added (+r) or removed (-r), report the metric per ratio and its relative change
against the clean data (ratio 0), as a table and a PNG.

Perturbation: :func:`mbrec.data.perturb.perturb_auxiliary` (each auxiliary behavior separately,
uniform, relative to its own edge count; target and held-out splits untouched), seeded with the
run seed (+ ``noise.seed_offset``), so every seed sees a different perturbation.
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


def noise_values(spec: ExperimentSpec, outcomes: list[RunOutcome], metric: str) -> dict[tuple[str, str, float], dict[int, float]]:
    out: dict[tuple[str, str, float], dict[int, float]] = {}
    for o in outcomes:
        ratio = o.plan.noise_ratio or 0.0
        out.setdefault((o.plan.row, o.plan.dataset, ratio), {})[o.plan.seed] = metric_value(
            o.metrics, metric, spec.split, spec.behavior)
    return out


def summarize_noise(spec: ExperimentSpec, outcomes: list[RunOutcome], out_dir: str | Path) -> list[Path]:
    """Write ``noise-<dataset>-<metric>.md/.csv/.png`` for each dataset and metric."""
    from mbrec.experiment.plots import plot_noise

    assert spec.noise is not None
    out = Path(out_dir)
    ratios = sorted({0.0, *spec.noise.ratios})
    written: list[Path] = []
    md_all: list[str] = []
    for metric in spec.metrics:
        vals = noise_values(spec, outcomes, metric)
        for ds in spec.datasets:
            absolute: dict[str, list[tuple[float, float]]] = {}
            relative: dict[str, list[float]] = {}
            for row in spec.row_names():
                pts, rel = [], []
                clean = vals.get((row, ds.name, 0.0)) or {}
                for r in ratios:
                    per_seed = vals.get((row, ds.name, r)) or {}
                    x = np.array(list(per_seed.values()), dtype=float)
                    pts.append((float(x.mean()) if x.size else math.nan, float(x.std(ddof=1)) if x.size > 1 else 0.0))
                    # relative change per seed against the same seed's clean run, then averaged
                    common = sorted(set(per_seed) & set(clean))
                    d = [(per_seed[s] - clean[s]) / clean[s] for s in common if clean[s] != 0]
                    rel.append(float(np.mean(d)) if d else math.nan)
                absolute[row], relative[row] = pts, rel
            stem = f"noise-{safe_name(ds.name)}-{safe_name(metric)}"
            n_seeds = len({o.plan.seed for o in outcomes if o.plan.dataset == ds.name})
            md = _noise_markdown(ds.label, metric, ratios, absolute, relative, spec, n_seeds)
            (out / f"{stem}.md").write_text(md)
            (out / f"{stem}.csv").write_text(_noise_csv(ratios, absolute, relative))
            png = plot_noise(ratios, absolute, relative, out / f"{stem}.png", metric=metric,
                             title=f"{ds.label}: auxiliary-edge noise")
            written += [out / f"{stem}.md", out / f"{stem}.csv", png]
            md_all.append(md)
    (out / "table.md").write_text("\n".join(md_all))
    written.append(out / "table.md")
    return written


def _pct(r: float) -> str:
    return "clean" if r == 0 else f"{r:+.0%}"


def _noise_markdown(label: str, metric: str, ratios: list[float], absolute: dict[str, Any],
                    relative: dict[str, Any], spec: ExperimentSpec, n_seeds: int) -> str:
    head = ["Model"] + [_pct(r) for r in ratios]
    lines = [f"### {label}: {metric} under auxiliary noise ({spec.split}, mean ± std over {n_seeds} seed(s))", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(ratios)) + "|"]
    for row, pts in absolute.items():
        lines.append("| " + " | ".join([row] + [f"{m:.4f} ± {s:.4f}" if math.isfinite(m) else "—" for m, s in pts]) + " |")
    lines += ["", f"Relative change of {metric} against the clean data (per seed, then averaged):", "",
              "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(ratios)) + "|"]
    for row, rel in relative.items():
        lines.append("| " + " | ".join([row] + [f"{v:+.2%}" if math.isfinite(v) else "—" for v in rel]) + " |")
    lines += ["", "Negative ratios remove that share of each auxiliary behavior's training edges; positive ones "
              "add that many uniformly drawn non-edges. Target edges and held-out splits are untouched.", ""]
    return "\n".join(lines)


def _noise_csv(ratios: list[float], absolute: dict[str, Any], relative: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "ratio", "mean", "std", "relative_change"])
    for row, pts in absolute.items():
        for r, (m, s), rel in zip(ratios, pts, relative[row]):
            w.writerow([row, r, f"{m:.6f}", f"{s:.6f}", "" if math.isnan(rel) else f"{rel:.6f}"])
    return buf.getvalue()


__all__ = ["noise_values", "summarize_noise"]
