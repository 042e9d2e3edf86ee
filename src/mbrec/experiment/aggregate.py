"""Mean ± std over seeds, paired t-tests against a reference row, paper-shaped tables.

* ``mean`` and ``std`` (sample standard deviation, ``ddof=1``; 0 for a single seed) of each
  (row, dataset, metric) over the seeds that finished.
* Paired t-test of a row against the reference over the seeds both have:
  ``d_s = x_s - ref_s``, ``t = mean(d) / (std(d, ddof=1) / sqrt(n))``, two-sided
  ``p = 2 * (1 - F_t(|t|; n - 1))`` (``scipy.stats.t``). Marks: ``*`` p < 0.05, ``**`` p < 0.01.
  Fewer than two paired seeds: no test. All differences equal and non-zero: ``p = 0``.
* The improvement row (as the papers print it): ``(ref - best other) / best other`` per
  column, marked when the reference differs significantly from that best other row.

Tables: rows = models, columns = dataset x metric. Markdown bolds the best mean per column.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from scipy import stats as _st

#: (row, dataset, metric) -> {seed: value}
Values = dict[tuple[str, str, str], dict[int, float]]


def paired_t_test(x: Iterable[float], y: Iterable[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``x`` against ``y``: ``(t, p)``; ``(nan, nan)`` for < 2 pairs."""
    a = np.asarray(list(x), dtype=np.float64)
    b = np.asarray(list(y), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return math.nan, math.nan
    d = a - b
    mean = d.mean()
    sd = d.std(ddof=1)
    if sd == 0.0:
        if mean == 0.0:
            return 0.0, 1.0
        return math.copysign(math.inf, mean), 0.0
    t = float(mean / (sd / math.sqrt(n)))
    p = float(2.0 * _st.t.sf(abs(t), df=n - 1))
    return t, p


def _md_mark(mark: str) -> str:
    """A significance mark escaped for Markdown (``*`` would start emphasis)."""
    return mark.replace("*", "\\*")


def significance_mark(p: float) -> str:
    if not math.isfinite(p):
        return ""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


@dataclass
class Cell:
    mean: float
    std: float
    n: int
    p: float = math.nan  # vs the reference (nan for the reference itself or without a test)
    t: float = math.nan

    @property
    def mark(self) -> str:
        return significance_mark(self.p)


@dataclass
class Table:
    """An aggregated experiment table."""

    rows: list[str]
    columns: list[tuple[str, str]]  # (dataset label, metric)
    cells: dict[tuple[str, str, str], Cell]
    reference: str | None = None
    improvement: dict[tuple[str, str], tuple[float, str, float]] = field(default_factory=dict)
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def cell(self, row: str, col: tuple[str, str]) -> Cell | None:
        return self.cells.get((row, col[0], col[1]))

    # -- Markdown ---------------------------------------------------------------------------
    def to_markdown(self, digits: int = 4) -> str:
        head = ["Model"] + [f"{d} {m}" for d, m in self.columns]
        lines = []
        if self.title:
            lines += [f"### {self.title}", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.columns)) + "|"]
        best = {}
        for col in self.columns:
            means = [(c.mean, r) for r in self.rows if (c := self.cell(r, col)) is not None and math.isfinite(c.mean)]
            best[col] = max(means)[1] if means else None
        for r in self.rows:
            out = [f"**{r}**" if r == self.reference else r]
            for col in self.columns:
                c = self.cell(r, col)
                if c is None:
                    out.append("—")
                    continue
                text = f"{c.mean:.{digits}f}" + (f" ± {c.std:.{digits}f}" if c.n > 1 else "")  # no spread from one seed
                out.append((f"**{text}**" if best[col] == r else text) + _md_mark(c.mark))
            lines.append("| " + " | ".join(out) + " |")
        if self.improvement:
            out = ["Improv."]
            for col in self.columns:
                imp = self.improvement.get(col)
                out.append("—" if imp is None else f"{imp[0]:+.2%}{_md_mark(significance_mark(imp[2]))}")
            lines.append("| " + " | ".join(out) + " |")
        lines.append("")
        lines.append(self.legend())
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def legend(self) -> str:
        n = sorted({c.n for c in self.cells.values()})
        seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}" if n else "0"
        text = f"Mean ± sample std over {seeds} seed(s) (no ± for a single seed); best mean per column in bold."
        if self.reference:
            text += (f" Marks: paired t-test over seeds against **{self.reference}** (* p < 0.05, ** p < 0.01)."
                     f" Improv.: ({self.reference} − best other row) / best other row, marked when"
                     f" {self.reference} differs significantly from that row.")
        return text

    # -- CSV --------------------------------------------------------------------------------
    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        head = ["model"]
        for d, m in self.columns:
            head += [f"{d} {m} mean", f"{d} {m} std", f"{d} {m} n", f"{d} {m} p_vs_ref", f"{d} {m} mark"]
        w.writerow(head)
        for r in self.rows:
            row: list[Any] = [r]
            for col in self.columns:
                c = self.cell(r, col)
                if c is None:
                    row += ["", "", 0, "", ""]
                else:
                    row += [f"{c.mean:.6f}", f"{c.std:.6f}" if c.n > 1 else "", c.n, "" if math.isnan(c.p) else f"{c.p:.6g}", c.mark]
            w.writerow(row)
        if self.improvement:
            row = ["Improv."]
            for col in self.columns:
                imp = self.improvement.get(col)
                row += ["", "", "", "", ""] if imp is None else [
                    f"{imp[0]:.6f}", "", "", "" if math.isnan(imp[2]) else f"{imp[2]:.6g}",
                    f"{significance_mark(imp[2])} vs {imp[1]}".strip()]
            w.writerow(row)
        return buf.getvalue()


def aggregate(
    values: Values,
    rows: list[str],
    columns: list[tuple[str, str]],
    reference: str | None = None,
    title: str = "",
) -> Table:
    """Build a :class:`Table` from per-seed values (see the module docstring)."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for r in rows:
        for d, m in columns:
            per_seed = values.get((r, d, m)) or {}
            if not per_seed:
                continue
            x = np.array(list(per_seed.values()), dtype=np.float64)
            cell = Cell(mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else 0.0, n=int(x.size))
            if reference is not None and r != reference:
                ref = values.get((reference, d, m)) or {}
                common = sorted(set(per_seed) & set(ref))
                cell.t, cell.p = paired_t_test([per_seed[s] for s in common], [ref[s] for s in common])
            cells[(r, d, m)] = cell
    table = Table(rows=rows, columns=columns, cells=cells, reference=reference, title=title)
    if reference is not None and len(rows) > 1:
        for col in columns:
            ref_cell = table.cell(reference, col)
            others = [(c.mean, r) for r in rows if r != reference and (c := table.cell(r, col)) is not None]
            if ref_cell is None or not others:
                continue
            best_mean, best_row = max(others)
            if best_mean == 0:
                continue
            p = cells[(best_row, col[0], col[1])].p
            table.improvement[col] = ((ref_cell.mean - best_mean) / best_mean, best_row, p)
    return table


__all__ = ["Cell", "Table", "aggregate", "paired_t_test", "significance_mark"]
