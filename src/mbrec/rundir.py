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
    RUN_DIR/fingerprint.json  what the run was trained on: the SHA-256 of config.yaml, and the
                           data's counts per behavior and split with hashes of the id maps, the
                           training pairs and the held-out pairs. ``mbrec evaluate``,
                           ``recommend`` and ``--resume`` refuse a folder whose config or data
                           no longer match it.
    RUN_DIR/.lock          held (an OS file lock) while a process trains into the folder

The trainer writes through :class:`RunFolder`; ``mbrec evaluate`` and ``mbrec recommend`` read
through :func:`load_run` and :func:`evaluate_task_checkpoints`. Files are replaced atomically
(written beside, then renamed), so a crash never leaves half a file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import torch

from mbrec.config import RunConfig, config_from_dict, read_yaml
from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError, MbrecError
from mbrec.evaluate import Metrics, evaluate
from mbrec.models.base import Model, get_model_class


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``, refusing CUDA where it is not available."""
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


#: files a run writes before its first checkpoint; a folder holding nothing else (and no
#: ``last.pt``) is the remains of a run that failed early, and a fresh run may reuse it
_EARLY_FILES = ("config.yaml", "train.log", "fingerprint.json", ".lock", "best.pt", "last.pt.tmp",
                "config.yaml.tmp", "fingerprint.json.tmp", "best.pt.tmp")
#: top-level keys every config.yaml written by mbrec has
CONFIG_KEYS = ("model", "data", "data_options", "protocol", "seed", "device", "train", "model_args")


class RunFolder:
    """Paths, checks and writes of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.log_file = self.path / "train.log"
        self.metrics = self.path / "metrics.json"
        self.best = self.path / "best.pt"
        self.last = self.path / "last.pt"
        self.fingerprint = self.path / "fingerprint.json"
        self.lock_file = self.path / ".lock"

    def __str__(self) -> str:
        return str(self.path)

    # -- opening for writing ----------------------------------------------------------------
    def check_writable(self, *, resume: bool) -> bool:
        """Refuse a folder this run cannot use; returns whether it must be created."""
        if self.path.exists() and not self.path.is_dir():
            raise MbrecError(f"--out {self.path} is a file, not a folder; choose another --out")
        if resume:
            if not self.last.is_file():
                hint = (" (the run stopped before its first epoch ended; rerun the same command without "
                        "--resume to start it again in this folder)" if self.is_early_remains() else "")
                raise MbrecError(f"cannot resume: {self.last} does not exist{hint}")
            return False
        if not self.path.exists():
            return True
        if any(self.path.iterdir()) and not self.is_early_remains():
            raise MbrecError(f"run folder {self.path} already exists and is not empty; use --resume or another --out")
        return False

    def is_early_remains(self) -> bool:
        """Whether the folder holds only what a run writes before its first checkpoint."""
        if not self.path.is_dir() or self.last.is_file():
            return False
        return all(p.name in _EARLY_FILES or p.name.startswith("best_") for p in self.path.iterdir())

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MbrecError(f"cannot create run folder {self.path}: {e.strerror or e}") from None
        if not os.access(self.path, os.W_OK):
            raise MbrecError(f"run folder {self.path} is not writable; choose another --out")

    def clear_early_remains(self) -> None:
        """Remove what an early-failed run left (never ``last.pt`` or ``metrics.json``)."""
        for p in list(self.path.iterdir()) if self.path.is_dir() else []:
            if p.name != ".lock" and (p.name in _EARLY_FILES or p.name.startswith("best_")):
                p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's OS lock; a second writer is refused at once. Released on exit, and
        by the OS when the process dies."""
        import fcntl

        fh = open(self.lock_file, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            fh.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise MbrecError(f"run folder {self.path} is being written by another mbrec process (pid {owner}); "
                                 "wait for it to finish or use another --out") from None
            raise
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    # -- writing ------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig, data: MultiBehaviorData) -> None:
        """``config.yaml`` and the ``fingerprint.json`` that pins it and the data (atomically)."""
        text = cfg.to_yaml()
        _atomic_write_text(self.config, text)
        _atomic_write_text(self.fingerprint, json.dumps(
            {"config_sha256": _sha256_text(text), "data": data_fingerprint(data)}, indent=1))

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

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        _atomic_write_text(self.metrics, json.dumps(metrics, indent=1))

    # -- reading and verifying ------------------------------------------------------------------
    def load_last(self, device: torch.device) -> dict[str, Any]:
        ck = _load_checkpoint(self.last, device, full=True)
        if not isinstance(ck, dict) or not {"model", "optimizer", "state"} <= set(ck):
            raise MbrecError(f"{self.last} is not an mbrec training checkpoint; it cannot be resumed")
        return ck

    def load_weights(self, device: torch.device, behavior: str | None = None) -> dict[str, Any]:
        return _load_checkpoint(self.best if behavior is None else task_checkpoint(self.path, behavior), device)

    def read_config(self) -> RunConfig:
        """The run's resolved config; a missing, unparsable, incomplete or edited file is an error."""
        if not self.config.is_file():
            raise MbrecError(f"{self.path} is not a run folder (no config.yaml)")
        raw = read_yaml(self.config)
        missing = [k for k in CONFIG_KEYS if k not in raw]
        if missing:
            raise MbrecError(f"{self.config} lacks {', '.join(missing)}: it is not a config written by mbrec "
                             "(damaged or edited); restore it or retrain")
        pinned = self._fingerprint().get("config_sha256")
        if pinned and pinned != _sha256_text(self.config.read_text()):
            raise MbrecError(f"{self.config} was changed after the run was trained (its SHA-256 no longer matches "
                             f"{self.fingerprint.name}); restore it, or train a new run with the changed settings")
        return config_from_dict(raw)

    def verify_data(self, data: MultiBehaviorData) -> None:
        """Refuse data that differ from what the run was trained on."""
        pinned = self._fingerprint().get("data")
        if not pinned:
            print(f"mbrec: warning: {self.path} records no data fingerprint (written by an older mbrec); "
                  "the data it is used with are not verified", file=sys.stderr)
            return
        changes = fingerprint_changes(pinned, data_fingerprint(data))
        if changes:
            raise MbrecError(f"the data of {self.path} changed since it was trained ({'; '.join(changes)}); "
                             "retrain on the new data, or point the run at the original data")

    def _fingerprint(self) -> dict[str, Any]:
        if not self.fingerprint.is_file():
            return {}
        try:
            obj = json.loads(self.fingerprint.read_text())
        except (ValueError, OSError):
            raise MbrecError(f"{self.fingerprint} is damaged (not JSON); restore it or retrain") from None
        return obj if isinstance(obj, dict) else {}


