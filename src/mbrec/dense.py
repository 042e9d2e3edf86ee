"""Large dense products on the CPU, on the faster of two BLAS libraries: one rule, one place.

torch's CPU wheels multiply with Intel MKL; NumPy's wheels bundle OpenBLAS. For the products
mbrec runs most, a batch of embeddings against a whole table with a small inner dimension
(``[n, 64] @ [64, m]``: contrastive logits against every user or item, full-ranking scores),
OpenBLAS was 2.2-3.1x faster than MKL on one thread of this project's AMD EPYC (AVX-512) CPU,
and 1.0-1.4x on the two backward products (``[n, m] @ [m, 64]``, ``[m, n] @ [n, 64]``); ``BENCHMARKS.md``,
"Dense products", has the table and the command. On an Intel CPU MKL may win; set
``MBREC_CPU_GEMM=torch`` there.

The rule (:func:`gemm_kernel`), not a per-process measurement, because the two libraries round
differently in the last bits: a choice that could flip between two runs of the same seed would
make them differ. So on a given machine, setting and thread count every run multiplies the
same way:

* off the CPU, for other dtypes than float32, or for products whose result has fewer than
  :data:`MIN_OUTPUT` entries (call overhead dominates there): torch;
* when torch runs more than one thread: torch. Two thread pools (torch's OpenMP, OpenBLAS's)
  that take turns on the same cores spin against each other: COPF on Taobao with two threads
  took 0.87 s per step on NumPy's BLAS against 0.49 s on torch's;
* inside a torch.distributed process group: torch. Ranks that had multiplied on NumPy's BLAS
  aborted at exit ("terminate called without an active exception") in 3 of 6 runs of
  ``tests/test_distributed.py``'s torchrun test on a loaded 2-core machine, against 0 of 4 on
  torch's GEMM and 0 of 4 before NumPy was used; the cause is not known;
* ``MBREC_CPU_GEMM=torch|numpy``: that library; ``auto`` (default): NumPy's.

:func:`matmul` is a product without autograd (evaluation, hand-written backwards). NumPy's
thread count follows ``mbrec --threads`` (:func:`mbrec.threads.apply_threads`). The same rule
serves :func:`exp_`, the exponential of a contrastive logit matrix: NumPy's AVX-512 ``exp`` took
0.6 ns per element against torch's 1.1 on this CPU (``benchmarks/bench_dense.py``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

#: ``auto`` (NumPy's BLAS for large CPU float32 products), ``torch`` or ``numpy``
CPU_GEMMS = ("auto", "torch", "numpy")
#: products with fewer result entries than this stay on torch (a NumPy round trip costs a few us)
MIN_OUTPUT = 1 << 16


def _setting() -> str:
    value = os.environ.get("MBREC_CPU_GEMM", "auto")
    if value not in CPU_GEMMS:
        raise ValueError(f"MBREC_CPU_GEMM={value!r}; use one of {', '.join(CPU_GEMMS)}")
    return value


def gemm_kernel(a: torch.Tensor, b: torch.Tensor) -> str:
    """``"numpy"`` or ``"torch"``: the library :func:`matmul` uses for ``a @ b`` (module docstring)."""
    if a.dim() != 2 or b.dim() != 2:
        return "torch"
    return _library(a.shape[0] * b.shape[1], a, b)


def _library(n_out: int, *tensors: torch.Tensor) -> str:
    """The rule of the module docstring for a result of ``n_out`` entries from ``tensors``."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return "torch"
    setting = _setting()
    if setting != "auto":
        return setting
    return "numpy" if n_out >= MIN_OUTPUT and _numpy_allowed() else "torch"


def _numpy_allowed() -> bool:
    """One torch thread and no process group (module docstring)."""
    import torch.distributed as dist

    return torch.get_num_threads() == 1 and not (dist.is_available() and dist.is_initialized())


def matmul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for 2-D tensors without autograd (``a`` and ``b`` may be transposed views), on
    the library :func:`gemm_kernel` picks; ``out`` (contiguous, ``[a rows, b columns]``) receives
    the result when given. Inputs that need a gradient under grad mode go to torch, so a caller
    never loses one."""
    if (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)) or gemm_kernel(a, b) == "torch":
        return a @ b if out is None else torch.mm(a, b, out=out)
    if out is not None and not out.is_contiguous():
        raise ValueError("matmul(out=...) needs a contiguous tensor")
    an, bn = a.detach().numpy(), b.detach().numpy()
    with np.errstate(all="ignore"):  # overflow gives inf silently, as in torch; callers check finiteness
        if out is None:
            return torch.from_numpy(np.matmul(an, bn))
        np.matmul(an, bn, out=out.detach().numpy())
    return out


def exp_(x: torch.Tensor) -> torch.Tensor:
    """``x.exp_()`` without autograd, on the library :func:`gemm_kernel`'s rule picks for a
    result of ``x``'s size (NumPy for a large contiguous CPU float32 tensor on one torch thread)."""
    small = x.numel() < MIN_OUTPUT or not x.is_contiguous()  # small: torch whatever the setting
    if small or (x.requires_grad and torch.is_grad_enabled()) or _library(x.numel(), x) == "torch":
        return x.exp_()
    xn = x.detach().numpy()
    with np.errstate(all="ignore"):
        np.exp(xn, out=xn)
    return x
