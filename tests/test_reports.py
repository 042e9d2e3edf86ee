"""RESULTS.md's paper tables are generated from results/summary.csv; the csv is well formed; links resolve."""

from __future__ import annotations

import copy
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["model", "dataset", "protocol", "selection", "metric", "paper", "mbrec", "seeds", "epochs", "command"]


def _assembler():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("assemble_reports", ROOT / "scripts" / "assemble_reports.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _csv() -> tuple[list[str], list[dict[str, str]]]:
    with (ROOT / "results" / "summary.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _generated_part(text: str, mod) -> str:  # type: ignore[no-untyped-def]
    return text.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0]


def test_results_md_is_built_from_summary_csv() -> None:
    mod = _assembler()
    assert (ROOT / "RESULTS.md").read_text() == mod.build("RESULTS.md"), \
        "RESULTS.md and results/summary.csv disagree: run python scripts/assemble_reports.py"


def test_a_changed_number_makes_results_md_stale() -> None:
    mod = _assembler()
    _, rows = _csv()
    tables = mod.load_tables()
    current = _generated_part((ROOT / "RESULTS.md").read_text(), mod)
    assert current.strip() == mod.render_tables(rows, tables).strip()
    changed = copy.deepcopy(rows)
    changed[0]["mbrec"] = f"{float(changed[0]['mbrec']) + 0.0123:.4f}"
    assert current.strip() != mod.render_tables(changed, tables).strip()


def test_summary_csv_has_exactly_the_columns() -> None:
    header, rows = _csv()
    assert header == COLUMNS
    assert rows, "results/summary.csv is empty"
    for r in rows:
        assert None not in r and all(v is not None for v in r.values()), f"wrong number of fields: {r}"


def test_summary_csv_values() -> None:
    mod = _assembler()
    header, rows = _csv()
    known = {"lightgcn", "rmbrec", "copf", "pkef", "bigel", "mbcgcn", "crgcn"}
    for r in rows:
        assert r["selection"] in ("validation", "test"), r
        float(r["mbrec"])
        if r["paper"] != "":
            float(r["paper"])
        assert r["model"].split("[", 1)[0] in known, r["model"]
        assert r["command"].strip() and r["seeds"].strip(), r
    assert mod.validate_summary(header, rows) == []


def test_known_models_are_the_registry() -> None:
    from mbrec.models.base import available_models

    assert set(_assembler().MODELS) == set(available_models())


def test_validate_summary_reports_bad_rows() -> None:
    mod = _assembler()
    header, rows = _csv()
    good = rows[0]
    assert mod.validate_summary(list(reversed(header)), rows)  # column order is part of the contract
    for col, bad in [("selection", "best"), ("paper", "n/a"), ("mbrec", ""), ("model", "sasrec"),
                     ("model", "rmbrec(orm=x)"), ("dataset", "tmall"), ("metric", "hit rate"), ("command", "")]:
        row = {**good, col: bad}
        assert mod.validate_summary(header, [row]), f"{col}={bad!r} passed"
    assert mod.validate_summary(header, [good, dict(good)]), "a duplicate row passed"
    other = {**good, "paper": "0.9999", "seeds": "7"}
    assert mod.validate_summary(header, [good, other]), "two paper numbers for one row passed"


def test_every_csv_row_is_shown_and_every_selector_matches() -> None:
    mod = _assembler()
    _, rows = _csv()
    tables = mod.load_tables()
    extra = {**rows[0], "seeds": "12345"}
    with pytest.raises(mod.ReportError, match="in no table"):
        mod.render_tables(rows + [extra], tables)
    broken = copy.deepcopy(tables)
    broken[0]["rows"].append({"model": "lightgcn", "dataset": "no-such-data"})
    with pytest.raises(mod.ReportError, match="no csv row matches"):
        mod.render_tables(rows, broken)


@pytest.mark.parametrize("report", ["RESULTS.md", "BENCHMARKS.md"])
def test_links_resolve(report: str) -> None:
    assert _assembler().broken_links(report) == []


def test_broken_anchor_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _assembler()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.md").write_text("# Top\n\n## CRGCN on crgcn-beibei (rmbrec, validation HR@20)\n")
    (tmp_path / "R.md").write_text("[a](results/x.md#crgcn-on-crgcn-beibei-rmbrec-validation-hr20) "
                                   "[b](results/x.md#nope) [c](results/missing.md)\n")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    problems = mod.broken_links("R.md")
    assert len(problems) == 2 and "nope" in problems[0] and "missing.md" in problems[1]
