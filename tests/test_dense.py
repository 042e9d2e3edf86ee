"""mbrec.dense: the BLAS rule for large CPU products, and the products that use it."""

from __future__ import annotations

import pytest
import torch

from mbrec import dense
from mbrec.losses import table_logsumexp


@pytest.fixture
def gemm(monkeypatch):
    """Set MBREC_CPU_GEMM; torch runs one thread meanwhile (the rule's auto case needs it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)

    def set_to(value: str) -> None:
        monkeypatch.setenv("MBREC_CPU_GEMM", value)

    yield set_to
    torch.set_num_threads(before)


def _big(n: int = 300, m: int = 400, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


def test_rule_picks_numpy_only_for_large_cpu_float32_products(gemm):
    gemm("auto")
    q, c = _big()
    assert q.shape[0] * c.shape[0] >= dense.MIN_OUTPUT
    assert dense.gemm_kernel(q, c.T) == "numpy"
    assert dense.gemm_kernel(q[:2], c[:3].T) == "torch"  # 6 entries: call overhead dominates
    assert dense.gemm_kernel(q.double(), c.double().T) == "torch"
    assert dense.gemm_kernel(q[None], c.T) == "torch"  # not 2-D
    torch.set_num_threads(2)  # two thread pools would spin against each other: torch's alone
    assert dense.gemm_kernel(q, c.T) == "torch"
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:  # inside a process group: torch's (ranks aborted at exit)
        mp.setattr(torch.distributed, "is_initialized", lambda: True)
        assert dense.gemm_kernel(q, c.T) == "torch"
    assert dense.gemm_kernel(q, c.T) == "numpy"
    gemm("torch")
    assert dense.gemm_kernel(q, c.T) == "torch"
    gemm("numpy")
    assert dense.gemm_kernel(q[:2], c[:3].T) == "numpy"


def test_unknown_setting_is_a_clear_error(gemm):
    gemm("mkl")
    q, c = _big()
    with pytest.raises(ValueError, match="MBREC_CPU_GEMM='mkl'; use one of auto, torch, numpy"):
        dense.gemm_kernel(q, c.T)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_matmul_agrees_with_torch_in_every_layout(gemm, layout):
    gemm("numpy")
    q, c = _big()
    a, b = {"nt": (q, c.T), "nn": (q, c.T.contiguous()), "tn": (q.T.contiguous().T, c.T)}[layout]
    out = dense.matmul(a, b)
    assert out.shape == (300, 400) and out.dtype == torch.float32
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


def test_matmul_writes_into_out(gemm):
    gemm("numpy")
    q, c = _big()
    buf = torch.empty(300, 400)
    assert dense.matmul(q, c.T, out=buf) is buf
    torch.testing.assert_close(buf, q @ c.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        dense.matmul(q, c.T, out=torch.empty(400, 300).T)


def test_matmul_keeps_the_gradient_of_inputs_that_need_one(gemm):
    gemm("numpy")
    q, c = _big()
    q.requires_grad_(True)
    out = dense.matmul(q, c.T)
    assert out.requires_grad  # went to torch: autograd still reaches q
    out.sum().backward()
    torch.testing.assert_close(q.grad, c.sum(0).expand_as(q))


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
def test_table_logsumexp_values_and_gradients_on_either_blas(gemm, kernel):
    """The fused contrastive denominator on a table large enough for NumPy's BLAS (the shift
    rides as an extra column there) against autograd through torch.logsumexp."""
    gemm(kernel)
    q0, c0 = _big(n=260, m=300, d=8, seed=3)
    q, c = q0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
    w = torch.linspace(0.5, 2.0, 260)
    (table_logsumexp(q, c) * w).sum().backward()
    qr, cr = q0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
    (torch.logsumexp(qr @ cr.T, dim=1) * w).sum().backward()
    torch.testing.assert_close(table_logsumexp(q0, c0), torch.logsumexp(q0 @ c0.T, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad, qr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.grad, cr.grad, rtol=1e-4, atol=1e-5)


def test_apply_threads_sets_torch_and_numpy_blas():
    from threadpoolctl import threadpool_info

    from mbrec.threads import apply_threads

    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        apply_threads(before)


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
def test_exp_in_place_agrees_with_torch(gemm, kernel):
    gemm(kernel)
    x = torch.linspace(-80.0, 5.0, 300 * 400).reshape(300, 400)
    want = torch.exp(x)
    got = dense.exp_(x)
    assert got is x and x.numel() >= dense.MIN_OUTPUT
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0.0)
    small = torch.tensor([0.0, 1.0])
    assert torch.equal(dense.exp_(small), torch.exp(torch.tensor([0.0, 1.0])))
