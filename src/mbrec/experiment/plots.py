"""Figures (matplotlib, Agg backend, PNG): noise robustness, sensitivity, dataset statistics.

matplotlib is an optional dependency (extra ``plots``); every function raises a clear
:class:`MbrecError` when it is missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from mbrec.errors import MbrecError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise MbrecError("plots need matplotlib: pip install 'mbrec[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=130, format="png")
    _pyplot().close(fig)
    return p


def plot_noise(
    ratios: Sequence[float],
    absolute: Mapping[str, Sequence[tuple[float, float]]],
    relative: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    metric: str = "HR@10",
    title: str = "",
) -> Path:
    """RMBRec Fig. 3 style: left, ``metric`` (mean ± std) per perturbation ratio for each model;
    right, the relative change against the clean data (ratio 0). ``absolute[model]`` holds
    ``(mean, std)`` per ratio, ``relative[model]`` the relative change per ratio."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [100 * r for r in ratios]
    for model, pts in absolute.items():
        means = [m for m, _ in pts]
        stds = [s for _, s in pts]
        ax1.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=model)
    for model, rel in relative.items():
        ax2.plot(xs, [100 * v for v in rel], marker="o", label=model)
    for ax in (ax1, ax2):
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("auxiliary edges removed (-) / added (+), %")
        ax.set_xticks(xs)
    ax2.axhline(0, color="grey", lw=0.6)
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} under auxiliary noise")
    ax2.set_ylabel(f"relative change of {metric}, %")
    ax2.set_title("change against clean data")
    ax1.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sweep_line(
    param: str,
    values: Sequence[Any],
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    metric: str,
    title: str = "",
) -> Path:
    """Metric (mean ± std over seeds) against one hyperparameter, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    for model, pts in series.items():
        ax.errorbar(xs, [m for m, _ in pts], yerr=[s for _, s in pts], marker="o", capsize=3, label=model)
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 100:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {param}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep_heatmap(
    params: tuple[str, str],
    values: tuple[Sequence[Any], Sequence[Any]],
    grid: Sequence[Sequence[float]],
    path: str | Path,
    *,
    metric: str,
    title: str = "",
) -> Path:
    """Heatmap of ``grid[i][j]`` = metric at ``params[0] = values[0][i]``, ``params[1] = values[1][j]``."""
    import numpy as np

    plt = _pyplot()
    arr = np.asarray(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * arr.shape[1], 1.0 + 0.7 * arr.shape[0]))
    im = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(values[1])))
    ax.set_xticklabels([str(v) for v in values[1]])
    ax.set_yticks(range(len(values[0])))
    ax.set_yticklabels([str(v) for v in values[0]])
    ax.set_xlabel(params[1])
    ax.set_ylabel(params[0])
    finite = arr[np.isfinite(arr)]
    mid = float(finite.mean()) if finite.size else 0.0
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if math.isfinite(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.4f}", ha="center", va="center", fontsize=8,
                        color="black" if arr[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title or metric)
    return _save(fig, path)


def plot_stats(stats: Mapping[str, Any], path: str | Path) -> Path:
    """Dataset diagnostics from :func:`mbrec.data.stats.compute_stats`: per-behavior training
    counts (log scale, valid/test stacked), BAR per auxiliary behavior and DT (train and all)."""
    plt = _pyplot()
    counts = stats.get("counts") or {}
    behaviors = list(stats.get("behaviors") or counts)
    if not behaviors:
        raise MbrecError("plot_stats: the stats have no behaviors")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.2, 1]})
    xs = range(len(behaviors))
    width = 0.27
    for j, split in enumerate(("train", "valid", "test")):
        vals = [max(int(counts.get(b, {}).get(split, 0)), 0) for b in behaviors]
        bars = ax1.bar([x + (j - 1) * width for x in xs], [v if v > 0 else float("nan") for v in vals], width, label=split)
        if split == "train":
            for rect, v in zip(bars, vals):
                if v > 0:
                    ax1.annotate(f"{v:,}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax1.set_yscale("log")
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(behaviors)
    ax1.set_ylabel("user-item pairs")
    users, items = stats.get("users"), stats.get("items")
    ax1.set_title(f"{stats.get('name', '')}: {users:,} users, {items:,} items" if users and items else "pairs per behavior")
    ax1.legend(fontsize=8)
    bar = stats.get("bar") or {}
    dt = stats.get("dt") or {}
    labels = [f"BAR({b})" for b in (bar.get("train") or {})] + ["DT"]
    for j, scope in enumerate(("train", "all")):
        vals = list((bar.get(scope) or {}).values()) + [dt.get(scope, float("nan"))]
        pos = [x + (j - 0.5) * 0.38 for x in range(len(labels))]
        rects = ax2.bar(pos, vals, 0.38, label=f"target pairs: {scope}")
        for rect, v in zip(rects, vals):
            if isinstance(v, (int, float)) and math.isfinite(v):
                ax2.annotate(f"{v:.3f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(labels)))
    ax2.set_xticklabels(labels)
    ax2.set_ylim(0, 1.1)
    ax2.set_title(f"alignment with the target ({stats.get('target', '')})")
    ax2.legend(fontsize=8)
    return _save(fig, path)


__all__ = ["plot_noise", "plot_stats", "plot_sweep_heatmap", "plot_sweep_line"]
