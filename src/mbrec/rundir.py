"""The run folder: what a run writes, and how a finished run is read back.

Layout (contract)::

    RUN_DIR/config.yaml    the resolved configuration (re-runnable with --config)
    RUN_DIR/train.log      one line per epoch: every loss term, the evaluation metrics, time
    RUN_DIR/metrics.json   final metrics, the protocol, the per-epoch history
    RUN_DIR/best.pt        model weights at the selected epoch (with ``select_behavior: each``:
                           the target's selected epoch)
    RUN_DIR/best_<B>.pt    with ``protocol.select_behavior: each`` only: weights at behavior B's
                           own selected epoch (``mbrec recommend --behavior B`` uses them)
    RUN_DIR/last.pt        weights, optimizer, RNG states and trainer state after the last epoch
                           (``--resume`` continues from here and ends where an uninterrupted
                           run with the same seed ends)

The trainer writes through :class:`RunFolder`; ``mbrec evaluate`` and ``mbrec recommend`` read
through :func:`load_run` and :func:`evaluate_task_checkpoints`. Files are replaced atomically
(written beside, then renamed), so a crash never leaves half a file under a final name.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mbrec.config import RunConfig, config_from_dict, read_yaml
from mbrec.data.container import MultiBehaviorData
from mbrec.errors import MbrecError
from mbrec.evaluate import Metrics, evaluate
from mbrec.models.base import Model, get_model_class


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``, refusing CUDA where it is not available."""
    from mbrec.errors import ConfigError

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda[:N]")
    return torch.device(name)


def load_data(cfg: RunConfig) -> MultiBehaviorData:
    """The dataset a config names, with its loader options."""
    from mbrec.data.registry import load_dataset

    return load_dataset(cfg.data, seed=cfg.seed, **cfg.data_options)


def build_model(cfg: RunConfig, data: MultiBehaviorData, device: torch.device) -> Model:
    """The config's model for ``data``, on ``device``."""
    return get_model_class(cfg.model)(data, cfg.model_args).to(device)


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(cfg.data).name or "data"
    return Path("runs") / f"{cfg.model}-{data}-s{cfg.seed}-{stamp}"


def task_checkpoint(run_dir: str | Path, behavior: str) -> Path:
    """Where ``select_behavior: each`` keeps ``behavior``'s selected weights."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in behavior)
    return Path(run_dir) / f"best_{safe}.pt"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    """Paths and writes of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.log_file = self.path / "train.log"
        self.metrics = self.path / "metrics.json"
        self.best = self.path / "best.pt"
        self.last = self.path / "last.pt"

    def __str__(self) -> str:
        return str(self.path)

    def prepare(self, cfg: RunConfig, *, resume: bool) -> None:
        """Create (or, when resuming, check) the folder and write the resolved config."""
        if resume:
            if not self.last.is_file():
                raise MbrecError(f"cannot resume: {self.last} does not exist")
        elif self.path.exists() and any(self.path.iterdir()):
            raise MbrecError(f"run folder {self.path} already exists and is not empty; use --resume or another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.config, cfg.to_yaml())

    def logger(self, *, quiet: bool) -> logging.Logger:
        """A logger writing to ``train.log`` (and to stderr unless ``quiet``)."""
        logger = logging.getLogger(f"mbrec.run.{self.path.resolve()}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        close_logger(logger)
        fh = logging.FileHandler(self.log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
        if not quiet:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(sh)
        return logger

    def save_weights(self, state: dict[str, Any], behavior: str | None = None) -> None:
        """``best.pt``, or ``best_<behavior>.pt`` for a per-task checkpoint."""
        target = self.best if behavior is None else task_checkpoint(self.path, behavior)
        tmp = target.with_name(target.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)

    def save_last(self, checkpoint: dict[str, Any]) -> None:
        tmp = self.last.with_name("last.pt.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, self.last)

    def load_last(self, device: torch.device) -> dict[str, Any]:
        return torch.load(self.last, map_location=device, weights_only=False)

    def load_weights(self, device: torch.device, behavior: str | None = None) -> dict[str, Any]:
        f = self.best if behavior is None else task_checkpoint(self.path, behavior)
        return torch.load(f, map_location=device)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        _atomic_write_text(self.metrics, json.dumps(metrics, indent=1))


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def evaluate_task_checkpoints(
    model: Model,
    graphs: Any,
    data: MultiBehaviorData,
    protocol: Any,
    run_dir: str | Path,
    behaviors: list[str],
    splits: tuple[str, ...],
    *,
    memory_mb: float,
) -> dict[str, Metrics]:
    """``{split: {behavior: metrics}}`` with each behavior evaluated (alone) from its own
    ``best_<behavior>.pt``; behaviors without such a checkpoint are left out. Leaves the last
    loaded weights in ``model``."""
    out: dict[str, Metrics] = {s: {} for s in splits}
    for b in behaviors:
        f = task_checkpoint(run_dir, b)
        if not f.is_file():
            continue
        model.load_state_dict(torch.load(f, map_location=next(model.parameters()).device))
        model.eval()
        with torch.no_grad():
            emb = model(graphs)
            for split in splits:
                out[split].update(evaluate(model, graphs, data, protocol, split, emb=emb, behaviors=(b,),
                                           memory_mb=memory_mb))
    return out


def load_run(
    run_dir: str | Path, device: str | None = None, behavior: str | None = None
) -> tuple[RunConfig, MultiBehaviorData, Model, Any]:
    """Rebuild a finished run: its config, data, model (best weights) and graphs. With
    ``behavior`` and a per-task checkpoint for it (``select_behavior: each``), those weights."""
    from mbrec.train import set_seed

    folder = RunFolder(run_dir)
    if not folder.config.is_file():
        raise MbrecError(f"{folder} is not a run folder (no config.yaml)")
    if not folder.best.is_file():
        raise MbrecError(f"{folder} has no best.pt: the run did not finish an evaluation")
    cfg = config_from_dict(read_yaml(folder.config))
    if device:
        cfg.device = device
    dev = resolve_device(cfg.device)
    set_seed(cfg.seed)
    data = load_data(cfg)
    model = build_model(cfg, data, dev)
    own = behavior is not None and task_checkpoint(folder.path, behavior).is_file()
    model.load_state_dict(folder.load_weights(dev, behavior if own else None))
    model.eval()
    graphs = model.build_graphs(data, dev)
    return cfg, data, model, graphs
