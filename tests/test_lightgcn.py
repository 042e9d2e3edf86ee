"""LightGCN: the shared layer loop (rows vs full), the row-restricted loss against the full
computation, and the declared floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbrec.bench import SparseProduct
from mbrec.data.registry import load_dataset
from mbrec.graph import bipartite, normalize_sym, to_device
from mbrec.losses import bpr, l2
from mbrec.graph import lightgcn_stack, node_rows
from mbrec.models.lightgcn import LightGCN, LightGCNConfig
from mbrec.train import to_tensors

DEV = torch.device("cpu")


def synthetic():
    return load_dataset("synthetic", n_users=40, n_items=30)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_layers", [0, 1, 3])
@pytest.mark.parametrize("include_ego,agg", [(True, "mean"), (False, "mean"), (True, "sum"), (False, "sum")])
def test_stack_rows_equal_full_rows_with_gradients(tiny, n_layers: int, include_ego: bool, agg: str) -> None:
    g = to_device(normalize_sym(bipartite(tiny.train["view"])), DEV, symmetric=True)
    n = g.shape[0]
    torch.manual_seed(0)
    x = torch.randn(n, 5, requires_grad=True)
    w = torch.randn(4, 5)
    rows = torch.tensor([0, 3, 4, 12, n - 1])
    if n_layers == 0 and not include_ego:
        return  # no layer at all: an empty mean, not a model setting
    full = lightgcn_stack(g, x, n_layers, include_ego=include_ego, agg=agg)
    (full[rows[:4]] * w).sum().backward()
    g_full, x.grad = x.grad.clone(), None
    part = lightgcn_stack(g, x, n_layers, rows=rows, include_ego=include_ego, agg=agg)
    assert part.shape == (len(rows), 5)
    torch.testing.assert_close(part, full[rows].detach(), rtol=1e-5, atol=1e-6)
    (part[:4] * w).sum().backward()
    torch.testing.assert_close(x.grad, g_full, rtol=1e-5, atol=1e-6)


def test_stack_by_hand(tiny) -> None:
    A = normalize_sym(bipartite(tiny.train["buy"]))
    g = to_device(A, DEV, symmetric=True)
    x = torch.randn(A.shape[0], 3)
    X = x.numpy()
    want = (X + A @ X + A @ (A @ X)) / 3
    np.testing.assert_allclose(lightgcn_stack(g, x, 2).numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lightgcn_stack(g, x, 2, include_ego=False, agg="sum").numpy(), want * 3 - X,
                               rtol=1e-5, atol=1e-5)


def test_node_rows_positions() -> None:
    a, b = torch.tensor([5, 1, 5]), torch.tensor([7, 1])
    rows, (pa, pb) = node_rows(a, b)
    assert rows.tolist() == [1, 5, 7]
    assert torch.equal(rows[pa], a) and torch.equal(rows[pb], b)


def full_loss(model: LightGCN, graphs, batch) -> dict[str, torch.Tensor]:
    """The plain computation: every node through every layer, then the batch's rows."""
    emb = model(graphs)
    b = batch["b"] if model.n_tables > 1 else torch.zeros_like(batch["users"])
    u, i, j = batch["users"], batch["pos"], batch["neg"]
    U = model.n_users
    eu, ei, ej = emb[b, u], emb[b, U + i], emb[b, U + j]
    main = bpr((eu * ei).sum(1), (eu * ej).sum(1))
    ego = model.embedding.view(model.n_tables, U + model.n_items, -1)
    reg = 0.5 * l2(ego[b, u], ego[b, U + i], ego[b, U + j]) / len(u)
    return {"loss": main + model.cfg.reg * reg, "bpr": main, "reg": reg}


@pytest.mark.parametrize("mode", ["target", "merged", "per_behavior"])
@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_row_restricted_loss_equals_full_computation(mode: str, n_layers: int) -> None:
    data = synthetic()
    torch.manual_seed(0)
    model = LightGCN(data, LightGCNConfig(embedding_dim=8, n_layers=n_layers, mode=mode, batch_size=64, reg=0.1))
    graphs = model.build_graphs(data, DEV)
    batch = to_tensors(next(iter(model.make_sampler(data).epoch(np.random.default_rng(1)))), DEV)
    ref = full_loss(model, graphs, batch)
    ref["loss"].backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    got = model.loss(graphs, batch)
    got["loss"].backward()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    for k, v in grads(model).items():
        torch.testing.assert_close(v, g_ref[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["target", "per_behavior"])
def test_floor_products(mode: str) -> None:
    data = synthetic()
    model = LightGCN(data, LightGCNConfig(embedding_dim=8, n_layers=3, mode=mode, batch_size=16))
    graphs = model.build_graphs(data, DEV)
    batch = to_tensors(next(iter(model.make_sampler(data).epoch(np.random.default_rng(1)))), DEV)
    prods = model.floor_products(graphs, batch)
    assert len(prods) == 3 and all(isinstance(p, SparseProduct) for p in prods)
    assert all(p.graph is graphs and p.width == 8 and p.backward for p in prods)
    assert [p.rows is None for p in prods] == [True, True, False]
    b = batch["b"] if mode == "per_behavior" else torch.zeros_like(batch["users"])
    N = model.n_users + model.n_items
    nodes = torch.cat([b * N + batch["users"], b * N + model.n_users + batch["pos"], b * N + model.n_users + batch["neg"]])
    assert prods[-1].n_rows == len(torch.unique(nodes)) < graphs.shape[0]
