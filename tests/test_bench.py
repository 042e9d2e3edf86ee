"""``mbrec bench`` and the shared propagation step it measures against."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.bench import DenseProduct, SparseProduct, bench, time_dense, time_sparse
from mbrec.cli.main import main
from mbrec.config import build_config
from mbrec.graph import lightgcn_stack, propagate, propagate_with_rows, spmm, to_device
from mbrec.losses import table_logsumexp


@pytest.fixture
def graph():
    A = sp.random(50, 40, density=0.15, format="csr", dtype=np.float32, random_state=3)
    return to_device(A)


@pytest.mark.parametrize("rows", [None, [0, 7, 7, 31, 49]])
def test_propagate_rows_equal_the_full_product_in_values_and_gradients(graph, rows) -> None:
    x = torch.randn(40, 6, requires_grad=True)
    r = None if rows is None else torch.tensor(rows)
    w = torch.randn(50 if rows is None else len(rows), 6)
    got = propagate(graph, x, r)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    full = spmm(graph, x)
    want = full if r is None else full[r]
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(g_got, g_want, atol=1e-5)


@pytest.mark.parametrize("with_frozen", [False, True])
def test_propagate_with_rows_equals_product_and_gather(graph, with_frozen) -> None:
    """``(A[rows] @ [x, frozen], x[rows])`` in values and in the gradient reaching ``x``, against
    the plain product over all columns (the frozen part detached) and an indexing gather."""
    x = torch.randn(40, 4, requires_grad=True)
    frozen = torch.randn(40, 3) if with_frozen else None
    rows = torch.tensor([0, 7, 31, 39])
    w_out, w_rows = torch.randn(4, 7 if with_frozen else 4), torch.randn(4, 4)
    out, x_rows = propagate_with_rows(graph, x, rows, frozen=frozen)
    (g_got,) = torch.autograd.grad((out * w_out).sum() + (x_rows * w_rows).sum(), x)
    full = spmm(graph, x if frozen is None else torch.cat([x, frozen], 1))[rows]
    (g_want,) = torch.autograd.grad((full * w_out).sum() + (x[rows] * w_rows).sum(), x)
    assert out.shape == full.shape and torch.allclose(out, full, atol=1e-6) and torch.equal(x_rows, x[rows])
    assert torch.allclose(g_got, g_want, atol=1e-5)


def test_sparse_product_rows_as_indices_or_count(graph) -> None:
    """A floor product at a batch's own rows times exactly those rows; a count times that many."""
    rows = torch.tensor([3, 3, 9, 41])
    assert SparseProduct("at rows", graph, 4, rows=rows).n_rows == 4
    assert SparseProduct("count", graph, 4, rows=2).n_rows == 2 and SparseProduct("all", graph, 4).n_rows is None
    t = time_sparse(SparseProduct("at rows", graph, 4, rows=rows), torch.device("cpu"), 2, np.random.default_rng(0))
    assert t.forward_s > 0 and t.backward_s > 0


def test_propagate_without_gradient(graph) -> None:
    x = torch.randn(40, 3)
    assert torch.allclose(propagate(graph, x, torch.tensor([2, 5])), (graph.mat @ x)[[2, 5]], atol=1e-6)


def test_table_logsumexp_matches_autograd_in_values_and_gradients() -> None:
    torch.manual_seed(0)
    for scale in (1.0, 60.0):  # 60: rows whose logits sit far below the shift bound (recomputed)
        q = (scale * torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
        c = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, dtype=torch.float64)
        out = table_logsumexp(q, c)
        assert torch.allclose(out, torch.logsumexp(q @ c.T, 1))
        got = torch.autograd.grad((out * w).sum(), (q, c))
        want = torch.autograd.grad((torch.logsumexp(q @ c.T, 1) * w).sum(), (q, c))
        assert all(torch.allclose(a, b) for a, b in zip(got, want))


def test_table_logsumexp_far_below_bound_and_one_backward_only() -> None:
    # row 0's logits are all about -200 while its bound is +200: exp underflows, the row is redone
    q = torch.tensor([[-200.0, 0.0], [1.0, 0.0]], requires_grad=True)
    c = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]])
    out = table_logsumexp(q, c)
    assert torch.allclose(out, torch.logsumexp(q @ c.T, 1)) and torch.isfinite(out).all()
    loss = out.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_product_timings_are_positive(graph) -> None:
    rng = np.random.default_rng(0)
    t = time_sparse(SparseProduct("g", graph, 8, rows=10), torch.device("cpu"), 2, rng)
    assert t.forward_s > 0 and t.backward_s > 0 and t.kernel in ("torch CSR", "SciPy CSR")
    assert time_sparse(SparseProduct("g", graph, 8, backward=False), torch.device("cpu"), 2, rng).backward_s == 0
    d = time_dense(DenseProduct("d", 16, 8, 32), torch.device("cpu"), 2)
    assert d.forward_s > 0 and d.backward_s > 0


