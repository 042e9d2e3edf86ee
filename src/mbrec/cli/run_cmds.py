"""``mbrec train``, ``evaluate``, ``recommend`` and ``models``."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbrec.errors import MbrecError, UnknownNameError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train a model, select an epoch, evaluate, write a run folder")
    p.add_argument("model", help="model name (see `mbrec models`)")
    p.add_argument("data", help="dataset folder, a name under $MBREC_DATASETS, or a built-in (synthetic)")
    p.add_argument("--config", help="YAML config (configs/<model>/<dataset>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.lr=1e-3 (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--epochs", type=int, help="epoch cap (train.epochs)")
    p.add_argument("--protocol", help="protocol preset (default, rmbrec, copf, mmr)")
    p.add_argument("--out", help="run folder (default runs/<model>-<data>-s<seed>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log on stderr")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel on N local ranks, started through torch.distributed.run "
                        "(the same as torchrun --nproc_per_node=N -m mbrec train ...; docs/distributed.md)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a finished run (optionally under another protocol)")
    p.add_argument("run_dir")
    p.add_argument("--protocol", help="preset name (default: the run's own protocol)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol field override, e.g. ks=[5,10]")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-K items for users, in the dataset's own ids")
    p.add_argument("run_dir")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", nargs="+", help="user id(s) as in the dataset files")
    who.add_argument("--users", choices=["all"], help="every user")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--behavior", help="behavior to rank for (default: the target)")
    p.add_argument("--out", help="write CSV user,behavior,rank,item,score here instead of printing")
    p.add_argument("--device")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("bench", help="time training steps of a model against its measured kernel floor",
                       description="Runs --steps training steps (after one warm-up) and times, each alone with the "
                       "fastest kernel, the sparse and dense products one step requires (the floor). Prints the "
                       "products, the floor and measured step and epoch times, their ratio and peak memory.")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--config", help="YAML config (default: configs/<model>/<data>.yaml when it exists)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timings per floor product (median; default 5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="steps, then the floor's products, this many times in turn (medians over the rounds; default 1)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time with the wall clock (default) or this process's CPU time (steadier on a shared "
                        "or virtual machine; compare CPU times at one thread only)")
    p.add_argument("--pretrain", action="store_true",
                   help="time the model's pretraining steps instead (MB-CGCN's view pretraining)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="list the registered models, or one model's options")
    p.add_argument("model", nargs="?", help="show this model's options (model_args) with defaults and allowed values")
    p.set_defaults(func=cmd_models)


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.set)
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    if args.device:
        extra.append(f"device={args.device}")
    if args.epochs is not None:
        extra.append(f"train.epochs={args.epochs}")
    if args.protocol:
        extra.append(f"protocol.preset={args.protocol}")
    return extra


def _resume_config(args: argparse.Namespace) -> "Any":
    """The saved config of ``--out`` with the command's own settings on top; the trainer then
    refuses any of them that changes the run (all but a raised epoch cap)."""
    from mbrec.config import config_from_dict, deep_merge, parse_overrides, read_yaml
    from mbrec.rundir import RunFolder

    if not args.out:
        raise MbrecError("--resume needs --out RUN_DIR (the folder of the interrupted run)")
    folder = RunFolder(args.out)
    folder.check_writable(resume=True)
    saved = folder.read_config()
    if args.model != saved.model:
        raise MbrecError(f"{args.out} trains {saved.model!r}, not {args.model!r}; --resume continues a run as it was")
    if args.data != saved.data and Path(args.data).resolve() != Path(saved.data).resolve():
        raise MbrecError(f"{args.out} trains on {saved.data!r}, not {args.data!r}; --resume continues a run as it was")
    raw = saved.to_dict()
    if args.config:
        raw = deep_merge(raw, read_yaml(args.config))
        raw["data"] = saved.data  # the DATA argument wins over the file's ``data:``, as in a fresh run
    return config_from_dict(deep_merge(raw, parse_overrides(_overrides(args))))


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The ``mbrec`` arguments that repeat this ``train`` command on each rank (without ``--nproc``)."""
    argv = ["--threads", str(args.threads)] if getattr(args, "threads", None) is not None else []
    argv += ["train", args.model, args.data]
    for flag in ("config", "seed", "device", "epochs", "protocol", "out"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    for item in args.set:
        argv += ["--set", item]
    return argv + [f"--{flag}" for flag in ("resume", "quiet", "json") if getattr(args, flag)]


def _train_config(args: argparse.Namespace) -> "Any":
    from mbrec.config import build_config

    if args.resume:
        return _resume_config(args)
    return build_config(args.model, args.data, config_file=args.config, overrides=_overrides(args))


def cmd_train(args: argparse.Namespace) -> int:
    from mbrec import distributed
    from mbrec.train import train

    par = distributed.Parallel.from_env()
    if args.nproc is not None:
        if args.nproc < 1:
            raise MbrecError(f"--nproc must be at least 1, got {args.nproc}")
        if par is not None:
            raise MbrecError("--nproc starts its own ranks; under torchrun leave it out (--nproc_per_node sets them)")
        if args.nproc > 1:
            return distributed.launch(args.nproc, _train_argv(args))
    if par is not None:
        return _train_rank(args, par)
    cfg = _train_config(args)
    metrics = train(cfg, args.out, resume=args.resume, quiet=args.quiet or args.json)
    _print_train_result(args, cfg, metrics)
    return 0


def _train_rank(args: argparse.Namespace, par: "Any") -> int:
    """One rank of a data-parallel ``mbrec train`` (started by torchrun): rank 0 resolves the
    configuration and sends it to all; rank 0 alone prints the result."""
    from mbrec.distributed import RankStopped, lost_contact, rank_threads
    from mbrec.train import train

    threads = rank_threads(par.local_world, getattr(args, "threads", None))
    if threads is not None:
        from mbrec.threads import apply_threads

        apply_threads(threads)
    par.start()
    try:
        cfg = par.from_main(lambda: _train_config(args))
        metrics = train(cfg, args.out, resume=args.resume, quiet=args.quiet or args.json, parallel=par)
    except RankStopped:
        return 2  # rank 0 prints why
    except MbrecError as e:
        if not par.is_main and e.args:  # say which rank (several may report the same error)
            e.args = (f"rank {par.rank}: {e.args[0]}", *e.args[1:])
        raise
    except RuntimeError as e:
        if not lost_contact(e):
            raise
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]  # gloo: "[file:line] text. ..."
        raise MbrecError(f"rank {par.rank}: lost contact with another rank ({why[:160]}); "
                         "that rank's own error, printed above, says why") from None
    finally:
        par.close()
    if par.is_main:
        _print_train_result(args, cfg, metrics)
    return 0


