"""RESULTS.md and BENCHMARKS.md are the assembly of results/*.md and benchmarks/*.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _assembler():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("assemble_reports", ROOT / "scripts" / "assemble_reports.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize("report", ["RESULTS.md", "BENCHMARKS.md"])
def test_report_is_assembled_from_its_topic_files(report: str) -> None:
    mod = _assembler()
    assert (ROOT / report).read_text() == mod.build(report), f"run: python scripts/assemble_reports.py ({report} is stale)"


def test_demote_moves_headings_but_not_code() -> None:
    mod = _assembler()
    text = "# Title\n\n## Part\n\n```\n# a shell comment\n```\n"
    assert mod.demote(text) == "## Title\n\n### Part\n\n```\n# a shell comment\n```\n"
    assert mod.demote("## Already nested\n") == "## Already nested\n"
