"""Data-parallel training on ``torch.distributed``: ranks, batch shards, gradient all-reduce.

``torchrun --nproc_per_node=N -m mbrec train MODEL DATA ...`` (or ``mbrec train ... --nproc N``,
which starts the same through :mod:`torch.distributed.run`) runs N copies of the trainer, one
per rank. How they cooperate (``docs/distributed.md`` has the full account):

* **Replicated.** Every rank loads the data, builds the graphs, the model and the sampler, and
  seeds Python, NumPy and torch with the run's seed (the same seed on every rank, not
  ``seed + rank``): the initial parameters are identical, which :meth:`Parallel.check_same`
  verifies with a SHA-256 of the data fingerprint and the parameters before the first step.
* **Sharded.** Every rank draws the *same* epoch of global batches from the same RNG (exactly
  the batches one process draws) and keeps its share of each: :func:`shard_batch` cuts every
  array of the batch along the batch axis (:func:`batch_axis`) into N contiguous parts,
  ``numpy.array_split`` sizes, rank r taking part r.
* **Reduced.** After the backward each rank scales its gradients by its share of the batch's
  rows (``weight``) and they are summed over the ranks (:meth:`Parallel.reduce_gradients`, an
  explicit all-reduce of ``.grad``). For a loss that is a mean over the batch's rows the
  result is the gradient of the global batch, so N ranks take the steps one process takes
  (float rounding aside). Every rank then applies the same Adam step to the same gradients;
  the replicas stay identical. A term built from the whole batch at once (RMBRec's contrast
  among the batch's users, the variance of its per-behavior means) is computed on every rank
  from every rank's rows inside :meth:`Parallel.sharing` with :mod:`mbrec.collectives`, whose
  backward scales the rank's own part by ``1 / weight``: the sum is again the batch's gradient.
* **Rank 0 alone** writes the run folder, logs, evaluates, selects and saves checkpoints; the
  others receive its early-stopping decision (:meth:`Parallel.stop_together`) and, at the end,
  its metrics. On ``--resume`` rank 0 reads ``last.pt`` and broadcasts it.

Backend: ``gloo`` on a machine without CUDA; with CUDA ``cpu:gloo,cuda:nccl`` (tensors on the
GPU go through NCCL, CPU tensors and objects through gloo), chosen in :func:`backend_for`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np
import torch

from mbrec.errors import ConfigError, MbrecError

T = TypeVar("T")

#: what ``torchrun`` (and any ``env://`` launcher) sets for each worker; all four are needed
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: seconds a rank waits in a collective before giving up (rank 0 may evaluate for a long time
#: while the others wait); ``MBREC_DIST_TIMEOUT`` overrides
DEFAULT_TIMEOUT_S = 7200
TIMEOUT_ENV = "MBREC_DIST_TIMEOUT"


class RankStopped(MbrecError):
    """Raised on ranks other than 0 when rank 0 reports an error (rank 0 prints it)."""


# ----------------------------------------------------------------------------- sharding


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s part of ``n`` rows cut into ``world`` contiguous parts of
    ``numpy.array_split`` sizes: the first ``n % world`` parts have one row more."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    q, r = divmod(int(n), world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def batch_axis(sampler: Any) -> int:
    """The axis along which a sampler's batch arrays hold their rows.

    A sampler may say so itself with an integer attribute ``shard_axis``. Otherwise it is axis 0
    (one row per user, pair or triplet: every built-in sampler), except for the equal-size
    :class:`mbrec.sampling.PerBehaviorTripletSampler` (BiGEL), whose ``[K, m]`` arrays hold
    behavior k's triplets in row k: there the rows are axis 1."""
    axis = getattr(sampler, "shard_axis", None)
    if axis is not None:
        return int(axis)
    from mbrec.sampling import PerBehaviorTripletSampler

    if isinstance(sampler, PerBehaviorTripletSampler) and not sampler.proportional:
        return 1
    return 0


def shard_batch(batch: Mapping[str, Any], rank: int, world: int, axis: int = 0) -> tuple[dict[str, np.ndarray], float]:
    """Rank ``rank``'s share of a global batch, and its weight.

    Every array with an ``axis`` dimension is cut along it (:func:`shard_bounds`); arrays with
    fewer dimensions (per-batch constants) go whole to every rank. The weight is the rank's
    share of all cut rows, so the weights of the ranks sum to 1; for a batch whose arrays all
    have the same number of rows it is ``n_rank / n``, the factor that turns a mean over the
    shard into its part of the mean over the batch. A batch without any row goes to rank 0
    (weight 1); the other ranks get empty arrays and weight 0."""
    if world == 1:
        return {k: np.asarray(v) for k, v in batch.items()}, 1.0
    local: dict[str, np.ndarray] = {}
    mine = total = 0
    for key, value in batch.items():
        a = np.asarray(value)
        if a.ndim <= axis:
            local[key] = a
            continue
        n = a.shape[axis]
        lo, hi = shard_bounds(n, world, rank)
        local[key] = a[(slice(None),) * axis + (slice(lo, hi),)]
        mine += hi - lo
        total += n
    if total == 0:
        return local, 1.0 if rank == 0 else 0.0
    return local, mine / total


