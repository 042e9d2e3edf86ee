"""The ``mbrec`` command line. Subcommands live in small modules that each ``register`` theirs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mbrec import __version__
from mbrec.errors import MbrecError

#: modules that add subcommands; a missing optional module is skipped
COMMAND_MODULES = ("mbrec.cli.data_cmds", "mbrec.cli.run_cmds", "mbrec.cli.experiment_cmds", "mbrec.cli.report_cmds",
                   "mbrec.cli.fetch_cmds", "mbrec.cli.serve_cmds")

#: subcommands that train or evaluate: without ``--threads`` they run with
#: :func:`mbrec.threads.default_threads` torch threads (the others never import torch for it)
COMPUTE_COMMANDS = frozenset({"train", "evaluate", "recommend", "reselect", "experiment", "noise", "sweep", "tune",
                              "bench"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbrec",
        description="Multi-behavior recommendation: train, evaluate and compare models under explicit protocols.",
    )
    parser.add_argument("--version", action="version", version=f"mbrec {__version__}")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: $OMP_NUM_THREADS or $MKL_NUM_THREADS if set, else "
                             "the usable CPUs, at most 8, less the 1-minute load average, at least 1; "
                             "see mbrec.threads and BENCHMARKS.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"mbrec: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads is not None or args.command in COMPUTE_COMMANDS:
        from mbrec.threads import apply_threads, default_threads

        apply_threads(args.threads if args.threads is not None else default_threads())
    try:
        return int(args.func(args) or 0)
    except MbrecError as e:
        print(f"mbrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`mbrec recommend ... | head -1`): end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # unreadable or unwritable files and folders
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"mbrec {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mbrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