def _print_train_result(args: argparse.Namespace, cfg: "Any", metrics: dict[str, Any]) -> None:
    from mbrec.report import metrics_table

    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    else:
        print()
        print(f"{cfg.model} on {metrics['dataset']}: best epoch {metrics['best_epoch']} of {metrics['epochs_run']} "
              f"({metrics['selection']})")
        print(cfg.protocol.describe())
        print(metrics_table(metrics))
        print(f"median epoch {metrics['epoch_seconds_median']:.3g}s, final evaluation {metrics['eval_seconds']:.3g}s")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mbrec.config import parse_overrides
    from mbrec.evaluate import check_protocol_fits, evaluate, has_valid, task_behaviors
    from mbrec.protocol import get_protocol
    from mbrec.report import metrics_table
    from mbrec.rundir import evaluate_task_checkpoints, load_run, task_checkpoint

    cfg, data, model, graphs = load_run(args.run_dir, args.device)
    protocol = get_protocol(args.protocol, **parse_overrides(args.set)) if args.protocol else get_protocol(cfg.protocol, **parse_overrides(args.set))
    check_protocol_fits(protocol, data)
    if args.split == "valid" and not has_valid(data):
        raise MbrecError(f"dataset {data.name!r} has no validation split")
    tasks = task_behaviors(model, data, protocol)
    # a run selected per task: every behavior that has its own checkpoint is evaluated from it (as in
    # metrics.json); best.pt (loaded by load_run) serves only the others
    own = [b for b in tasks if cfg.protocol.select_behavior == "each" and task_checkpoint(args.run_dir, b).is_file()]
    mb = cfg.train.eval_memory_mb
    with torch.no_grad():
        rest = tuple(b for b in tasks if b not in own)
        found = evaluate(model, graphs, data, protocol, args.split, memory_mb=mb, behaviors=rest) if rest else {}
        if own:
            found.update(evaluate_task_checkpoints(model, graphs, data, protocol, args.run_dir, own,
                                                   (args.split,), memory_mb=mb)[args.split])
    result = {b: found[b] for b in tasks if b in found}
    out = {"run": str(args.run_dir), "model": cfg.model, "dataset": data.name, "split": args.split,
           "protocol": protocol.as_dict(), args.split: result}
    if args.json:
        print(json.dumps(out))
    else:
        print(protocol.describe())
        print(metrics_table(out, splits=(args.split,)))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from mbrec.evaluate import recommend
    from mbrec.rundir import load_run

    if args.k < 1:
        raise MbrecError(f"--k must be at least 1, got {args.k}")
    if args.out:
        _check_output_file(Path(args.out))
    cfg, data, model, graphs = load_run(args.run_dir, args.device, behavior=args.behavior)
    behavior = args.behavior or data.target
    if behavior not in data.behaviors:
        raise UnknownNameError(f"unknown behavior {behavior!r}; this dataset has {list(data.behaviors)}")
    model.check_behavior(behavior)
    if args.k > data.n_items:
        raise MbrecError(f"--k {args.k} is more than the {data.n_items:,} items of {data.name!r}")
    if args.users == "all":
        users = np.arange(data.n_users)
    else:
        users = np.array([data.user_index(u) for u in args.user], dtype=np.int64)
    with torch.no_grad():
        emb = model.embed(graphs, (behavior,))
        items, scores = recommend(model, emb, data, users, behavior, args.k, cfg.protocol,
                                  memory_mb=cfg.train.eval_memory_mb)
    handle = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        rows = _write_recommendations(handle, data, users, behavior, items, scores)
    finally:
        if args.out:
            handle.close()
    if args.out:
        print(f"wrote {rows:,} rows to {args.out}", file=sys.stderr)
    return 0


