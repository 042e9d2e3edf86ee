"""The optimizer every training loop uses: Adam, fused where torch has a fused kernel.

Torch's fused Adam updates each parameter in one pass instead of about ten elementwise passes of
the default implementation (on the CPU, 2.1 ms instead of 7.3 ms per step for LightGCN's 1.9
million Beibei parameters, one thread; ``BENCHMARKS.md``). The update rule is the same; results
differ from the unfused form by float rounding only (``tests/test_optim.py``). Fused kernels
exist for dense parameters on the CPU and on CUDA; anything else (sparse gradients, other
devices) gets the default implementation.
"""

from __future__ import annotations

from typing import Iterable

import torch

#: devices with a fused Adam kernel in torch
FUSED_DEVICES = frozenset({"cpu", "cuda"})


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether every parameter is a dense floating tensor on one device that has a fused kernel."""
    if not params:
        return False
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES
            and all(p.layout == torch.strided and p.is_floating_point() for p in params))


def adam(params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam(params, lr, weight_decay)``, fused when :func:`fused_supported`."""
    params = list(params)
    fused = fused_supported(params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def load_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)`` that keeps ``opt``'s own kernel choice (``fused``/``foreach``):
    a checkpoint written by an unfused optimizer resumes on the fused kernel and back."""
    kernel = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, k in zip(opt.param_groups, kernel):
        g.update(k)
