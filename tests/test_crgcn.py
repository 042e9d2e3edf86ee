"""CRGCN: hand-computed residual cascade, loss with padding rows, gradients, sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.models.base import get_model_class
from mbrec.models.crgcn import CRGCN, CRGCNConfig

S2 = math.sqrt(2.0)
# Same hand case as test_mbcgcn: 2 users x 2 items; view u0-i0, u0-i1, u1-i1; buy u0-i0, u1-i1.
A_VIEW = np.array(
    [[0, 0, 1 / S2, 1 / 2], [0, 0, 0, 1 / S2], [1 / S2, 0, 0, 0], [1 / 2, 1 / S2, 0, 0]]
)
A_BUY = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
X0 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
B_VIEW = np.array([0.1, -0.1])
B_BUY = np.array([0.0, 0.2])


def two_by_two(buy_u1: bool = True) -> MultiBehaviorData:
    csr = sp.csr_matrix
    buy = np.array([[1, 0], [0, 1 if buy_u1 else 0]])
    return MultiBehaviorData(
        name="2x2",
        behaviors=("view", "buy"),
        train={"view": csr(np.array([[1, 1], [0, 1]])), "buy": csr(buy)},
        valid={},
        test={},
        user_ids=np.array(["a", "b"]),
        item_ids=np.array(["x", "y"]),
    )


def make_model(**kw) -> tuple[CRGCN, list]:
    data = two_by_two()
    model = CRGCN(data, CRGCNConfig(embedding_dim=2, **kw))
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor(X0[:2]))
        model.item_emb.copy_(torch.tensor(X0[2:]))
        model.bias[0].copy_(torch.tensor(B_VIEW))
        model.bias[1].copy_(torch.tensor(B_BUY))
    return model, model.build_graphs(data, torch.device("cpu"))


def rownorm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def expected_stages() -> tuple[np.ndarray, np.ndarray]:
    e_view = rownorm(A_VIEW @ X0 + B_VIEW) + X0
    e_buy = rownorm(A_BUY @ e_view + B_BUY) + e_view
    return e_view, e_buy


def test_registered_and_scores_every_behavior() -> None:
    model, _ = make_model()
    assert get_model_class("crgcn") is CRGCN
    assert model.scored_behaviors == ("view", "buy")


def test_bias_starts_at_zero_and_graph_is_symmetric_normalised() -> None:
    model = CRGCN(two_by_two(), CRGCNConfig(embedding_dim=4))
    assert all(torch.count_nonzero(b) == 0 for b in model.bias)
    graphs = model.build_graphs(two_by_two(), torch.device("cpu"))
    np.testing.assert_allclose(graphs[0].mat.to_dense().numpy(), A_VIEW, rtol=1e-6)
    np.testing.assert_allclose(graphs[1].mat.to_dense().numpy(), A_BUY, rtol=1e-6)


def test_residual_cascade_with_rownorm_and_bias() -> None:
    model, graphs = make_model()
    stages = {b: v.detach().numpy() for b, v in model(graphs).items()}
    # user 1 under view, written out: Â x = [0, √2]; + bias = [0.1, √2 - 0.1]; rownorm; + [0, 1]
    h = np.array([0.1, S2 - 0.1])
    np.testing.assert_allclose(stages["view"][1], h / np.linalg.norm(h) + [0.0, 1.0], rtol=1e-6)
    e_view, e_buy = expected_stages()
    np.testing.assert_allclose(stages["view"], e_view, rtol=1e-5)
    np.testing.assert_allclose(stages["buy"], e_buy, rtol=1e-5)
    emb = model(graphs)
    users = torch.tensor([0, 1])
    np.testing.assert_allclose(model.score(emb, users, "buy").detach().numpy(), e_buy[:2] @ e_buy[2:].T, rtol=1e-5)
    np.testing.assert_allclose(model.score(emb, users, "view").detach().numpy(), e_view[:2] @ e_view[2:].T, rtol=1e-5)


def _bpr_log_eps(d: float) -> float:
    return -math.log(1e-10 + 1 / (1 + math.exp(-d)))


@pytest.mark.parametrize("padding", ["batch", "valid"])
def test_loss_by_hand_with_padding_rows(padding: str) -> None:
    model, graphs = make_model(reg_weight=0.5, padding=padding)
    e_view, e_buy = expected_stages()
    # rows: user 0 and user 1; user 1's buy row is a padding row (masked)
    trip = torch.tensor([[[0, 1, 0], [0, 0, 1]], [[1, 1, 0], [1, 0, 0]]])
    valid = torch.tensor([[True, True], [True, False]])
    terms = model.loss(graphs, {"triplets": trip, "valid": valid})

    def d(e: np.ndarray, u: int, i: int, j: int) -> float:
        return float(e[u] @ e[2 + i] - e[u] @ e[2 + j])

    view = (_bpr_log_eps(d(e_view, 0, 1, 0)) + _bpr_log_eps(d(e_view, 1, 1, 0))) / 2
    buy = _bpr_log_eps(d(e_buy, 0, 0, 1)) / (2 if padding == "batch" else 1)
    reg = 0.5 * (math.sqrt(1 + 1) + math.sqrt(2 + 4)) / (2 + 1)  # norms of E_u, E_i; n_items + 1
    assert terms["bpr_view"].item() == pytest.approx(view, rel=1e-5)
    assert terms["bpr_buy"].item() == pytest.approx(buy, rel=1e-5)
    assert terms["reg"].item() == pytest.approx(reg, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(view + buy + reg, rel=1e-5)


def test_padding_rows_carry_no_gradient() -> None:
    grads = []
    for fill in (0, 1):  # the content of a masked row must not matter
        model, graphs = make_model()
        trip = torch.tensor([[[0, 1, 0], [0, 0, 1]], [[1, 1, 0], [1, fill, 1 - fill]]])
        valid = torch.tensor([[True, True], [True, False]])
        model.loss(graphs, {"triplets": trip, "valid": valid})["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_every_parameter_gets_a_gradient(tiny) -> None:
    torch.manual_seed(0)
    model = CRGCN(tiny, CRGCNConfig(embedding_dim=8, batch_size=6))
    graphs = model.build_graphs(tiny, torch.device("cpu"))
    batch = next(iter(model.make_sampler(tiny).epoch(np.random.default_rng(0))))
    terms = model.loss(graphs, {k: torch.as_tensor(v) for k, v in batch.items()})
    assert set(terms) == {"loss", "bpr_view", "bpr_cart", "bpr_buy", "reg"}
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sampler_one_triplet_per_user_and_behavior() -> None:
    data = two_by_two(buy_u1=False)  # user 1 has no purchase
    model = CRGCN(data, CRGCNConfig(embedding_dim=2, batch_size=1))
    batches = list(model.make_sampler(data).epoch(np.random.default_rng(0)))
    assert len(batches) == 2  # every user once, one user per batch
    by_user = {int(b["triplets"][0, 0, 0]): b for b in batches}
    assert sorted(by_user) == [0, 1]
    assert by_user[1]["valid"].tolist() == [[True, False]]
    t = by_user[1]["triplets"][0]
    assert t[0].tolist() == [1, 1, 0]  # view: only positive i1; negative outside the union = i0
    assert t[1, 1:].tolist() == [0, 0]  # padding positive/negative for the missing purchase


def test_xavier_uniform_init_bound(tiny) -> None:
    torch.manual_seed(0)
    model = CRGCN(tiny, CRGCNConfig(embedding_dim=8))
    bound = math.sqrt(6 / (tiny.n_users + 8))
    assert model.user_emb.abs().max().item() <= bound
    assert model.user_emb.abs().max().item() > 0.5 * bound


@pytest.mark.parametrize("name", ["crgcn-beibei", "hkuds-beibei", "mule-taobao", "bvae-jd", "synthetic"])
def test_configs_resolve(name: str) -> None:
    from pathlib import Path

    from mbrec.config import build_config

    path = Path(__file__).resolve().parents[1] / "configs" / "crgcn" / f"{name}.yaml"
    cfg = build_config(config_file=path)
    assert cfg.model == "crgcn" and cfg.data == name
    assert cfg.train.lr == 0.01 and cfg.train.patience == 20
    assert cfg.model_args.reg_weight == 1e-3 and cfg.model_args.batch_size == 1024
    if name == "crgcn-beibei":
        assert cfg.protocol.name == "rmbrec" and cfg.protocol.select_metric == "HR@20"


# -- row-restricted training path and floor ------------------------------------------------------
def _full_loss(model: CRGCN, graphs, batch) -> dict[str, torch.Tensor]:
    """The plain computation (every stage over all nodes, then the triplets' rows)."""
    from mbrec.losses import bpr

    stages = model(graphs)
    trip, valid = batch["triplets"].long(), batch["valid"].bool()
    out, total = {}, torch.zeros(())
    for k, b in enumerate(model.behaviors):
        u_all, i_all = stages[b][: model.n_users], stages[b][model.n_users :]
        u = u_all[trip[:, k, 0]]
        term = bpr((u * i_all[trip[:, k, 1]]).sum(-1), (u * i_all[trip[:, k, 2]]).sum(-1), form=model.config.bpr_form,
                   mask=valid[:, k], over="all" if model.config.padding == "batch" else "valid")
        out[f"bpr_{b}"] = term
        total = total + term
    out["reg"] = model.config.reg_weight * (model.user_emb.norm() + model.item_emb.norm()) / (model.n_items + 1)
    out["loss"] = total + out["reg"]
    return out


@pytest.mark.parametrize("layers,padding", [(1, "batch"), (2, "valid"), (3, "batch")])
def test_row_restricted_loss_equals_full_computation(tiny, layers: int, padding: str) -> None:
    """``loss`` computes the last stage at its triplets' rows only: same terms and gradients."""
    torch.manual_seed(0)
    model = CRGCN(tiny, CRGCNConfig(embedding_dim=6, layers=layers, batch_size=5, padding=padding))
    with torch.no_grad():
        for p in model.bias:
            p.normal_()
    graphs = model.build_graphs(tiny, torch.device("cpu"))
    b = next(iter(model.make_sampler(tiny).epoch(np.random.default_rng(3))))
    batch = {k: torch.as_tensor(v) for k, v in b.items()}
    ref = _full_loss(model, graphs, batch)
    ref["loss"].backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = model.loss(graphs, batch)
    got["loss"].backward()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-7)


def test_floor_products_on_synthetic() -> None:
    from mbrec.bench import SparseProduct
    from mbrec.data.registry import load_dataset

    data = load_dataset("synthetic", n_users=60, n_items=50)
    model = CRGCN(data, CRGCNConfig(embedding_dim=8, layers=2, batch_size=16))
    graphs = model.build_graphs(data, torch.device("cpu"))
    b = next(iter(model.make_sampler(data).epoch(np.random.default_rng(0))))
    batch = {k: torch.as_tensor(v) for k, v in b.items()}
    prods = model.floor_products(graphs, batch)
    assert len(prods) == 6 and all(isinstance(p, SparseProduct) and p.backward and p.width == 8 for p in prods)
    assert [p.graph for p in prods] == [graphs[0]] * 2 + [graphs[1]] * 2 + [graphs[2]] * 2
    t = batch["triplets"][:, 2]
    n_rows = len(torch.unique(t[:, 0])) + len(torch.unique(t[:, 1:]))
    assert [p.n_rows for p in prods] == [None] * 5 + [n_rows] and n_rows < graphs[2].shape[0]
