"""The fused LightGCN helpers of mbrec.graph (:func:`lightgcn_rows` and its ``_LayerAndRows``
layers, :func:`lightgcn_block` and its ``_StackBlock``) against plain autograd on a small graph:
the same values and the same gradients, with rows gathered from the output and the input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.graph import bipartite, lightgcn_block, lightgcn_rows, normalize_sym, to_device

DEV = torch.device("cpu")


def small_graph():
    """A 7-user x 5-item bipartite graph with one isolated user (an empty row)."""
    R = sp.csr_matrix(np.array([[1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 0, 0, 1], [0, 0, 0, 1, 1],
                                [0, 0, 0, 0, 0], [1, 0, 0, 1, 0], [0, 1, 0, 0, 1]], dtype=np.float32))
    A = normalize_sym(bipartite(R))
    return to_device(A, DEV, symmetric=True), torch.from_numpy(A.toarray())


def plain(A: torch.Tensor, x: torch.Tensor, n_layers: int, include_ego: bool, agg: str) -> torch.Tensor:
    """The LightGCN sum by dense autograd: the reference."""
    layers, h = ([x] if include_ego else []), x
    for _ in range(n_layers):
        h = A @ h
        layers.append(h)
    acc = torch.stack(layers).sum(0)
    return acc / len(layers) if agg == "mean" else acc


def leaf(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("include_ego,agg", [(True, "mean"), (False, "mean"), (True, "sum"), (False, "sum")])
def test_lightgcn_rows_values_and_gradients(n_layers: int, include_ego: bool, agg: str) -> None:
    if n_layers == 0 and not include_ego:
        return  # no layer at all: an empty mean, not a model setting
    g, A = small_graph()
    rows = torch.tensor([0, 4, 6, 8, 11])  # users (one isolated) and items
    x, w, wx = leaf(12, 3, 0), torch.randn(5, 3), torch.randn(5, 3)
    out, x_rows = lightgcn_rows(g, x, n_layers, rows, include_ego=include_ego, agg=agg)
    ((out * w).sum() + (x_rows * wx).sum()).backward()
    got = x.grad.clone()
    x.grad = None
    want = plain(A, x, n_layers, include_ego, agg)[rows]
    ((want * w).sum() + (x[rows] * wx).sum()).backward()
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_rows, x[rows].detach())
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


def test_lightgcn_rows_without_reading_x_rows() -> None:
    """An unused ``x[rows]`` output (its gradient never materialises) still gives the right gradient."""
    g, A = small_graph()
    rows = torch.tensor([1, 7, 9])
    x = leaf(12, 4, 1)
    lightgcn_rows(g, x, 2, rows)[0].pow(2).sum().backward()
    got = x.grad.clone()
    x.grad = None
    plain(A, x, 2, True, "mean")[rows].pow(2).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_layers", [0, 1, 3])
@pytest.mark.parametrize("include_ego,agg", [(True, "mean"), (False, "mean"), (False, "sum")])
@pytest.mark.parametrize("residual", [False, True])
def test_lightgcn_block_values_and_gradients(n_layers: int, include_ego: bool, agg: str, residual: bool) -> None:
    if n_layers == 0 and not include_ego:
        return
    g, A = small_graph()
    out_rows = (torch.tensor([0, 2, 9]), torch.tensor([3, 3, 10]))  # rows may repeat
    in_rows = (torch.tensor([1, 5, 5, 11]),)
    x = leaf(12, 3, 2)
    wo, w1, w2, wi = torch.randn(12, 3), torch.randn(3, 3), torch.randn(3, 3), torch.randn(4, 3)
    out, (r1, r2), (xi,) = lightgcn_block(g, x, n_layers, include_ego=include_ego, agg=agg, residual=residual,
                                          out_rows=out_rows, in_rows=in_rows)
    ((out * wo).sum() + (r1 * w1).sum() + (r2 * w2).sum() + (xi * wi).sum()).backward()
    got = x.grad.clone()
    x.grad = None
    want = plain(A, x, n_layers, include_ego, agg) + (x if residual else 0)
    loss = (want * wo).sum() + (want[out_rows[0]] * w1).sum() + (want[out_rows[1]] * w2).sum()
    (loss + (x[in_rows[0]] * wi).sum()).backward()
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r2, want[out_rows[1]].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xi, x[in_rows[0]].detach())
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


def test_lightgcn_block_only_rows_read() -> None:
    """The whole output unused (its gradient never materialises): the rows alone carry the gradient."""
    g, A = small_graph()
    rows = torch.tensor([0, 6, 11])
    x = leaf(12, 3, 3)
    _, (r,), _ = lightgcn_block(g, x, 2, include_ego=False, residual=True, out_rows=(rows,))
    r.pow(2).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (plain(A, x, 2, False, "mean") + x)[rows].pow(2).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


def test_lightgcn_block_forward_equals_stack_bitwise() -> None:
    """The fused forward sums the layers in the order :func:`lightgcn_stack` does: identical bits."""
    from mbrec.graph import lightgcn_stack

    g, _ = small_graph()
    x = leaf(12, 5, 4)
    out, _, _ = lightgcn_block(g, x, 3, include_ego=False, residual=True)
    with torch.no_grad():
        want = lightgcn_stack(g, x, 3, include_ego=False) + x
    assert torch.equal(out.detach(), want)
