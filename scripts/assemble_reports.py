"""Rebuild RESULTS.md and BENCHMARKS.md from the per-topic files.

    python scripts/assemble_reports.py          # rewrite both
    python scripts/assemble_reports.py --check  # exit 1 if either is out of date

Each report keeps its own introduction (everything above its first ``---`` line); then every
topic file follows, in a fixed order, after a ``---`` rule. A topic file whose first heading is
``# ...`` has all its headings moved down one level so that it nests under the report's title.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = {
    "RESULTS.md": ("results", ["lightgcn", "rmbrec", "copf", "pkef", "baselines", "bigel", "experiments"]),
    "BENCHMARKS.md": ("benchmarks", ["engine", "data", "rmbrec", "copf", "baselines", "bigel", "experiments"]),
}


def demote(text: str) -> str:
    first = next((ln for ln in text.splitlines() if ln.startswith("#")), "")
    if not first.startswith("# "):
        return text
    out, fenced = [], False
    for ln in text.splitlines():
        if ln.startswith("```"):
            fenced = not fenced
        out.append("#" + ln if not fenced and re.match(r"#+ ", ln) else ln)
    return "\n".join(out) + "\n"


def build(report: str) -> str:
    folder, topics = REPORTS[report]
    current = (ROOT / report).read_text()
    intro = current.split("\n---\n", 1)[0].rstrip("\n") + "\n"
    parts = [intro]
    for t in topics:
        parts.append("---\n\n" + demote((ROOT / folder / f"{t}.md").read_text()).strip("\n") + "\n")
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for report in REPORTS:
        text = build(report)
        if (ROOT / report).read_text() != text:
            stale.append(report)
            if not args.check:
                (ROOT / report).write_text(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale) + " (run python scripts/assemble_reports.py)")
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or REPORTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