# ----------------------------------------------------------------------------- checksums


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        x = t.detach().cpu().contiguous()
        h.update(f"{name}|{x.dtype}|{tuple(x.shape)}\0".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def replica_digest(data: Any, model: torch.nn.Module) -> str:
    """SHA-256 of the data's fingerprint (:func:`mbrec.rundir.data_fingerprint`) and the
    model's parameters: equal on every rank when all built the same run."""
    from mbrec.rundir import data_fingerprint

    text = json.dumps(data_fingerprint(data), sort_keys=True)
    return hashlib.sha256((text + param_digest(model)).encode()).hexdigest()


# ----------------------------------------------------------------------------- environment


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a rank started by ``torchrun`` (or another ``env://`` launcher)."""
    env = os.environ if env is None else env
    return all(env.get(v) for v in LAUNCH_VARS)


def backend_for(cuda: bool | None = None) -> str:
    """``cpu:gloo,cuda:nccl`` where CUDA and NCCL are available, else ``gloo``."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cpu:gloo,cuda:nccl" if cuda and dist.is_nccl_available() else "gloo"


def rank_threads(local_world: int, explicit: int | None, env: Mapping[str, str] | None = None) -> int | None:
    """The torch thread count a rank should use when ``local_world`` ranks share its machine,
    or ``None`` to keep :func:`mbrec.threads.default_threads`'s choice: an explicit
    ``--threads``, or ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` when set, wins; a machine holding
    one rank keeps the usual rule; otherwise one thread per rank (torchrun's default too)."""
    from mbrec.threads import env_threads

    if explicit is not None or env_threads(os.environ if env is None else env) is not None or local_world <= 1:
        return None
    return 1


def _timeout(env: Mapping[str, str] | None = None) -> datetime.timedelta:
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


# ----------------------------------------------------------------------------- launching


def launcher_args(nproc: int, argv: list[str]) -> list[str]:
    """The arguments of torch's launcher for ``mbrec train --nproc N``: a local (``--standalone``)
    rendezvous on a free port, N ranks, each running ``python -m mbrec ARGV``; the same as
    ``torchrun --standalone --nproc_per_node=N -m mbrec ARGV``."""
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "mbrec", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``argv`` (mbrec's arguments) on ``nproc`` local ranks through torch's launcher
    (:func:`torch.distributed.run.run`, in this process) and return the exit status: 0, or the
    exit status of the first rank that failed (its own error message is already printed).
    Without ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` the ranks get one thread each (set here,
    which also keeps the launcher from warning that it set it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from mbrec.threads import env_threads

    if nproc < 1:
        raise MbrecError(f"--nproc must be at least 1, got {nproc}")
    if env_threads(os.environ) is None:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        run(parse_args(launcher_args(nproc, argv)))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 1
    return 0


# ----------------------------------------------------------------------------- the group

#: what gloo and NCCL say when another rank has gone away
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank ended (crashed, killed,
    or stopped by its own error)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistNetworkError) or (
        isinstance(error, RuntimeError) and any(s in text for s in _LOST_PEER))



def silent_logger(rank: int) -> logging.Logger:
    """The logger of a rank other than 0: it writes nowhere."""
    logger = logging.getLogger(f"mbrec.rank{rank}")
    logger.propagate = False
    logger.disabled = True
    return logger


@dataclass
class Parallel:
    """This process's place in a data-parallel run, and the collectives the trainer uses.

    ``start`` joins the process group (``env://``: the variables torchrun sets), ``close``
    leaves it. Every method that communicates must be called by every rank in the same order."""

    rank: int
    world: int
    local_rank: int = 0
    local_world: int = 1
    backend: str = field(default_factory=backend_for)
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Parallel | None:
        """The rank torchrun started, or ``None`` in a plain process."""
        env = os.environ if env is None else env
        if not launched(env):
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", "0"))
            local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers "
                              f"(got {env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}, "
                              f"{env.get('LOCAL_WORLD_SIZE')!r})") from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK {rank} is not in WORLD_SIZE {world}")
        return cls(rank, world, local_rank, local_world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"data-parallel: {self.world} ranks ({self.local_world} on this machine), backend {self.backend}; "
                "each global batch is split across the ranks (docs/distributed.md)")

    # -- joining and leaving --------------------------------------------------------------------
    def start(self, init_method: str = "env://") -> None:
        """Join the process group (nothing to do when one is already initialized)."""
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise ConfigError(f"a process group of {dist.get_world_size()} ranks is already initialized here, "
                                  f"not {self.world}")
            return
        if "nccl" in self.backend and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(self.backend, init_method=init_method, rank=self.rank, world_size=self.world,
                                timeout=_timeout())
        self._owns_group = True

    def close(self) -> None:
        """Leave the process group this object joined, together with the other ranks.

        A barrier first, so that no rank tears its group down while another still has a
        collective in flight; then the group is destroyed and collected here, while the
        interpreter is whole. Gloo's worker threads drop their last reference to a finished
        collective shortly after it completes; if that happens during interpreter shutdown (a
        loaded machine delays those threads) the process aborts with "terminate called without
        an active exception" after doing all its work. Destroying the group joins those threads."""
        import gc

        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            gc.collect()
        self._owns_group = False

    def device(self, name: str) -> torch.device:
        """The training device of this rank: ``cuda`` means ``cuda:LOCAL_RANK``; ``cpu`` stays."""
        from mbrec.rundir import resolve_device

        dev = resolve_device(name)
        if dev.type != "cuda":
            return dev
        if dev.index is not None:
            if self.local_world > 1:
                raise ConfigError(f"device {name!r}: with {self.local_world} ranks on this machine every rank would "
                                  "use that one GPU; give --device cuda (rank r then uses cuda:LOCAL_RANK)")
            return dev
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {self.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                              "start at most that many ranks per machine (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    # -- objects from rank 0 ----------------------------------------------------------------------
    def broadcast(self, obj: T | None = None) -> T:
        """Rank 0's ``obj`` on every rank (pickled; tensors in it arrive on the CPU side)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def from_main(self, fn: Callable[[], T] | None) -> T:
        """Rank 0 runs ``fn`` and every rank gets its result; if it raises, rank 0 re-raises it
        and the other ranks raise :class:`RankStopped`. ``fn`` is ignored on the other ranks."""
        if not self.is_main:
            ok, value = self.broadcast(None)
            if not ok:
                raise RankStopped(f"rank {self.rank} stops: rank 0 failed ({value})")
            return value
        try:
            value = fn() if fn is not None else None
        except BaseException as e:
            self.broadcast((False, f"{type(e).__name__}: {e}"))
            raise
        self.broadcast((True, value))
        return value  # type: ignore[return-value]

    def report(self, error: BaseException | None) -> None:
        """Rank 0 tells the others whether it could go on (``None``) or failed (``error``);
        on the other ranks this receives that word, raising :class:`RankStopped` on a failure."""

        def step() -> None:
            if error is not None:
                raise error

        try:
            self.from_main(step)
        except BaseException as e:
            if e is not error:
                raise

    def same(self, digest: str) -> bool:
        """Whether every rank computed the same ``digest`` (every rank gets the answer)."""
        return not self._odd_ranks(digest)[0]

    def check_same(self, what: str, digest: str) -> None:
        """Raise on every rank unless every rank computed the same ``digest`` of ``what``."""
        odd, digests = self._odd_ranks(digest)
        if odd:
            raise (ConfigError if self.is_main else RankStopped)(
                f"the ranks built different {what}: ranks {odd} differ from rank 0 (SHA-256 {digests[0][:12]} vs "
                f"{digests[odd[0]][:12]}); every rank must read the same data with the same mbrec, torch and settings")

    def _odd_ranks(self, digest: str) -> tuple[list[int], list[str]]:
        import torch.distributed as dist

        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, digest)
        return [r for r, d in enumerate(digests) if d != digests[0]], digests

    # -- training -----------------------------------------------------------------------------------
    def shard(self, batch: Mapping[str, Any], axis: int = 0) -> tuple[dict[str, np.ndarray], float]:
        """This rank's share of a global batch and its weight (:func:`shard_batch`)."""
        return shard_batch(batch, self.rank, self.world, axis)

    def sharing(self, weight: float) -> contextlib.AbstractContextManager[Any]:
        """The block in which this rank computes its loss on a part of weight ``weight`` of a
        global batch: inside it a model may compute whole-batch terms with
        :mod:`mbrec.collectives` (every rank enters it, and must call the same collectives). With
        one rank it does nothing: that rank's part is the batch, and the model keeps its
        one-process code (no collective, the same numbers)."""
        from mbrec import collectives

        if self.world == 1:
            return contextlib.nullcontext()
        return collectives.sharing(self.rank, self.world, weight)

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter], weight: float) -> None:
        """``grad <- sum over ranks of weight_r * grad_r`` on every rank, in place.

        A parameter that received a gradient on no rank keeps ``grad = None`` (as in one
        process, so Adam skips it); one that received a gradient on some ranks only gets zeros
        on the others before the sum. One all-reduce of flags, then one per parameter."""
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(has)
        works = []
        for p, n in zip(params, has.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif p.grad.is_sparse:
                p.grad = p.grad.to_dense()
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            if weight != 1.0:
                p.grad.mul_(weight)
            works.append(dist.all_reduce(p.grad, async_op=True))
        for w in works:
            w.wait()

    def sum_terms(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Every rank's per-term sums added up, in rank 0's term order (the same floats on every
        rank): the epoch's loss terms as one process would log them."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, dict(sums))
        keys = list(gathered[0])
        for g in gathered[1:]:
            keys += [k for k in g if k not in keys]
        return {k: float(sum(g.get(k, 0.0) for g in gathered)) for k in keys}

    def stop_together(self, stop: bool) -> bool:
        """Rank 0's early-stopping decision, on every rank."""
        import torch.distributed as dist

        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        return bool(flag.item())