def config_changes(old: dict[str, Any], new: dict[str, Any], *, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """``["train.lr 0.001 -> 0.5", ...]``: the dotted keys whose values differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, ignore=ignore, prefix=dotted + ".")
        elif a != b and dotted not in ignore:
            out.append(f"{dotted} {a!r} -> {b!r}")
    return out


def _load_checkpoint(path: Path, device: torch.device, *, full: bool = False) -> Any:
    """``torch.load`` with a one-line error for a missing, truncated or foreign file."""
    if not path.is_file():
        raise MbrecError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=not full)
    except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MbrecError(f"{path} is damaged or not a checkpoint ({reason[:120]}); restore it or retrain") from None


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_matrices(mats: Any, behaviors: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for b in behaviors:
        m = mats[b].tocsr()
        m.sort_indices()
        h.update(b.encode("utf-8") + b"\0")
        h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(m.indices, dtype=np.int64).tobytes())
    return h.hexdigest()


def data_fingerprint(data: MultiBehaviorData) -> dict[str, Any]:
    """Counts per behavior and split, and SHA-256 hashes of the id maps, the training pairs and
    the held-out pairs: enough to tell whether a run's data changed, small enough to store."""
    ids = hashlib.sha256()
    for arr in (data.user_ids, data.item_ids):
        ids.update("\n".join(str(x) for x in arr.tolist()).encode("utf-8") + b"\0")
    return {
        "n_users": data.n_users,
        "n_items": data.n_items,
        "behaviors": list(data.behaviors),
        "counts": data.counts(),
        "ids_sha256": ids.hexdigest(),
        "train_sha256": _hash_matrices(data.train, data.behaviors),
        "heldout_sha256": _hash_matrices(data.valid, data.behaviors) + _hash_matrices(data.test, data.behaviors),
    }


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two data fingerprints, in words (empty when they match)."""
    out = []
    for key in ("n_users", "n_items", "behaviors"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)} -> {new.get(key)}")
    for split, per in (old.get("counts") or {}).items():
        for b, n in per.items():
            m = (new.get("counts") or {}).get(split, {}).get(b)
            if m != n:
                out.append(f"{split} pairs of {b!r} {n:,} -> {m if m is None else format(m, ',')}")
    names = {"ids_sha256": "the user/item id maps", "train_sha256": "the training pairs",
             "heldout_sha256": "the held-out pairs"}
    out += [f"{what} differ" for key, what in names.items() if old.get(key) != new.get(key)]
    return out


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
            emb = model.embed(graphs, (b,))
            for split in splits:
                out[split].update(evaluate(model, graphs, data, protocol, split, emb=emb, behaviors=(b,),
                                           memory_mb=memory_mb))
    return out


def load_run(
    run_dir: str | Path, device: str | None = None, behavior: str | None = None
) -> tuple[RunConfig, MultiBehaviorData, Model, Any]:
    """Rebuild a finished run: its config, data, model (best weights) and graphs. With
    ``behavior`` and a per-task checkpoint for it (``select_behavior: each``), those weights.
    The config and the data are verified against the run's fingerprint."""
    from mbrec.train import set_seed

    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise MbrecError(f"{folder} is not a run folder (no such folder)")
    cfg = folder.read_config()
    if not folder.best.is_file():
        raise MbrecError(f"{folder} has no best.pt: the run did not finish an evaluation")
    if device:
        cfg.device = device
    dev = resolve_device(cfg.device)
    set_seed(cfg.seed)
    data = load_data(cfg)
    folder.verify_data(data)
    model = build_model(cfg, data, dev)
    own = behavior is not None and task_checkpoint(folder.path, behavior).is_file()
    try:
        model.load_state_dict(folder.load_weights(dev, behavior if own else None))
    except RuntimeError as e:
        raise MbrecError(f"the weights in {folder} do not fit the model its config describes "
                         f"({str(e).splitlines()[0][:120]})") from None
    model.eval()
    graphs = model.build_graphs(data, dev)
    return cfg, data, model, graphs
