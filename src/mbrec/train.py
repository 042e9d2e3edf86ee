"""The trainer: seeds, Adam, early stopping on the protocol's selection metric, checkpoints,
resumption, and the run folder.

Run folder (contract)::

    RUN_DIR/config.yaml    the resolved configuration (re-runnable with --config)
    RUN_DIR/train.log      one line per epoch: every loss term, the evaluation metrics, time
    RUN_DIR/metrics.json   final metrics (see design.md), the protocol, the per-epoch history
    RUN_DIR/best.pt        model weights at the selected epoch (with ``select_behavior: each``:
                           the target's selected epoch)
    RUN_DIR/best_<B>.pt    with ``protocol.select_behavior: each`` only: weights at behavior B's
                           own selected epoch (``mbrec recommend --behavior B`` uses them)
    RUN_DIR/last.pt        weights, optimizer, RNG states and history after the last epoch
                           (``--resume`` continues from here and ends where an uninterrupted
                           run with the same seed ends)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mbrec.config import RunConfig, config_from_dict, read_yaml
from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError, MbrecError
from mbrec.evaluate import Metrics, evaluate, selection_value
from mbrec.models.base import Model, get_model_class

log = logging.getLogger("mbrec")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda[:N]")
    return torch.device(name)


def load_data(cfg: RunConfig) -> MultiBehaviorData:
    from mbrec.data.registry import load_dataset

    return load_dataset(cfg.data, seed=cfg.seed, **cfg.data_options)


def build_model(cfg: RunConfig, data: MultiBehaviorData, device: torch.device) -> Model:
    cls = get_model_class(cfg.model)
    return cls(data, cfg.model_args).to(device)


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(cfg.data).name or "data"
    return Path("runs") / f"{cfg.model}-{data}-s{cfg.seed}-{stamp}"


def _progress_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


def _to_tensors(batch: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def _fmt_metrics(prefix: str, m: Metrics, names: tuple[str, ...] = ("HR", "NDCG")) -> str:
    """One log fragment; per-epoch lines show HR and NDCG, metrics.json holds everything."""
    parts = []
    for b, vals in m.items():
        tag = f"{prefix}[{b}]" if len(m) > 1 else prefix
        shown = [f"{k} {v:.4f}" for k, v in vals.items() if k.split("@")[0] in names]
        parts.append(tag + " " + " ".join(shown))
    return " | ".join(parts)


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    best_value: float = -math.inf
    best_epoch: int = 0
    best_valid: Metrics = field(default_factory=dict)
    best_test: Metrics = field(default_factory=dict)
    #: ``select_behavior: each``: behavior -> [best value, its epoch]
    best_tasks: dict[str, list[float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    stopped: bool = False


class Trainer:
    """Trains one model on one dataset under one protocol and writes the run folder."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path | None = None,
        *,
        data: MultiBehaviorData | None = None,
        quiet: bool = False,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out_dir) if out_dir else default_run_dir(cfg)
        self.device = resolve_device(cfg.device)
        self.quiet = quiet
        self._data = data

    # -- setup ------------------------------------------------------------------------
    def _logger(self) -> logging.Logger:
        logger = logging.getLogger(f"mbrec.run.{self.out.resolve()}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        fh = logging.FileHandler(self.out / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
        if not self.quiet:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(sh)
        return logger

    def _check_protocol(self, data: MultiBehaviorData) -> None:
        p = self.cfg.protocol
        if p.selection == "validation" and not has_valid(data):
            raise ConfigError(
                f"dataset {data.name!r} has no validation pairs for {data.target!r}, but protocol "
                f"{p.name!r} selects on validation. Carve one with --set data_options.carve_valid=true, "
                "or select on test (paper parity) with --set protocol.selection=test"
            )

    # -- main loop ----------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            if not (self.out / "last.pt").is_file():
                raise MbrecError(f"cannot resume: {self.out / 'last.pt'} does not exist")
        else:
            if self.out.exists() and any(self.out.iterdir()):
                raise MbrecError(f"run folder {self.out} already exists and is not empty; use --resume or another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(cfg.to_yaml())
        logger = self._logger()
        set_seed(cfg.seed)
        data = self._data if self._data is not None else load_data(cfg)
        self._check_protocol(data)
        model = build_model(cfg, data, self.device)
        graphs = model.build_graphs(data, self.device)
        sampler = model.make_sampler(data)
        tc = cfg.train
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        rng = np.random.default_rng(cfg.seed)
        st = _State()
        if resume:
            ck = torch.load(self.out / "last.pt", map_location=self.device, weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            rng.bit_generator.state = ck["numpy_rng"]
            torch.set_rng_state(ck["torch_rng"])
            st = _State(**ck["state"])
            logger.info(f"resumed from {self.out / 'last.pt'} after epoch {st.epoch}")
        else:
            logger.info(f"mbrec run: model {cfg.model}, data {data.summary()}")
            if data.description:
                logger.info(f"data: {data.description}")
            logger.info(cfg.protocol.describe())
            n_params = sum(p.numel() for p in model.parameters())
            logger.info(f"{n_params:,} parameters, device {self.device}, seed {cfg.seed}")
            model.on_train_start(data, graphs, self.device, log=logger.info)
            if tc.eval_start == 0:
                self._evaluate_and_select(model, graphs, data, st, logger, epoch=0, train_terms={})

        show = _progress_enabled(tc.progress) and not self.quiet
        train_start = time.perf_counter()
        for epoch in range(st.epoch + 1, tc.epochs + 1):
            if st.stopped:
                break
            model.train()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n = 0
            batches = sampler.epoch(rng)
            if show:
                from tqdm import tqdm

                batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, total=getattr(sampler, "n_batches", None))
            for batch in batches:
                if tc.lr_decay_steps > 0 and tc.lr_decay != 1.0:
                    lr = tc.lr * tc.lr_decay ** (st.step // tc.lr_decay_steps)
                    for g in opt.param_groups:
                        g["lr"] = lr
                terms = model.loss(graphs, _to_tensors(batch, self.device))
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                st.step += 1
                n += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            if n == 0:
                raise MbrecError("the sampler produced no batch: is the training data empty?")
            secs = time.perf_counter() - t0
            st.epoch_seconds.append(secs)
            means = {k: v / n for k, v in sums.items()}
            if not all(math.isfinite(v) for v in means.values()):
                raise MbrecError(f"epoch {epoch}: a loss term is not finite {means}; lower the learning rate?")
            st.epoch = epoch
            evaluated = epoch >= tc.eval_start and (epoch - max(tc.eval_start, 1)) % max(tc.eval_every, 1) == 0
            if evaluated or epoch == tc.epochs:
                self._evaluate_and_select(model, graphs, data, st, logger, epoch, means, secs)
            else:
                st.history.append({"epoch": epoch, "seconds": secs, **means})
                logger.info(f"epoch {epoch:4d} | " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" | {secs:.1f}s")
            self._save_last(model, opt, rng, st)
            if tc.patience > 0 and st.best_epoch > 0 and epoch - st.best_epoch > tc.patience:
                logger.info(f"early stop at epoch {epoch}: no improvement since epoch {st.best_epoch}")
                st.stopped = True
                self._save_last(model, opt, rng, st)
                break
        train_seconds = time.perf_counter() - train_start
        return self._finish(model, graphs, data, st, logger, train_seconds)

    def _save_last(self, model: Model, opt: torch.optim.Optimizer, rng: np.random.Generator, st: _State) -> None:
        tmp = self.out / "last.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "state": dict(st.__dict__),
            },
            tmp,
        )
        os.replace(tmp, self.out / "last.pt")

    def _eval_splits(self, model: Model, graphs: Any, data: MultiBehaviorData, *, with_test: bool) -> tuple[Metrics, Metrics]:
        """Validation metrics (when the data has a validation split) and, if asked, test metrics,
        from one computation of the final embeddings."""
        p, mb = self.cfg.protocol, self.cfg.train.eval_memory_mb
        model.eval()
        with torch.no_grad():
            emb = model(graphs)
        valid = evaluate(model, graphs, data, p, "valid", emb=emb, memory_mb=mb) if has_valid(data) else {}
        test = evaluate(model, graphs, data, p, "test", emb=emb, memory_mb=mb) if with_test else {}
        return valid, test

    def _evaluate_and_select(
        self,
        model: Model,
        graphs: Any,
        data: MultiBehaviorData,
        st: _State,
        logger: logging.Logger,
        epoch: int,
        train_terms: Mapping[str, float],
        secs: float = 0.0,
    ) -> None:
        p, tc = self.cfg.protocol, self.cfg.train
        t0 = time.perf_counter()
        valid, test = self._eval_splits(model, graphs, data, with_test=p.selection == "test" or tc.test_every_eval)
        st.eval_seconds += time.perf_counter() - t0
        chosen = test if p.selection == "test" else valid
        if p.select_behavior == "each":
            improved = self._select_each(model, chosen, data.target, st, epoch)
        else:
            value = selection_value(chosen, p, data.target)
            improved = math.isfinite(value) and value > st.best_value
            if improved:
                st.best_value, st.best_epoch = value, epoch
                st.best_valid, st.best_test = valid, test
                torch.save(model.state_dict(), self.out / "best.pt")
        entry: dict[str, Any] = {"epoch": epoch, "seconds": secs, **train_terms}
        if valid:
            entry["valid"] = valid
        if test:
            entry["test"] = test
        st.history.append(entry)
        line = f"epoch {epoch:4d} | " + " ".join(f"{k} {v:.4f}" for k, v in train_terms.items())
        if valid:
            line += " | " + _fmt_metrics("valid", valid)
        if test:
            line += " | " + _fmt_metrics("test", test)
        logger.info(line + f" | {secs:.1f}s" + (" *" if improved else ""))
        model.train()

    def _select_each(self, model: Model, chosen: Metrics, target: str, st: _State, epoch: int) -> bool:
        """Per-task selection: every behavior whose metric improved gets this epoch's weights as
        ``best_<behavior>.pt`` (the target's also as ``best.pt``). ``best_epoch`` is the latest
        improvement of any task, so patience stops the run once no task has improved for that long."""
        metric = self.cfg.protocol.select_metric
        better = []
        for b, vals in chosen.items():
            v = float(vals.get(metric, float("nan")))
            if math.isfinite(v) and v > st.best_tasks.get(b, [-math.inf, 0])[0]:
                st.best_tasks[b] = [v, epoch]
                better.append(b)
        if not better:
            return False
        state = model.state_dict()
        for b in better:
            torch.save(state, task_checkpoint(self.out, b))
        if target in better or not (self.out / "best.pt").is_file():
            torch.save(state, self.out / "best.pt")
        st.best_epoch = epoch
        st.best_value = sum(v for v, _ in st.best_tasks.values())
        return True

    def _finish_each(self, model: Model, graphs: Any, data: MultiBehaviorData, st: _State) -> tuple[Metrics, Metrics]:
        """Valid and test metrics with every behavior taken from its own checkpoint."""
        splits = ("valid", "test") if has_valid(data) else ("test",)
        out = evaluate_task_checkpoints(model, graphs, data, self.cfg.protocol, self.out, list(st.best_tasks),
                                        splits, memory_mb=self.cfg.train.eval_memory_mb)
        model.load_state_dict(torch.load(self.out / "best.pt", map_location=self.device))
        return out.get("valid", {}), out["test"]

    def _finish(
        self,
        model: Model,
        graphs: Any,
        data: MultiBehaviorData,
        st: _State,
        logger: logging.Logger,
        train_seconds: float,
    ) -> dict[str, Any]:
        p, tc = self.cfg.protocol, self.cfg.train
        if (self.out / "best.pt").is_file():
            model.load_state_dict(torch.load(self.out / "best.pt", map_location=self.device))
        else:  # never evaluated: the last epoch is the result
            torch.save(model.state_dict(), self.out / "best.pt")
            st.best_epoch = st.epoch
        t0 = time.perf_counter()
        each = p.select_behavior == "each" and bool(st.best_tasks)
        if each:
            valid, test = self._finish_each(model, graphs, data, st)
            st.best_epoch = int(st.best_tasks.get(data.target, [0, st.best_epoch])[1])
            best_epochs = {b: int(e) for b, (_, e) in st.best_tasks.items()}
        else:
            valid, test = self._eval_splits(model, graphs, data, with_test=True)
            best_epochs = {b: st.best_epoch for b in test}
        eval_seconds = time.perf_counter() - t0
        metrics = {
            "model": self.cfg.model,
            "dataset": data.name,
            "target": data.target,
            "data_description": data.description,
            "seed": self.cfg.seed,
            "protocol": p.as_dict(),
            "selection": p.as_dict()["selection_note"],
            "best_epoch": st.best_epoch,
            "best_epochs": best_epochs,
            "epochs_run": st.epoch,
            "valid": valid,
            "test": test,
            "train_seconds": sum(st.epoch_seconds),
            "wall_seconds_this_session": train_seconds,
            "epoch_seconds_median": statistics.median(st.epoch_seconds) if st.epoch_seconds else 0.0,
            "eval_seconds": eval_seconds,
            "device": str(self.device),
            "torch": torch.__version__,
            "history": st.history,
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if each:
            logger.info("best epochs per task " + ", ".join(f"{b} {e}" for b, e in best_epochs.items())
                        + f" ({p.select_metric}, {metrics['selection']})")
        else:
            logger.info(f"best epoch {st.best_epoch} ({p.select_metric}, {metrics['selection']})")
        if valid:
            logger.info(_fmt_metrics("valid", valid))
        logger.info(_fmt_metrics("test", test))
        logger.info(f"run folder: {self.out}")
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        return metrics


def train(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    data: MultiBehaviorData | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and evaluate; returns the metrics dict written to ``metrics.json``."""
    return Trainer(cfg, out_dir, data=data, quiet=quiet).run(resume=resume)


def has_valid(data: MultiBehaviorData) -> bool:
    """Whether the data has a validation split (held-out target pairs)."""
    return bool(data.valid[data.target].nnz)


def task_checkpoint(run_dir: str | Path, behavior: str) -> Path:
    """Where ``select_behavior: each`` keeps ``behavior``'s selected weights."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in behavior)
    return Path(run_dir) / f"best_{safe}.pt"


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
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MbrecError(f"{run_dir} is not a run folder (no config.yaml)")
    if not (run_dir / "best.pt").is_file():
        raise MbrecError(f"{run_dir} has no best.pt: the run did not finish an evaluation")
    cfg = config_from_dict(read_yaml(run_dir / "config.yaml"))
    if device:
        cfg.device = device
    dev = resolve_device(cfg.device)
    set_seed(cfg.seed)
    data = load_data(cfg)
    model = build_model(cfg, data, dev)
    weights = task_checkpoint(run_dir, behavior) if behavior else None
    if weights is None or not weights.is_file():
        weights = run_dir / "best.pt"
    model.load_state_dict(torch.load(weights, map_location=dev))
    model.eval()
    graphs = model.build_graphs(data, dev)
    return cfg, data, model, graphs

