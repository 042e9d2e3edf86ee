"""The trainer: seeds, Adam, one epoch at a time, early stopping on the protocol's selection
metric, and resumption. What it writes, and how a run is read back, is :mod:`mbrec.rundir`.

Building blocks reused outside the trainer (MB-CGCN's pretraining, ``benchmarks/``):

* :func:`train_step` - one optimizer step on one batch; returns the loss terms;
* :func:`train_epoch` - one pass of a sampler; returns the mean loss terms and the steps taken.

Data-parallel training (``torchrun``, ``mbrec train --nproc N``; :mod:`mbrec.distributed`,
``docs/distributed.md``): with a ``parallel`` argument every rank runs the same loop on its share
of each global batch (:func:`parallel_step`), and rank 0 alone writes, logs and evaluates.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from mbrec.baselines import popular_metrics
from mbrec.config import RunConfig
from mbrec.data.container import MultiBehaviorData
from mbrec.distributed import Parallel, batch_axis, param_digest, replica_digest, silent_logger
from mbrec.errors import ConfigError, MbrecError, NonFiniteError
from mbrec.evaluate import Metrics, check_protocol_fits, evaluate, has_valid, selection_value, task_behaviors
from mbrec.models.base import Batch, Model, Sampler
from mbrec.optim import adam, load_state
from mbrec.rundir import (
    RunFolder,
    build_model,
    close_logger,
    config_changes,
    default_run_dir,
    evaluate_task_checkpoints,
    load_data,
    resolve_device,
)

__all__ = ["Trainer", "TrainState", "has_valid", "parallel_step", "set_seed", "train", "train_epoch", "train_step"]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_tensors(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def train_step(
    model: Model, graphs: Any, batch: Batch, opt: torch.optim.Optimizer, device: torch.device, *, grad_clip: float = 0.0
) -> dict[str, torch.Tensor]:
    """One optimizer step of ``model.loss`` on one sampled batch; returns the loss terms."""
    terms = model.loss(graphs, to_tensors(batch, device))
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return terms


def parallel_step(
    model: Model, graphs: Any, batch: Batch, opt: torch.optim.Optimizer, device: torch.device, parallel: Parallel,
    *, axis: int = 0, grad_clip: float = 0.0
) -> dict[str, torch.Tensor]:
    """:func:`train_step` of one rank in data-parallel training: the loss on this rank's share of
    the global ``batch`` (:meth:`Parallel.shard`; a rank without rows skips it, unless the model's
    ``collective_loss`` says its loss calls :mod:`mbrec.collectives`), gradients
    summed over the ranks weighted by their shares (:meth:`Parallel.reduce_gradients`), then
    clipping (on the summed gradient) and the optimizer step, as in one process. Returns the
    loss terms times this rank's weight: summed over the ranks they are the global batch's terms
    (exactly so for terms that are means over the batch's rows)."""
    local, weight = parallel.shard(batch, axis)
    with parallel.sharing(weight):  # whole-batch terms through mbrec.collectives (every rank joins)
        runs = weight > 0 or getattr(model, "collective_loss", False)
        terms = model.loss(graphs, to_tensors(local, device)) if runs else {}
    opt.zero_grad(set_to_none=True)
    if terms:
        terms["loss"].backward()
    parallel.reduce_gradients(model.parameters(), weight)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return {k: v.detach() * weight for k, v in terms.items()}


def train_epoch(
    model: Model,
    graphs: Any,
    sampler: Sampler,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    device: torch.device,
    *,
    grad_clip: float = 0.0,
    before_step: Callable[[], None] | None = None,
    wrap: Callable[[Iterable[Batch]], Iterable[Batch]] | None = None,
    parallel: Parallel | None = None,
) -> tuple[dict[str, float], int]:
    """One pass of ``sampler``: ``(mean of every loss term, number of steps)``.

    ``before_step`` runs before each step (the trainer's learning-rate schedule); ``wrap`` wraps
    the batch iterator (a progress bar). With ``parallel`` every rank draws the same global
    batches and trains on its share of each (:func:`parallel_step`); the returned means are the
    global batches' (summed over the ranks). Raises when the sampler yields nothing."""
    model.train()
    sums: dict[str, float] = {}
    n = 0
    batches: Iterable[Batch] = sampler.epoch(rng)
    axis = batch_axis(sampler) if parallel is not None else 0
    for batch in wrap(batches) if wrap else batches:
        if before_step is not None:
            before_step()
        if parallel is None:
            terms = train_step(model, graphs, batch, opt, device, grad_clip=grad_clip)
        else:
            terms = parallel_step(model, graphs, batch, opt, device, parallel, axis=axis, grad_clip=grad_clip)
        n += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    if parallel is not None:
        sums = parallel.sum_terms(sums)
    if n == 0:
        raise MbrecError("the sampler produced no batch: is the training data empty?")
    return {k: v / n for k, v in sums.items()}, n


def _progress_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


def _fmt_metrics(prefix: str, m: Metrics, names: tuple[str, ...] = ("HR", "NDCG")) -> str:
    """One log fragment; per-epoch lines show HR and NDCG, metrics.json holds everything."""
    parts = []
    for b, vals in m.items():
        tag = f"{prefix}[{b}]" if len(m) > 1 else prefix
        shown = [f"{k} {v:.4f}" for k, v in vals.items() if k.split("@")[0] in names]
        parts.append(tag + " " + " ".join(shown))
    return " | ".join(parts)


def _fmt_terms(terms: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items())


LN2 = math.log(2.0)
#: epochs a pairwise loss term must sit within :data:`LN2_TOL` of ln 2 before the trainer warns
LN2_EPOCHS = 3
LN2_TOL = 0.01
#: loss terms that are pairwise (BPR-type): ln 2 is their value when scores stop separating
PAIRWISE_PREFIXES = ("bpr", "pme")


def at_ln2(history: list[Mapping[str, Any]], epochs: int = LN2_EPOCHS, tol: float = LN2_TOL) -> set[str]:
    """The pairwise loss terms (names starting with :data:`PAIRWISE_PREFIXES`) within ``tol`` of
    ln 2 in each of the last ``epochs`` entries of ``history`` (per-epoch mean loss terms)."""
    if len(history) < epochs:
        return set()
    last = history[-epochs:]
    names = {k for k in last[-1] if k.startswith(PAIRWISE_PREFIXES)}
    return {k for k in names if all(isinstance(h.get(k), (int, float)) and abs(h[k] - LN2) <= tol for h in last)}


@dataclass
class TrainState:
    """Everything about a run's progress that ``last.pt`` must carry for an exact resume."""

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
    """Trains one model on one dataset under one protocol and writes the run folder.

    ``run`` = ``setup`` (folder, data, model, graphs, sampler, optimizer, maybe a resume), then
    ``train_epoch`` + ``evaluate_epoch`` until the epoch cap or early stopping, then ``finish``.
    All per-run objects live on the trainer after ``setup``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path | None = None,
        *,
        data: MultiBehaviorData | None = None,
        quiet: bool = False,
        parallel: Parallel | None = None,
    ) -> None:
        self.cfg = cfg
        self.folder = RunFolder(out_dir if out_dir else default_run_dir(cfg))
        self.out = self.folder.path
        #: data-parallel training (mbrec.distributed): this rank's place; None in one process
        self.parallel = parallel
        #: whether this process writes the run folder, logs and evaluates (rank 0, or alone)
        self.writes = parallel is None or parallel.is_main
        self.device = parallel.device(cfg.device) if parallel is not None else resolve_device(cfg.device)
        self.quiet = quiet or not self.writes
        self.data: MultiBehaviorData | None = data
        self.state = TrainState()
        self._reported = False
        #: loss terms already warned about sitting at ln 2 (one warning each)
        self._ln2_warned: set[str] = set()

    # -- setup ---------------------------------------------------------------------------
    def setup(self, *, resume: bool = False) -> None:
        """Build every per-run object; restore ``last.pt`` when resuming. The folder must be
        locked by the caller (``run`` does)."""
        cfg, par = self.cfg, self.parallel
        if not resume and self.writes:
            self.folder.clear_early_remains()
        self.log = self.folder.logger(quiet=self.quiet) if self.writes else silent_logger(par.rank)  # type: ignore[union-attr]
        set_seed(cfg.seed)
        if self.data is None:
            self.data = load_data(cfg)
        self._check_protocol(self.data)
        if resume:
            self._on_main(self._check_resume)
        self.model = build_model(cfg, self.data, self.device)
        if par is not None:
            par.check_same("data or initial parameters", replica_digest(self.data, self.model))
        self.graphs = self.model.build_graphs(self.data, self.device)
        self.sampler = self.model.make_sampler(self.data)
        self.opt = adam(self.model.parameters(), cfg.train.lr, cfg.train.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        data = self.data
        self._on_main(lambda: self.folder.write_config(cfg, data))
        if resume:
            self._restore()
        else:
            self._start()
        if par is not None:
            par.check_same("parameters after setup", param_digest(self.model))

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in one process; in data-parallel training run by rank 0 alone, its result
        (or its failure) sent to every rank."""
        return fn() if self.parallel is None else self.parallel.from_main(fn)

    def _check_resume(self) -> None:
        assert self.data is not None
        self._check_resume_config()
        self.folder.verify_data(self.data)

    def _check_resume_config(self) -> None:
        """A resumed run keeps its settings; only the epoch cap may be raised."""
        saved = self.folder.read_config()
        changed = config_changes(saved.to_dict(), self.cfg.to_dict(), ignore=("train.epochs",))
        if changed:
            raise ConfigError(f"--resume keeps the run's settings, but these differ from {self.folder.config}: "
                              f"{'; '.join(changed)}. Drop them, or train a new run with another --out")
        if self.cfg.train.epochs < saved.train.epochs:
            raise ConfigError(f"--resume may raise the epoch cap ({saved.train.epochs}), not lower it to "
                              f"{self.cfg.train.epochs}; evaluate an earlier epoch with mbrec reselect instead")

    def _check_protocol(self, data: MultiBehaviorData) -> None:
        p = self.cfg.protocol
        check_protocol_fits(p, data)
        if p.selection == "validation" and not has_valid(data):
            raise ConfigError(
                f"dataset {data.name!r} has no validation pairs for {data.target!r}, but protocol "
                f"{p.name!r} selects on validation. Carve one with --set data_options.carve_valid=true, "
                "or select on test (paper parity) with --set protocol.selection=test"
            )

    def _restore(self) -> None:
        if self.parallel is None:
            ck = self.folder.load_last(self.device)
        else:  # rank 0 reads it (the others may not see the run folder) and sends it to all
            ck = self.parallel.from_main(lambda: self.folder.load_last(torch.device("cpu")))
        self.model.load_state_dict(ck["model"])
        load_state(self.opt, ck["optimizer"])
        self.rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        self.state = TrainState(**ck["state"])
        self.log.info(f"resumed from {self.folder.last} after epoch {self.state.epoch}")
        if self.parallel is not None:
            self.log.info(self.parallel.describe())

    def _start(self) -> None:
        cfg, data, log = self.cfg, self.data, self.log
        assert data is not None
        log.info(f"mbrec run: model {cfg.model}, data {data.summary()}")
        if data.description:
            log.info(f"data: {data.description}")
        from mbrec.data.stats import cold_start_line

        log.info(cold_start_line(data))
        log.info(cfg.protocol.describe())
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(f"{n_params:,} parameters, device {self.device}, seed {cfg.seed}, {torch.get_num_threads()} threads")
        if self.parallel is not None:
            log.info(self.parallel.describe())
        self.model.on_train_start(data, self.graphs, self.device, log=log.info)
        if cfg.train.eval_start == 0 and self.writes:
            self.evaluate_epoch(0, {})

    # -- the loop ------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Lock the folder, train, evaluate, write it. A run that fails before its first
        checkpoint removes what it wrote, so the same command can simply be run again.
        In data-parallel training rank 0 does all of this; the other ranks wait for its word
        that the folder is locked, then train along (:meth:`_run_locked`)."""
        if not self.writes:
            self._report(None)  # receives rank 0's word; raises if it failed
            return self._run_locked(resume)
        try:
            created = self.folder.check_writable(resume=resume)
            self.folder.create()
        except BaseException as e:
            self._report(e)
            raise
        owned = False
        try:
            with self.folder.locked():
                owned = True
                self.folder.check_writable(resume=resume)  # again, now that no one else can write
                self._report(None)
                return self._run_locked(resume)
        except BaseException as e:
            self._report(e)
            if owned and not resume and not self.folder.last.is_file():
                self._discard(created)
                if isinstance(e, MbrecError) and e.args:
                    e.args = (f"{e.args[0]} (nothing was kept in {self.out}; fix this and run the same command again)",
                              *e.args[1:])
            raise

    def _report(self, error: BaseException | None) -> None:
        """Data-parallel training: rank 0 tells the other ranks, once, whether it got the folder
        (``None``) or failed; they receive it (raising on a failure). Nothing in one process."""
        if self.parallel is not None and not self._reported:
            self._reported = True
            self.parallel.report(error)

    def _run_locked(self, resume: bool) -> dict[str, Any]:
        self.setup(resume=resume)
        started = time.perf_counter()
        for epoch in range(self.state.epoch + 1, self.cfg.train.epochs + 1):
            if self.state.stopped:
                break
            means, secs = self.train_epoch(epoch)
            self.state.epoch = epoch
            stop = False
            if self.writes:
                if self._evaluates(epoch):
                    self.evaluate_epoch(epoch, means, secs)
                else:
                    self.state.history.append({"epoch": epoch, "seconds": secs, **means})
                    self.log.info(f"epoch {epoch:4d} | {_fmt_terms(means)} | {secs:.1f}s")
                self.save_last()
                stop = self._patience_exhausted(epoch)
            if self.parallel is not None:
                stop = self.state.stopped = self.parallel.stop_together(stop)
            if stop:
                break
        return self.finish(time.perf_counter() - started)

    def _discard(self, created: bool) -> None:
        """Remove what a run that failed before its first checkpoint wrote."""
        if hasattr(self, "log"):
            close_logger(self.log)
        self.folder.clear_early_remains()
        self.folder.lock_file.unlink(missing_ok=True)
        if created and self.folder.path.is_dir() and not any(self.folder.path.iterdir()):
            self.folder.path.rmdir()

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        """One training epoch: ``(mean loss terms, seconds)``; non-finite means end the run."""
        tc = self.cfg.train
        wrap = None
        if _progress_enabled(tc.progress) and not self.quiet:
            from tqdm import tqdm

            total = getattr(self.sampler, "n_batches", None)
            wrap = lambda it: tqdm(it, desc=f"epoch {epoch}", leave=False, total=total)  # noqa: E731
        t0 = time.perf_counter()
        means, steps = train_epoch(self.model, self.graphs, self.sampler, self.opt, self.rng, self.device,
                                   grad_clip=tc.grad_clip, before_step=self._schedule_lr, wrap=wrap,
                                   parallel=self.parallel)
        secs = time.perf_counter() - t0
        self.state.epoch_seconds.append(secs)
        if not all(math.isfinite(v) for v in means.values()):
            raise NonFiniteError(f"epoch {epoch}: a loss term is not finite {means}; lower train.lr "
                                 f"(now {tc.lr:g})")
        self._warn_if_exploding(epoch, means.get("loss", 0.0))
        self._warn_if_at_ln2(epoch, means)
        return means, secs

    def _warn_if_at_ln2(self, epoch: int, means: Mapping[str, float]) -> None:
        """One warning per term when a pairwise (BPR-type) loss term has sat at ln 2 for
        :data:`LN2_EPOCHS` epochs: that task's scores no longer tell positives from negatives."""
        recent = [h for h in self.state.history if h.get("epoch", 0) > 0][-(LN2_EPOCHS - 1):] + [dict(means)]
        for name in at_ln2(recent) - self._ln2_warned:
            self._ln2_warned.add(name)
            hint = getattr(self.model, "ln2_hint", "")
            self.log.warning(f"warning: epoch {epoch}: loss term {name} has stayed at ln 2 = {LN2:.3f} for "
                             f"{LN2_EPOCHS} epochs: this task's positive and negative scores no longer differ"
                             + (f"; {hint}" if hint else ""))

    def _warn_if_exploding(self, epoch: int, loss: float) -> None:
        """A loss 100x above its lowest epoch so far, or above 1e6, usually means divergence."""
        earlier = [abs(h["loss"]) for h in self.state.history if h.get("epoch", 0) > 0 and "loss" in h]
        lowest = min(earlier) if earlier else None
        if lowest is not None and abs(loss) > 1.0 and abs(loss) > 100 * lowest:
            why = f"grew from {lowest:.4g} to {loss:.4g}"
        elif abs(loss) > 1e6:
            why = f"is {loss:.4g}"
        else:
            return
        self.log.warning(f"warning: epoch {epoch}: the training loss {why}; the weights are probably diverging "
                         f"(lower train.lr, now {self.cfg.train.lr:g})")

    def _schedule_lr(self) -> None:
        """Staircase decay (COPF/PKEF), then count the step."""
        tc = self.cfg.train
        if tc.lr_decay_steps > 0 and tc.lr_decay != 1.0:
            lr = tc.lr * tc.lr_decay ** (self.state.step // tc.lr_decay_steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
        self.state.step += 1

    def _evaluates(self, epoch: int) -> bool:
        tc = self.cfg.train
        scheduled = epoch >= tc.eval_start and (epoch - max(tc.eval_start, 1)) % max(tc.eval_every, 1) == 0
        return scheduled or epoch == tc.epochs

    def _patience_exhausted(self, epoch: int) -> bool:
        st, patience = self.state, self.cfg.train.patience
        if epoch < self.cfg.train.min_epochs:
            return False
        if patience > 0 and st.best_epoch > 0 and epoch - st.best_epoch > patience:
            self.log.info(f"early stop at epoch {epoch}: no improvement since epoch {st.best_epoch}")
            st.stopped = True
            self.save_last()
            return True
        return False

    def save_last(self) -> None:
        self.folder.save_last({
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "state": dict(self.state.__dict__),
        })

    # -- evaluation and selection ----------------------------------------------------------
    def eval_splits(self, *, with_test: bool) -> tuple[Metrics, Metrics]:
        """Validation metrics (when the data has a validation split) and, if asked, test metrics,
        from one computation of the final embeddings."""
        p, mb, data = self.cfg.protocol, self.cfg.train.eval_memory_mb, self.data
        assert data is not None
        self.model.eval()
        with torch.no_grad():  # only what the evaluated tasks score with
            emb = self.model.embed(self.graphs, task_behaviors(self.model, data, p))
        valid = evaluate(self.model, self.graphs, data, p, "valid", emb=emb, memory_mb=mb) if has_valid(data) else {}
        test = evaluate(self.model, self.graphs, data, p, "test", emb=emb, memory_mb=mb) if with_test else {}
        return valid, test

    def evaluate_epoch(self, epoch: int, train_terms: Mapping[str, float], secs: float = 0.0) -> None:
        """Evaluate, keep the best checkpoint(s), record the history entry and the log line."""
        p, tc, st = self.cfg.protocol, self.cfg.train, self.state
        t0 = time.perf_counter()
        valid, test = self.eval_splits(with_test=p.selection == "test" or tc.test_every_eval)
        st.eval_seconds += time.perf_counter() - t0
        chosen = test if p.selection == "test" else valid
        if p.select_behavior == "each":
            improved = self._select_each(chosen, epoch)
        else:
            improved = self._select_one(chosen, epoch, valid, test)
        entry: dict[str, Any] = {"epoch": epoch, "seconds": secs, **train_terms}
        line = f"epoch {epoch:4d} | {_fmt_terms(train_terms)}"
        for name, m in (("valid", valid), ("test", test)):
            if m:
                entry[name] = m
                line += " | " + _fmt_metrics(name, m)
        st.history.append(entry)
        self.log.info(line + f" | {secs:.1f}s" + (" *" if improved else ""))
        self.model.train()

    def _select_one(self, chosen: Metrics, epoch: int, valid: Metrics, test: Metrics) -> bool:
        assert self.data is not None
        st = self.state
        value = selection_value(chosen, self.cfg.protocol, self.data.target)
        if not (math.isfinite(value) and value > st.best_value):
            return False
        st.best_value, st.best_epoch = value, epoch
        st.best_valid, st.best_test = valid, test
        self.folder.save_weights(self.model.state_dict())
        return True

    def _select_each(self, chosen: Metrics, epoch: int) -> bool:
        """Per-task selection: every behavior whose metric improved gets this epoch's weights as
        ``best_<behavior>.pt`` (the target's also as ``best.pt``). ``best_epoch`` is the latest
        improvement of any task, so patience stops the run once no task has improved for that long."""
        assert self.data is not None
        st, metric = self.state, self.cfg.protocol.select_metric
        better = []
        for b, vals in chosen.items():
            v = float(vals.get(metric, float("nan")))
            if math.isfinite(v) and v > st.best_tasks.get(b, [-math.inf, 0])[0]:
                st.best_tasks[b] = [v, epoch]
                better.append(b)
        if not better:
            return False
        weights = self.model.state_dict()
        for b in better:
            self.folder.save_weights(weights, behavior=b)
        if self.data.target in better or not self.folder.best.is_file():
            self.folder.save_weights(weights)
        st.best_epoch = epoch
        st.best_value = sum(v for v, _ in st.best_tasks.values())
        return True

    # -- the end ---------------------------------------------------------------------------
    def _final_metrics(self) -> tuple[Metrics, Metrics, dict[str, int]]:
        """Valid and test metrics of the selected weights, and each behavior's selected epoch."""
        data, st = self.data, self.state
        assert data is not None
        if self.cfg.protocol.select_behavior == "each" and st.best_tasks:
            splits = ("valid", "test") if has_valid(data) else ("test",)
            out = evaluate_task_checkpoints(self.model, self.graphs, data, self.cfg.protocol, self.out,
                                            list(st.best_tasks), splits, memory_mb=self.cfg.train.eval_memory_mb)
            self.model.load_state_dict(self.folder.load_weights(self.device))
            st.best_epoch = int(st.best_tasks.get(data.target, [0, st.best_epoch])[1])
            return out.get("valid", {}), out["test"], {b: int(e) for b, (_, e) in st.best_tasks.items()}
        valid, test = self.eval_splits(with_test=True)
        return valid, test, {b: st.best_epoch for b in test}

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        """Load the selected weights, evaluate them, write ``metrics.json``; returns the metrics.
        In data-parallel training rank 0 does this and every rank returns its metrics."""
        if self.parallel is None:
            return self._finish(wall_seconds)
        if not self.parallel.same(param_digest(self.model)):  # cannot happen with identical updates
            self.log.warning("warning: the ranks' parameters differ at the end of training; rank 0's are "
                             "evaluated and saved")
        return self.parallel.from_main(lambda: self._finish(wall_seconds))

    def _finish(self, wall_seconds: float) -> dict[str, Any]:
        st, p = self.state, self.cfg.protocol
        if self.folder.best.is_file():
            self.model.load_state_dict(self.folder.load_weights(self.device))
        else:  # never evaluated: the last epoch is the result
            self.folder.save_weights(self.model.state_dict())
            st.best_epoch = st.epoch
        t0 = time.perf_counter()
        valid, test, best_epochs = self._final_metrics()
        metrics = self._metrics_record(valid, test, best_epochs, wall_seconds, time.perf_counter() - t0)
        metrics["most_popular"] = popular_metrics(self.data, p, behaviors=tuple(test), device=self.device,
                                                  memory_mb=self.cfg.train.eval_memory_mb)
        self.folder.write_metrics(metrics)
        if p.select_behavior == "each" and st.best_tasks:
            self.log.info("best epochs per task " + ", ".join(f"{b} {e}" for b, e in best_epochs.items())
                          + f" ({p.select_metric}, {metrics['selection']})")
        else:
            self.log.info(f"best epoch {st.best_epoch} ({p.select_metric}, {metrics['selection']})")
        if valid:
            self.log.info(_fmt_metrics("valid", valid))
        self.log.info(_fmt_metrics("test", test))
        popular = metrics["most_popular"]
        self.log.info("most-popular, same split and protocol: "
                      + " | ".join(_fmt_metrics(s, m) for s, m in popular.items() if m))
        self.log.info(f"run folder: {self.out}")
        close_logger(self.log)
        return metrics

    def _metrics_record(self, valid: Metrics, test: Metrics, best_epochs: dict[str, int],
                        wall_seconds: float, eval_seconds: float) -> dict[str, Any]:
        st, p, data = self.state, self.cfg.protocol, self.data
        assert data is not None
        return {
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
            "wall_seconds_this_session": wall_seconds,
            "epoch_seconds_median": statistics.median(st.epoch_seconds) if st.epoch_seconds else 0.0,
            "eval_seconds": eval_seconds,
            "device": str(self.device),
            **({"ranks": self.parallel.world} if self.parallel is not None else {}),
            "torch": torch.__version__,
            "history": st.history,
        }


def train(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    data: MultiBehaviorData | None = None,
    resume: bool = False,
    quiet: bool = False,
    parallel: Parallel | None = None,
) -> dict[str, Any]:
    """Train and evaluate; returns the metrics dict written to ``metrics.json``. With
    ``parallel`` (a started :class:`mbrec.distributed.Parallel`) every rank calls this and
    trains data-parallel; rank 0 writes ``out_dir`` and every rank returns rank 0's metrics."""
    return Trainer(cfg, out_dir, data=data, quiet=quiet, parallel=parallel).run(resume=resume)
