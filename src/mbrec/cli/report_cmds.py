"""``mbrec reselect``: apply another checkpoint-selection rule to finished runs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mbrec.errors import MbrecError

_SEED = re.compile(r"seed\d+")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "reselect",
        help="apply another selection rule (target / sum / each / a behavior) to finished runs' histories",
        description="Reads each run's metrics.json history (the run must have been trained with "
        "--set train.test_every_eval=true) and reports test metrics at the epoch(s) the rule selects. "
        "Run folders named seed<N> form one group per parent folder (runs/<dataset>/<model>/seed*, as "
        "`mbrec experiment` writes them) with a mean ± std row; any other folder is its own row. "
        "Prints a markdown table per rule.",
    )
    p.add_argument("runs", nargs="+", help="run folders (or their metrics.json)")
    p.add_argument("--rule", action="append", default=[],
                   help="target | sum | each | <behavior> (repeatable; default: target, sum and each)")
    p.add_argument("--metric", help="metric the rule maximises (default: the run's protocol select_metric)")
    p.add_argument("--on", default="valid", choices=["valid", "test"],
                   help="split the rule reads (default valid; test = best-on-test, optimistic)")
    p.add_argument("--patience", type=int, default=0,
                   help="replay early stopping with this patience in epochs (default 0: the whole history)")
    p.add_argument("--columns", default=None,
                   help="comma list of metrics to show per behavior (default: the rule's metric)")
    p.add_argument("--reference", help="group whose seeds every other group is paired with (t-test p-values)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_reselect)


def cmd_reselect(args: argparse.Namespace) -> int:
    from mbrec.reselect import load_run, reselect, selection_table

    rules = args.rule or ["target", "sum", "each"]
    loaded = [(Path(r), load_run(r)) for r in args.runs]
    out: dict[str, list[dict[str, object]]] = {}
    for rule in rules:
        groups: dict[str, list[tuple[str, object]]] = {}
        for path, metrics in loaded:
            folder = path if path.is_dir() else path.parent
            s = reselect(metrics, rule, args.metric, on=args.on, patience=args.patience, where=str(folder))
            if _SEED.fullmatch(folder.name):
                groups.setdefault(folder.parent.name or str(folder.parent), []).append((folder.name, s))
            else:
                groups.setdefault(folder.name or str(folder), []).append(("", s))
            out.setdefault(rule, []).append({"run": str(folder), "epochs": s.epochs, "test": s.test,
                                             "valid": s.valid, "last_epoch": s.last_epoch,
                                             "stopped_early": s.stopped_early})
        if args.json:
            continue
        first = next(s for runs in groups.values() for _, s in runs)
        columns = args.columns.split(",") if args.columns else [first.metric]  # type: ignore[attr-defined]
        for runs in groups.values():
            for _, s in runs:
                missing = [c for c in columns if c not in next(iter(s.test.values()))]  # type: ignore[attr-defined]
                if missing:
                    raise MbrecError(f"--columns: {missing} not recorded")
        what = {"target": "the target's", "sum": "the sum over behaviors of", "each": "each behavior's own"}
        print(f"## rule `{rule}`: {what.get(rule, rule + ' ')} {first.metric} on {args.on}"  # type: ignore[attr-defined]
              + (f", patience {args.patience}" if args.patience else ", whole history") + "\n")
        print(selection_table(groups, columns, reference=args.reference) + "\n")  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(out, indent=1))
    return 0
