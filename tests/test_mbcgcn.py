"""MB-CGCN: hand-computed propagation, transfer, loss; gradients; pretraining; sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError
from mbrec.models.base import get_model_class
from mbrec.graph import to_device
from mbrec.models.mbcgcn import MBCGCN, MBCGCNConfig, PretrainGCN, lightgcn_block
from mbrec.sampling import RandomUserSampler

S2 = math.sqrt(2.0)


def two_by_two() -> MultiBehaviorData:
    """2 users x 2 items. view: u0-i0, u0-i1, u1-i1. buy: u0-i0, u1-i1."""
    csr = sp.csr_matrix
    return MultiBehaviorData(
        name="2x2",
        behaviors=("view", "buy"),
        train={"view": csr(np.array([[1, 1], [0, 1]])), "buy": csr(np.array([[1, 0], [0, 1]]))},
        valid={},
        test={},
        user_ids=np.array(["a", "b"]),
        item_ids=np.array(["x", "y"]),
    )


# Hand-written normalised view adjacency, node order u0, u1, i0, i1; degrees 2, 1, 1, 2.
A_VIEW = np.array(
    [
        [0, 0, 1 / S2, 1 / 2],
        [0, 0, 0, 1 / S2],
        [1 / S2, 0, 0, 0],
        [1 / 2, 1 / S2, 0, 0],
    ]
)
# buy: every degree is 1, so the normalised adjacency is the plain 0/1 matrix.
A_BUY = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
X0 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])  # u0, u1, i0, i1


def make_model(layers=(1, 1), **kw) -> tuple[MBCGCN, list]:
    data = two_by_two()
    model = MBCGCN(data, MBCGCNConfig(embedding_dim=2, layers=layers, **kw))
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor(X0[:2]))
        model.item_emb.copy_(torch.tensor(X0[2:]))
        model.w_user[0].copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swap coordinates
        model.w_item[0].copy_(2 * torch.eye(2))
    return model, model.build_graphs(data, torch.device("cpu"))


def test_registered() -> None:
    assert get_model_class("mbcgcn") is MBCGCN


def test_symmetric_normalisation_values() -> None:
    _, graphs = make_model()
    np.testing.assert_allclose(graphs[0].mat.to_dense().numpy(), A_VIEW, rtol=1e-6)
    np.testing.assert_allclose(graphs[1].mat.to_dense().numpy(), A_BUY, rtol=1e-6)


def test_block_is_mean_over_layers() -> None:
    _, graphs = make_model()
    x = torch.tensor(X0, dtype=torch.float32)
    out1 = lightgcn_block(graphs[0], x, 1).numpy()
    # u0: ([1,0] + [1/√2 + 0, 1/√2 + 1]) / 2 ; i1: ([0,2] + [1/2, 1/√2]) / 2
    np.testing.assert_allclose(out1[0], [(1 + 1 / S2) / 2, (1 / S2 + 1) / 2], rtol=1e-6)
    np.testing.assert_allclose(out1[3], [0.25, (2 + 1 / S2) / 2], rtol=1e-6)
    out2 = lightgcn_block(graphs[0], x, 2).numpy()
    np.testing.assert_allclose(out2, (X0 + A_VIEW @ X0 + A_VIEW @ A_VIEW @ X0) / 3, rtol=1e-5)
    np.testing.assert_allclose(lightgcn_block(graphs[0], x, 0).numpy(), X0)


def test_cascade_with_transfer_and_sum() -> None:
    model, graphs = make_model()
    emb = model(graphs)
    o1 = (X0 + A_VIEW @ X0) / 2
    x2 = np.vstack([o1[:2] @ np.array([[0, 1], [1, 0]]), o1[2:] * 2])
    o2 = (x2 + A_BUY @ x2) / 2
    # one value written out: user 0 after the buy block = (swap(o1[u0]) + 2 * o1[i0]) / 2
    o1_u0 = np.array([(1 + 1 / S2) / 2, (1 + 1 / S2) / 2])
    o1_i0 = np.array([(1 + 1 / S2) / 2, 1 / 2])
    np.testing.assert_allclose(o2[0], (o1_u0[::-1] + 2 * o1_i0) / 2)
    np.testing.assert_allclose(emb["user"].detach().numpy(), (o1 + o2)[:2], rtol=1e-5)
    np.testing.assert_allclose(emb["item"].detach().numpy(), (o1 + o2)[2:], rtol=1e-5)
    scores = model.score(emb, torch.tensor([1]), "buy").detach().numpy()
    np.testing.assert_allclose(scores, (o1 + o2)[1:2] @ (o1 + o2)[2:].T, rtol=1e-5)


def test_bpr_and_reg_by_hand() -> None:
    model, graphs = make_model(reg_weight=0.1)
    emb = {k: v.detach().numpy() for k, v in model(graphs).items() if k != "blocks"}
    batch = {"users": torch.tensor([0, 1]), "pos": torch.tensor([0, 1]), "neg": torch.tensor([1, 0])}
    terms = model.loss(graphs, batch)
    u, it = emb["user"], emb["item"]
    d0 = u[0] @ it[0] - u[0] @ it[1]
    d1 = u[1] @ it[1] - u[1] @ it[0]
    expected_bpr = (math.log1p(math.exp(-d0)) + math.log1p(math.exp(-d1))) / 2
    # ego rows: u0, u1, i0, i1, i1, i0 ; W_u = swap (‖·‖² = 2), W_i = 2I (‖·‖² = 8)
    sq = 1 + 1 + 2 + 4 + 4 + 2 + 2 + 8
    assert terms["bpr"].item() == pytest.approx(expected_bpr, rel=1e-5)
    assert terms["reg"].item() == pytest.approx(0.1 * 0.5 * sq / 2, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(expected_bpr + 0.1 * 0.5 * sq / 2, rel=1e-5)


def test_every_parameter_gets_a_gradient(tiny) -> None:
    torch.manual_seed(0)
    model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=8, layers=(1, 2, 1), batch_size=8))
    graphs = model.build_graphs(tiny, torch.device("cpu"))
    batch = next(iter(model.make_sampler(tiny).epoch(np.random.default_rng(0))))
    terms = model.loss(graphs, {k: torch.as_tensor(v) for k, v in batch.items()})
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pretraining_changes_first_block_start(tiny) -> None:
    def start(epochs: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=8, layers=1, batch_size=8, pretrain_epochs=epochs))
        before = model.user_emb.detach().clone()
        graphs = model.build_graphs(tiny, torch.device("cpu"))
        model.on_train_start(tiny, graphs, torch.device("cpu"))
        return before, model.user_emb.detach().clone(), model.item_emb.detach().clone()

    b0, u0, _ = start(0)
    assert torch.equal(b0, u0)
    b1, u1, i1 = start(3)
    assert not torch.allclose(b1, u1)
    # progress goes to the run log: a header, epochs 1 and 3 (first and last), a total; the loss falls
    lines: list[str] = []
    torch.manual_seed(0)
    model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=8, layers=1, batch_size=8, pretrain_epochs=12, pretrain_lr=0.05))
    model.on_train_start(tiny, model.build_graphs(tiny, torch.device("cpu")), torch.device("cpu"), log=lines.append)
    assert "pretraining a 3-layer LightGCN on 'view' for 12 epochs" in lines[0]
    epochs = [ln for ln in lines if ln.startswith("pretrain epoch")]
    assert [int(ln.split()[2]) for ln in epochs] == [1, 10, 12] and lines[-1].startswith("pretraining done")
    losses = [float(ln.split("loss ")[1].split()[0]) for ln in epochs]
    assert losses[-1] < losses[0]
    # the pretrained table is a LightGCN trained on the view graph: users who view more
    # items end with larger embeddings than the N(0, 0.01²) start
    assert u1.norm() > b1.norm()
    assert torch.isfinite(i1).all()


def test_pretrain_gcn_by_hand() -> None:
    """The official GCN.py network as executed: leaky_relu(Â E W + b), slope 0.2, concatenated."""
    A = torch.tensor([[0.0, 0.5], [0.5, 0.0]])
    graph = to_device(sp.csr_matrix(A.numpy()), torch.device("cpu"), symmetric=True)
    ego = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    net = PretrainGCN(ego.clone(), n_layers=1, init_std=0.01)
    with torch.no_grad():
        net.weights[0].copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        net.biases[0].copy_(torch.tensor([[0.5, 0.0]]))
    # Â E = [[1.5, 0], [0.5, -1]]; · W = [[1.5, 0], [0.5, 1]]; + b = [[2, 0], [1, 1]]; all >= 0
    out = net(graph)
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 2.0, 0.0], [3.0, 0.0, 1.0, 1.0]]))
    with torch.no_grad():
        net.biases[0].copy_(torch.tensor([[-3.0, 0.0]]))
    # first column becomes [-1.5, -2.5] -> leaky slope 0.2
    assert torch.allclose(net(graph)[:, 2], torch.tensor([-0.3, -0.5]))


def test_pretrain_model_gcn_runs_and_is_checked(tiny) -> None:
    torch.manual_seed(0)
    model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=8, layers=1, batch_size=8, pretrain_epochs=3,
                                      pretrain_model="gcn", pretrain_lr=0.05))
    before = model.user_emb.detach().clone()
    lines: list[str] = []
    model.on_train_start(tiny, model.build_graphs(tiny, torch.device("cpu")), torch.device("cpu"), log=lines.append)
    assert "3-layer GCN (official GCN.py as executed) on 'view'" in lines[0]
    assert not torch.allclose(before, model.user_emb) and torch.isfinite(model.item_emb).all()
    # only the ego table is handed over: the model has no extra parameters afterwards
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in MBCGCN(tiny, MBCGCNConfig(
        embedding_dim=8, layers=1)).named_parameters()}
    with pytest.raises(ConfigError, match="pretrain_model"):
        MBCGCN(tiny, MBCGCNConfig(pretrain_model="ngcf"))


def test_random_user_sampler(tiny) -> None:
    R = tiny.train["buy"]
    s = RandomUserSampler(R, batch_size=5)
    batches = list(s.epoch(np.random.default_rng(1)))
    assert len(batches) == R.nnz // 5 + 1
    for b in batches:
        assert len(set(b["users"].tolist())) == 5  # distinct users within a batch
        assert np.all(R[b["users"], b["pos"]].A1 == 1)
        assert np.all(R[b["users"], b["neg"]].A1 == 0)


def test_layers_must_match_behaviors(tiny) -> None:
    with pytest.raises(ConfigError, match="one non-negative depth per behavior"):
        MBCGCN(tiny, MBCGCNConfig(layers=(1, 2)))
    with pytest.raises(ConfigError, match="sampler"):
        MBCGCN(tiny, MBCGCNConfig(sampler="nope"))


def test_scores_target_only(tiny) -> None:
    model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=4, layers=1))
    assert model.scored_behaviors == ("buy",)
    emb = model(model.build_graphs(tiny, torch.device("cpu")))
    assert model.score(emb, torch.arange(3), "buy").shape == (3, tiny.n_items)
    with pytest.raises(Exception, match="does not predict"):
        model.score(emb, torch.arange(3), "view")


@pytest.mark.parametrize("name", ["crgcn-beibei", "hkuds-beibei", "mule-taobao", "bvae-jd", "synthetic"])
def test_configs_resolve(name: str) -> None:
    from pathlib import Path

    from mbrec.config import build_config

    path = Path(__file__).resolve().parents[1] / "configs" / "mbcgcn" / f"{name}.yaml"
    cfg = build_config(config_file=path)
    assert cfg.model == "mbcgcn" and cfg.data == name
    assert cfg.train.lr == 1e-3 and cfg.train.eval_every == 5
    assert cfg.model_args.reg_weight == 1e-4 and cfg.model_args.batch_size == 2048
    expected = {"crgcn-beibei": (3, 4, 3), "hkuds-beibei": (3, 4, 3), "mule-taobao": (2, 4, 3)}
    if name in expected:
        assert tuple(cfg.model_args.layers) == expected[name]


# -- row-restricted training path and floor ------------------------------------------------------
def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _batch(model, data, seed: int = 1) -> dict[str, torch.Tensor]:
    b = next(iter(model.make_sampler(data).epoch(np.random.default_rng(seed))))
    return {k: torch.as_tensor(v) for k, v in b.items()}


@pytest.mark.parametrize("layers", [(1, 2, 1), (2, 0, 3), (0, 1, 0)])
def test_row_restricted_loss_equals_full_computation(tiny, layers) -> None:
    """``loss`` computes the last block's last layer at the batch rows only; the plain full
    cascade (``forward`` + ``bpr_l2_loss``) gives the same terms and gradients."""
    from mbrec.models.mbcgcn import bpr_l2_loss

    torch.manual_seed(0)
    model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=6, layers=layers, batch_size=8, reg_weight=0.1, init_std=0.5))
    graphs = model.build_graphs(tiny, torch.device("cpu"))
    batch = _batch(model, tiny)
    emb = model(graphs)
    ref = bpr_l2_loss(emb["user"], emb["item"], model.user_emb, model.item_emb, batch, 0.1,
                      extra=[*model.w_user, *model.w_item])
    ref["loss"].backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    got = model.loss(graphs, batch)
    got["loss"].backward()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    g_got = _grads(model)
    assert set(g_got) == set(g_ref)
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("net", ["lightgcn", "gcn"])
def test_pretraining_rows_equal_full_computation(tiny, net: str) -> None:
    """The pretraining objective computes the network's last layer at the batch rows only."""
    from mbrec.models.mbcgcn import _PRETRAIN_NETS

    rows = torch.tensor([1, 4, 20])
    no_layer = _PRETRAIN_NETS[net](torch.randn(tiny.n_users + tiny.n_items, 3), 0, 0.1)
    graph = MBCGCN(tiny, MBCGCNConfig(layers=1)).build_graphs(tiny, torch.device("cpu"))[0]
    torch.testing.assert_close(no_layer(graph, rows), no_layer(graph)[rows])  # no layer: the ego rows

    from mbrec.graph import split_nodes
    from mbrec.models.mbcgcn import _PretrainObjective, bpr_l2_loss, make_triplet_sampler

    torch.manual_seed(0)
    model = MBCGCN(tiny, MBCGCNConfig(embedding_dim=6, layers=1, batch_size=8))
    graphs = model.build_graphs(tiny, torch.device("cpu"))
    ego = torch.randn(tiny.n_users + tiny.n_items, 6) * 0.5
    obj = _PretrainObjective(_PRETRAIN_NETS[net](ego, 2, 0.3), tiny.n_users, 0.1)
    b = next(iter(make_triplet_sampler("random_users", tiny.train["view"], 8).epoch(np.random.default_rng(2))))
    batch = {k: torch.as_tensor(v) for k, v in b.items()}
    full = obj.net(graphs[0])
    rows = torch.tensor([0, 3, tiny.n_users + 1, tiny.n_users + tiny.n_items - 1])
    torch.testing.assert_close(obj.net(graphs[0], rows), full[rows], rtol=1e-5, atol=1e-7)
    u, i = split_nodes(full, tiny.n_users)
    eu, ei = split_nodes(obj.net.ego, tiny.n_users)
    ref = bpr_l2_loss(u, i, eu, ei, batch, 0.1)
    ref["loss"].backward()
    g_ref = _grads(obj)
    obj.zero_grad(set_to_none=True)
    got = obj.loss(graphs, batch)
    got["loss"].backward()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    for k, v in _grads(obj).items():
        torch.testing.assert_close(v, g_ref[k], rtol=1e-4, atol=1e-7)
    # its floor: one product per layer, the last at the batch's distinct rows
    from mbrec.bench import DenseProduct, SparseProduct

    prods = obj.floor_products(graphs, batch)
    sparse = [p for p in prods if isinstance(p, SparseProduct)]
    n_rows = len(torch.unique(batch["users"])) + len(torch.unique(torch.cat([batch["pos"], batch["neg"]])))
    assert [p.n_rows for p in sparse] == [None, n_rows] and all(p.backward and p.graph is graphs[0] for p in sparse)
    assert len([p for p in prods if isinstance(p, DenseProduct)]) == (2 if net == "gcn" else 0)


def test_floor_products_on_synthetic() -> None:
    from mbrec.bench import DenseProduct, SparseProduct
    from mbrec.data.registry import load_dataset

    data = load_dataset("synthetic", n_users=60, n_items=50)
    model = MBCGCN(data, MBCGCNConfig(embedding_dim=8, layers=(3, 4, 2), batch_size=16))
    graphs = model.build_graphs(data, torch.device("cpu"))
    batch = _batch(model, data)
    prods = model.floor_products(graphs, batch)
    sparse = [p for p in prods if isinstance(p, SparseProduct)]
    dense = [p for p in prods if isinstance(p, DenseProduct)]
    assert len(sparse) == 9 and all(p.backward and p.width == 8 for p in sparse)
    assert [p.graph for p in sparse] == [graphs[0]] * 3 + [graphs[1]] * 4 + [graphs[2]] * 2
    n_rows = len(torch.unique(batch["users"])) + len(torch.unique(torch.cat([batch["pos"], batch["neg"]])))
    assert [p.n_rows for p in sparse] == [None] * 8 + [n_rows] and n_rows < graphs[2].shape[0]
    # user and item transfers after every block but the last
    assert [(p.m, p.k, p.n) for p in dense] == [(60, 8, 8), (50, 8, 8)] * 2