@pytest.mark.parametrize("model", ["copf", "rmbrec"])
def test_bench_reports_floor_and_ratio_on_synthetic(model) -> None:
    cfg = build_config(model, "synthetic")
    report = bench(cfg, steps=2, repeats=1)
    assert report.products and report.floor_step_s > 0 and report.step_s > 0
    assert report.ratio == pytest.approx(report.step_s / report.floor_step_s)
    assert report.steps_per_epoch >= 1 and report.peak_mb > 0
    assert "| product |" in report.table() and "floor step s" in report.table()
    kernels = report.as_dict()["step_kernels"]
    assert all(k["kernel"] in ("torch", "scipy") and k["width"] > 0 for k in kernels)


def test_bench_command_json(capsys) -> None:
    assert main(["bench", "lightgcn", "synthetic", "--steps", "1", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "lightgcn" and out["step_s"] > 0 and out["steps_per_epoch"] >= 1


def test_bench_rounds_alternate_steps_and_floor_and_report_medians(capsys) -> None:
    assert main(["bench", "lightgcn", "synthetic", "--steps", "1", "--repeats", "1", "--rounds", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rounds = out["rounds"]
    assert len(rounds) == 3 and all(st > 0 and fl > 0 for st, fl in rounds)
    assert out["step_s"] == pytest.approx(sorted(st for st, _ in rounds)[1])  # the median round's step
    assert main(["bench", "lightgcn", "synthetic", "--rounds", "0"]) == 2


def test_bench_command_rejects_zero_steps(capsys) -> None:
    assert main(["bench", "lightgcn", "synthetic", "--steps", "0"]) == 2


def test_bench_pretraining_of_mbcgcn(capsys) -> None:
    assert main(["bench", "mbcgcn", "synthetic", "--pretrain", "--steps", "2", "--repeats", "1", "--json",
                 "--set", "model_args.pretrain_epochs=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "mbcgcn (pretraining)" and out["floor_step_s"] > 0 and out["products"]
    assert main(["bench", "lightgcn", "synthetic", "--pretrain", "--steps", "1"]) == 2


def test_scipy_full_kernel_equals_torch_kernel(graph, monkeypatch) -> None:
    import mbrec.graph as G

    x = torch.randn(40, 6, requires_grad=True)
    w = torch.randn(50, 6)
    want = spmm(graph, x)
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    monkeypatch.setattr(G, "CPU_FULL_KERNEL", "scipy")
    got = spmm(graph, x)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(g_got, g_want, atol=1e-5)


def test_auto_kernel_chooses_once_per_matrix_and_width_and_kernels_agree_bitwise(graph, monkeypatch) -> None:
    import mbrec.graph as G

    monkeypatch.setattr(G, "CPU_FULL_KERNEL", "auto")
    x = torch.randn(40, 6)
    first = G.full_kernel(graph.mat, x)
    assert first in ("torch", "scipy") and G.full_kernel(graph.mat, x) == first
    mine = [c for c in G.kernel_choices() if c["shape"] == tuple(graph.mat.shape) and c["width"] == 6]
    assert len(mine) == 1 and set(mine[0]["seconds"]) == {"torch", "scipy"}
    # both kernels sum each row in CSR order: the choice can never change a result
    assert torch.equal(torch.sparse.mm(graph.mat, x), G._host_mm(graph.mat, x))
    monkeypatch.setattr(G, "CPU_FULL_KERNEL", "cuda-only")
    with pytest.raises(ValueError, match="MBREC_CPU_KERNEL"):
        G.full_kernel(graph.mat, x)


def _plain_stack(g, x, L, rows, include_ego, agg):
    hs = [x]
    for _ in range(L):
        hs.append(torch.sparse.mm(g.mat, hs[-1]))
    terms = hs if include_ego else hs[1:]
    out = torch.stack(terms).sum(0)
    out = out / len(terms) if agg == "mean" else out
    return out if rows is None else out[rows]


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("include_ego", [True, False])
@pytest.mark.parametrize("agg", ["mean", "sum"])
def test_fused_lightgcn_stack_matches_autograd(L, rows, include_ego, agg) -> None:
    graph = to_device(sp.random(40, 40, density=0.15, format="csr", dtype=np.float32, random_state=5))  # not symmetric
    torch.manual_seed(L)
    x = torch.randn(graph.mat.shape[1], 5, dtype=torch.float32, requires_grad=True)
    r = torch.tensor([0, 3, 7, 21, 39]) if rows else None
    w = torch.randn(5 if rows else graph.mat.shape[0], 5)
    got = lightgcn_stack(graph, x, L, rows=r, include_ego=include_ego, agg=agg)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    want = _plain_stack(graph, x, L, r, include_ego, agg)
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(g_got, g_want, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(lightgcn_stack(graph, x, L, rows=r, include_ego=include_ego, agg=agg), want, atol=1e-6)
