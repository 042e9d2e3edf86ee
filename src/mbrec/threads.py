"""How many CPU threads torch uses when ``mbrec --threads N`` is not given: one rule, one place.

:func:`default_threads`, in this order:

1. ``OMP_NUM_THREADS``, else ``MKL_NUM_THREADS``, when set to a whole number >= 1: the user's
   choice wins, unchanged (no cap, no load correction).
2. Otherwise the CPUs this process may use (``os.sched_getaffinity``, also lowered by a cgroup
   CPU quota such as a container's ``--cpus``), capped at :data:`MAX_THREADS` (sparse kernels
   stop scaling well before that), after taking away the CPUs the 1-minute load average says
   other work already uses: ``max(1, min(MAX_THREADS, cpus - round(load)))``.

Why: on a 2-core machine where other jobs run, one thread per training is fastest (two threads
made RMBRec 3x slower at load 1.3-2.7); alone, two threads help a little (``BENCHMARKS.md``,
"Threads"). The load average counts every runnable process of the machine (in a container,
often the host's), and the previous ``mbrec`` run for about a minute after it ended, so the
rule errs towards fewer threads; ``--threads N`` or ``OMP_NUM_THREADS`` override it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

#: at most this many threads by default
MAX_THREADS = 8
#: environment variables that, when set, decide the count (first one set wins)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def env_threads(env: Mapping[str, str]) -> int | None:
    for name in THREAD_ENV_VARS:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None


def _cgroup_cpus(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The cgroup v2 CPU quota in CPUs (``cpu.max``: ``"200000 100000"`` = 2), or None."""
    try:
        quota, period = (Path(root) / "cpu.max").read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
    except (OSError, ValueError):
        pass
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def default_threads(
    env: Mapping[str, str] | None = None,
    *,
    cpus: int | None = None,
    load: float | None = None,
    cap: int = MAX_THREADS,
) -> int:
    """The default torch thread count (module docstring). ``env``, ``cpus`` and ``load`` default
    to this process's environment, usable CPUs and 1-minute load average (given for tests)."""
    chosen = env_threads(os.environ if env is None else env)
    if chosen is not None:
        return chosen
    cpus = usable_cpus() if cpus is None else cpus
    load = load_average() if load is None else load
    return max(1, min(cap, cpus - round(max(load, 0.0))))


def apply_threads(n: int) -> None:
    """Use ``n`` threads for torch's kernels and for NumPy's BLAS, which :mod:`mbrec.dense` runs
    large CPU products on (OpenBLAS otherwise starts one thread per core, whatever torch uses)."""
    import numpy  # noqa: F401  (loads NumPy's BLAS so that threadpoolctl finds it)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")
