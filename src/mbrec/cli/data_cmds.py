"""Data subcommands: ``mbrec stats``, ``mbrec convert``, ``mbrec perturb``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from mbrec.errors import DataError

DATA_HELP = "dataset folder (any known layout), a folder name under $MBREC_DATASETS, or a built-in (synthetic, synthetic-large)"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, e.g. valid_policy=ignore, keep_empty=true, n_users=2000 (repeatable)")
    p.add_argument("--data-seed", type=int, default=0, dest="data_seed",
                   help="seed for synthetic data and random splits (default 0)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("stats", help="users, items, per-behavior counts and density, BAR, DT, behavior patterns")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG", help="also draw counts per behavior, BAR and DT to this PNG (needs matplotlib)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("convert", help="write a dataset in the generic format (interactions.csv + dataset.yaml)")
    _add_data_args(p)
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("perturb", help="add/remove a share of auxiliary edges (RMBRec noise study); writes the generic format")
    _add_data_args(p)
    p.add_argument("out_dir")
    p.add_argument("--ratio", type=float, required=True,
                   help="> 0 adds that share of each auxiliary behavior's edges, < 0 removes it")
    p.add_argument("--seed", type=int, default=0, help="perturbation seed (default 0)")
    p.add_argument("--behaviors", help="comma-separated auxiliary behaviors (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_perturb)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict with YAML-typed values (``true``, ``3``, ``0.5``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise DataError("--option needs KEY=VALUE", value=it)
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mbrec.data.registry import load_dataset

    return load_dataset(args.data, seed=getattr(args, "data_seed", 0) or 0,
                        **parse_options(getattr(args, "option", []) or []))


def cmd_stats(args: argparse.Namespace) -> int:
    from mbrec.data.stats import compute_stats, format_stats

    stats = compute_stats(_load(args))
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(stats) + "\n")
    else:
        print(format_stats(stats))
    if getattr(args, "plot", None):
        from mbrec.experiment.plots import plot_stats

        out = plot_stats(stats, args.plot)
        print(f"wrote {out}", file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mbrec.data.convert import write_generic

    data = _load(args)
    out = write_generic(data, args.out_dir, overwrite=bool(getattr(args, "overwrite", False)))
    print(f"wrote {out} ({data.summary()})")
    return 0


def cmd_perturb(args: argparse.Namespace) -> int:
    from mbrec.data.convert import write_generic
    from mbrec.data.perturb import perturb_auxiliary

    data = _load(args)
    bs = getattr(args, "behaviors", None)
    behaviors = [b.strip() for b in bs.split(",") if b.strip()] if bs else None
    noisy = perturb_auxiliary(data, args.ratio, args.seed, behaviors=behaviors)
    out = write_generic(noisy, args.out_dir, overwrite=bool(getattr(args, "overwrite", False)))
    print(f"wrote {out} ({noisy.summary()})")
    return 0