def _check_output_file(out: Path) -> None:
    """An output file path must be writable: not a folder, in an existing folder."""
    if out.is_dir():
        raise MbrecError(f"--out {out} is a folder; give a file name such as {out / 'recommendations.csv'}")
    if not out.parent.is_dir():
        raise MbrecError(f"--out {out}: the folder {out.parent} does not exist")


def _write_recommendations(handle: Any, data: Any, users: np.ndarray, behavior: str, items: np.ndarray,
                           scores: np.ndarray) -> int:
    """CSV ``user,behavior,rank,item,score``; returns the number of rows written (users with fewer
    unmasked items than K get fewer rows)."""
    w = csv.writer(handle)
    w.writerow(["user", "behavior", "rank", "item", "score"])
    rows = 0
    for row, u in enumerate(users):
        for rank in range(items.shape[1]):
            i = items[row, rank]
            if i < 0:
                break
            w.writerow([data.user_ids[u], behavior, rank + 1, data.item_ids[i], f"{scores[row, rank]:.6g}"])
            rows += 1
    return rows


def cmd_bench(args: argparse.Namespace) -> int:
    from mbrec.bench import bench
    from mbrec.config import build_config

    if args.steps < 1 or args.repeats < 1 or args.rounds < 1:
        raise MbrecError("--steps, --repeats and --rounds must be at least 1")
    config = args.config
    if config is None:
        guess = Path(__file__).resolve().parents[3] / "configs" / args.model / f"{Path(args.data).name}.yaml"
        config = str(guess) if guess.is_file() else None
    extra = list(args.set) + ([f"device={args.device}"] if args.device else [])
    cfg = build_config(args.model, args.data, config_file=config, overrides=extra)
    report = bench(cfg, steps=args.steps, repeats=args.repeats, clock=args.clock, pretrain=args.pretrain, rounds=args.rounds,
                   out=None if args.json else (lambda m: print(m, file=sys.stderr)))
    if args.json:
        print(json.dumps({**report.as_dict(), "config": config}))
    else:
        print(f"config: {config or 'model defaults'}")
        print(report.table())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mbrec.models.base import available_models, get_model_class
    from mbrec.options import describe_options

    if args.model:
        cls = get_model_class(args.model)
        print(f"{cls.name}: {cls.summary}")
        print("options (--set model_args.NAME=VALUE):")
        for name, default, allowed, doc in describe_options(cls.config_class):
            print(f"  {name:18s} default {default!r}" + (f"; {allowed}" if allowed else "") + (f". {doc}" if doc else ""))
        if cls.train_defaults:
            print("training defaults: " + ", ".join(f"train.{k}={v!r}" for k, v in cls.train_defaults.items()))
        return 0
    for name in available_models():
        cls = get_model_class(name)
        print(f"{name:10s} {cls.summary}")
    return 0
