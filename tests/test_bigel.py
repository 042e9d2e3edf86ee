"""BiGEL: shapes, gradients, ablations, CPA and CGL against hand computations, sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError
from mbrec.models.base import get_model_class
from mbrec.losses import info_nce
from mbrec.models.bigel import BiGEL, BiGELConfig, Gate

DEV = torch.device("cpu")


def make(data: MultiBehaviorData, seed: int = 0, **kw: object) -> tuple[BiGEL, dict, dict]:
    torch.manual_seed(seed)
    model = BiGEL(data, BiGELConfig(embedding_dim=8, batch_size=16, **kw))
    graphs = model.build_graphs(data, DEV)
    batch = next(iter(model.make_sampler(data).epoch(np.random.default_rng(seed))))
    return model, graphs, batch


def test_registered_and_scores_every_behavior(tiny: MultiBehaviorData) -> None:
    assert get_model_class("bigel") is BiGEL
    model, graphs, _ = make(tiny)
    assert model.scored_behaviors == ("view", "cart", "buy")
    emb = model(graphs)
    users = torch.tensor([0, 3, 5])
    for b in tiny.behaviors:
        assert model.score(emb, users, b).shape == (3, tiny.n_items)
    with pytest.raises(Exception):
        model.score(emb, users, "click")


def test_gate_shapes_range_and_gradient() -> None:
    torch.manual_seed(0)
    g = Gate(6, 3)
    a, t = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    out = g(a, t)
    assert out.shape == (5, 3) and bool(((out > 0) & (out < 1)).all())
    out.sum().backward()
    assert a.grad is not None and t.grad is not None and g.linear.weight.grad.shape == (3, 6)


def test_gate_and_projection_shapes(tiny: MultiBehaviorData) -> None:
    model, _, _ = make(tiny, gate_input="aux_target")
    for b in ("view", "cart"):
        assert model.cgf_gates[b].linear.weight.shape == (8, 16)
        assert model.gce_gates[b].linear.weight.shape == (8, 16)
        assert model.gce_proj[b].weight.shape == (8, 8) and model.gce_proj[b].bias.shape == (8,)
    assert "buy" not in model.cgf_gates and "buy" not in model.gce_proj  # the target is not enhanced
    model, _, _ = make(tiny)
    assert model.cgf_gates["view"].linear.weight.shape == (8, 8)


@pytest.mark.parametrize(
    "kw",
    [{}, {"gate_input": "aux_target", "cgf_source": "chain", "cpa_batch": "all"}, {"cpa_negatives": "full", "reg_scope": "all", "cpa_batch": "target_rows"}],
)
def test_every_parameter_gets_gradient(tiny: MultiBehaviorData, kw: dict) -> None:
    model, graphs, batch = make(tiny, **kw)
    terms = model.loss(graphs, batch)
    assert set(terms) == {"loss", "bpr_view", "bpr_cart", "bpr_buy", "reg", "cpa"}
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("detach", [False, True])
def test_cgf_feedback_reaches_target_unless_detached(tiny: MultiBehaviorData, detach: bool) -> None:
    model, graphs, batch = make(tiny, cgf_detach=detach)
    enc = model.encode(graphs)
    enc["target"].retain_grad()
    e = enc["final"]["view"]
    U, P, N = (torch.as_tensor(batch[k][0]) for k in ("users", "pos", "neg"))
    n = model.n_users
    aux = torch.nn.functional.softplus((e[U] * e[n + N]).sum(-1) - (e[U] * e[n + P]).sum(-1)).mean()
    aux.backward()
    if detach:
        assert enc["target"].grad is None
    else:
        assert enc["target"].grad is not None and float(enc["target"].grad.abs().sum()) > 0


def test_ablation_without_gce(tiny: MultiBehaviorData) -> None:
    model, graphs, batch = make(tiny, use_gce=False)
    assert model.gce_proj is None and model.gce_gates is None
    assert not any("gce" in name for name, _ in model.named_parameters())
    assert "global" in graphs  # CPA still needs the global embedding
    enc = model.encode(graphs)
    t = enc["target"]
    for b, k in (("view", 0), ("cart", 1)):  # final = CGL + CGF only
        e = enc["cgl"][k]
        expected = e + model.cgf_gates[b](e) * t
        torch.testing.assert_close(enc["final"][b], expected)
    model.loss(graphs, batch)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ablation_without_cgf_and_gce_is_plain_cascade(tiny: MultiBehaviorData) -> None:
    full, g_full, _ = make(tiny)
    bare, g_bare, _ = make(tiny, use_cgf=False, use_gce=False, use_cpa=False)
    assert bare.cgf_gates is None and "global" not in g_bare and list(bare.parameters()) == [bare.user_emb, bare.item_emb]
    enc = bare.encode(g_bare)
    for k, b in enumerate(("view", "cart", "buy")):
        torch.testing.assert_close(enc["final"][b], enc["cgl"][k])
    # the target embedding is the same CGL output in every variant (same seed, same P and Q)
    torch.testing.assert_close(full.encode(g_full)["target"], enc["target"])


def test_ablation_without_cgf_keeps_gce(tiny: MultiBehaviorData) -> None:
    model, graphs, _ = make(tiny, use_cgf=False)
    assert model.cgf_gates is None and model.gce_gates is not None
    enc = model.encode(graphs)
    e = enc["cgl"][0]
    expected = e + model.gce_gates["view"](e) * model.gce_proj["view"](enc["glob"])
    torch.testing.assert_close(enc["final"]["view"], expected)


def test_ablation_without_cpa(tiny: MultiBehaviorData) -> None:
    model, graphs, batch = make(tiny, use_cpa=False)
    terms = model.loss(graphs, batch)
    assert "cpa" not in terms
    torch.testing.assert_close(terms["loss"], terms["bpr_view"] + terms["bpr_cart"] + terms["bpr_buy"] + terms["reg"])
    with_cpa, g2, b2 = make(tiny, cpa_weight=0.5)
    t2 = with_cpa.loss(g2, b2)
    torch.testing.assert_close(t2["loss"], t2["bpr_view"] + t2["bpr_cart"] + t2["bpr_buy"] + t2["reg"] + 0.5 * t2["cpa"])


def test_task_weights_and_enhance_items(tiny: MultiBehaviorData) -> None:
    model, graphs, batch = make(tiny, use_cpa=False, task_weights={"view": 0.0, "cart": 2.0})
    t = model.loss(graphs, batch)
    torch.testing.assert_close(t["loss"], 2.0 * t["bpr_cart"] + t["bpr_buy"] + t["reg"])
    model, graphs, _ = make(tiny, enhance_items=False)
    enc = model.encode(graphs)
    n = model.n_users
    torch.testing.assert_close(enc["final"]["view"][n:], enc["cgl"][0][n:])
    assert not torch.allclose(enc["final"]["view"][:n], enc["cgl"][0][:n])
    with pytest.raises(ConfigError):
        make(tiny, task_weights={"click": 1.0})


def test_cpa_info_nce_hand_computed() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau, r = 0.5, 1 / math.sqrt(2)
    # cosines: a0.b0 = 1, a0.b1 = r, a1.b0 = 0, a1.b1 = r
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    l1 = -math.log(math.exp(r / tau) / (math.exp(0.0) + math.exp(r / tau)))
    assert float(info_nce(a, b, tau)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # full negatives: the candidates are a table of three rows, positives at rows 0 and 2
    table = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    f0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0.0) + math.exp(r / tau)))
    f1 = -math.log(math.exp(r / tau) / (math.exp(0.0) + math.exp(-1 / tau) + math.exp(r / tau)))
    got = info_nce(a, None, tau, negatives="table", candidates=table, targets=torch.tensor([0, 2]))
    assert float(got) == pytest.approx((f0 + f1) / 2, rel=1e-6)


def test_cpa_loss_is_user_plus_item_terms(tiny: MultiBehaviorData) -> None:
    model, graphs, _ = make(tiny)
    enc = model.encode(graphs)
    users, items = torch.tensor([0, 2, 5]), torch.tensor([1, 4])
    n, tau = model.n_users, model.config.tau
    t, g = enc["target"], enc["glob"]
    expected = info_nce(t[users], g[users], tau) + info_nce(t[n + items], g[n + items], tau)
    torch.testing.assert_close(model.cpa_loss(t, g, users, items), expected)


def two_by_two() -> MultiBehaviorData:
    csr = sp.csr_matrix
    return MultiBehaviorData(
        name="2x2",
        behaviors=("click", "buy"),
        train={"click": csr(np.array([[1, 0], [1, 1]], dtype=np.float32)), "buy": csr(np.eye(2, dtype=np.float32))},
        valid={},
        test={},
        user_ids=np.array(["a", "b"]),
        item_ids=np.array(["x", "y"]),
    )


@pytest.mark.parametrize("agg,residual", [("mean", "output"), ("sum", "output"), ("mean", "handover"), ("sum", "none")])
def test_cgl_residual_cascade_hand_computed(agg: str, residual: str) -> None:
    data = two_by_two()
    model = BiGEL(data, BiGELConfig(embedding_dim=2, layer_agg=agg, residual=residual, use_cgf=False, use_gce=False, use_cpa=False))
    X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [-1.0, 3.0]])  # nodes u_a, u_b, i_x, i_y
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor(X[:2]))
        model.item_emb.copy_(torch.tensor(X[2:]))
    h = 1 / math.sqrt(2)
    # click: degrees u_a 1, u_b 2, i_x 2, i_y 1; entries 1/sqrt(d_u d_i)
    A1 = np.array([[0, 0, h, 0], [0, 0, 0.5, h], [h, 0.5, 0, 0], [0, h, 0, 0]])
    # buy: a perfect matching, every degree 1
    A2 = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
    div2 = 2.0 if agg == "mean" else 1.0
    p1 = A1 @ X  # 1 layer
    if residual == "output":
        e1 = x2 = p1 + X
    elif residual == "handover":
        e1, x2 = p1, p1 + X
    else:
        e1 = x2 = p1
    p2 = (A2 @ x2 + A2 @ A2 @ x2) / div2  # 2 layers
    e2 = p2 + x2 if residual == "output" else p2
    cgl = model.cascade(model.build_graphs(data, DEV))
    np.testing.assert_allclose(cgl[0].detach().numpy(), e1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cgl[1].detach().numpy(), e2, rtol=1e-6, atol=1e-6)


def test_global_graph_multiplicity_and_layer_counts(tiny: MultiBehaviorData) -> None:
    model, graphs, _ = make(tiny)
    assert model.layers == (1, 2, 3)
    bin_g = graphs["global"].mat.to_dense()
    model_m, graphs_m, _ = make(tiny, global_graph="multiplicity", layers=[2, 2, 1])
    assert model_m.layers == (2, 2, 1)
    assert not torch.allclose(bin_g, graphs_m["global"].mat.to_dense())
    assert torch.equal(bin_g != 0, graphs_m["global"].mat.to_dense() != 0)
    with pytest.raises(ConfigError):
        make(tiny, layers=[1, 2])


def test_order_option(tiny: MultiBehaviorData) -> None:
    model, graphs, batch = make(tiny, order=["cart", "view", "buy"])
    assert model.order == ("cart", "view", "buy") and set(model.cgf_gates) == {"cart", "view"}
    assert batch["users"].shape[0] == 3
    for bad in (["view", "buy", "cart"], ["view", "view", "buy"], ["click", "buy"]):
        with pytest.raises(Exception):
            make(tiny, order=bad)
    empty = tiny.replace(train={**dict(tiny.train), "cart": sp.csr_matrix((tiny.n_users, tiny.n_items), dtype=np.float32)})
    assert make(empty)[0].order == ("view", "buy")  # behaviors without training pairs are left out


@pytest.mark.parametrize("epoch_size", ["target", "largest"])
def test_sampler_triplets_and_epoch_size(tiny: MultiBehaviorData, epoch_size: str) -> None:
    model = BiGEL(tiny, BiGELConfig(embedding_dim=8, batch_size=7, epoch_size=epoch_size))
    sampler = model.make_sampler(tiny)
    batches = list(sampler.epoch(np.random.default_rng(1)))
    assert len(batches) == len(sampler)
    nnz = [tiny.train[b].nnz for b in model.order]
    per_epoch = nnz[-1] if epoch_size == "target" else max(nnz)
    assert sum(b["users"].shape[1] for b in batches) == per_epoch
    for k, beh in enumerate(model.order):
        R = tiny.train[beh].toarray()
        u = np.concatenate([b["users"][k] for b in batches])
        i = np.concatenate([b["pos"][k] for b in batches])
        j = np.concatenate([b["neg"][k] for b in batches])
        assert R[u, i].all() and not R[u, j].any()
        pairs = u * tiny.n_items + i
        if nnz[k] >= per_epoch:  # no pair twice within an epoch
            assert len(np.unique(pairs)) == per_epoch
        if beh == "buy" and epoch_size == "target":  # one pass over the target's pairs
            assert len(np.unique(pairs)) == nnz[k]


def test_sampler_each_is_one_pass_over_every_behavior(tiny: MultiBehaviorData) -> None:
    model = BiGEL(tiny, BiGELConfig(embedding_dim=8, batch_size=7, epoch_size="each"))
    sampler = model.make_sampler(tiny)
    batches = list(sampler.epoch(np.random.default_rng(3)))
    nnz = [tiny.train[b].nnz for b in model.order]
    assert len(batches) == len(sampler) == -(-nnz[-1] // 7)  # as many batches as the target needs
    for k, beh in enumerate(model.order):
        R = tiny.train[beh].toarray()
        u = np.concatenate([b[f"users_{k}"] for b in batches])
        i = np.concatenate([b[f"pos_{k}"] for b in batches])
        j = np.concatenate([b[f"neg_{k}"] for b in batches])
        assert R[u, i].all() and not R[u, j].any()
        pairs = np.sort(u * tiny.n_items + i)  # every pair of the behavior exactly once
        assert np.array_equal(pairs, np.sort(np.nonzero(R.ravel())[0]))
        sizes = [len(b[f"users_{k}"]) for b in batches]
        assert max(sizes) - min(sizes) <= 1  # split evenly: proportional to the behavior's size
    # the loss reads this layout and equals the stacked layout's loss on the same triplets
    m = min(len(batches[0][f"users_{k}"]) for k in range(len(model.order)))
    ragged = {f"{n}_{k}": batches[0][f"{n}_{k}"][:m] for k in range(len(model.order)) for n in ("users", "pos", "neg")}
    stacked = {n: np.stack([ragged[f"{n}_{k}"] for k in range(len(model.order))]) for n in ("users", "pos", "neg")}
    graphs = model.build_graphs(tiny, DEV)
    a, b = model.loss(graphs, ragged), model.loss(graphs, stacked)
    assert set(a) == set(b) and all(torch.allclose(a[t], b[t]) for t in a)


def test_a_few_steps_reduce_the_loss(tiny: MultiBehaviorData) -> None:
    model, graphs, _ = make(tiny)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sampler = model.make_sampler(tiny)
    rng = np.random.default_rng(0)
    fixed = next(iter(sampler.epoch(rng)))
    first = model.loss(graphs, fixed)["loss"].item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(graphs, fixed)["loss"].backward()
        opt.step()
    assert model.loss(graphs, fixed)["loss"].item() < first


@pytest.mark.realdata
def test_bvae_jd_cascade_and_epoch(shared_datasets) -> None:  # type: ignore[no-untyped-def]
    from mbrec.data.registry import load_dataset

    data = load_dataset(str(shared_datasets / "bvae-jd"))
    model = BiGEL(data, BiGELConfig())
    assert model.order == ("click", "favourite", "purchase") and model.layers == (1, 2, 3)
    sampler = model.make_sampler(data)
    assert sampler.per_epoch == 60_967 and len(sampler) == 30  # one pass over the purchase pairs
    graphs = model.build_graphs(data, DEV)
    assert graphs["global"].shape == (10_690 + 13_465,) * 2
    assert graphs["global"].mat.values().numel() == 2 * data.train_union().nnz


# -- row-restricted training path and floor ------------------------------------------------------
def full_loss(model: BiGEL, graphs: dict, batch: dict) -> dict[str, torch.Tensor]:
    """The plain computation: :meth:`BiGEL.encode` over all nodes, then the batch's rows (the
    loss as written before the row-restricted path; CPA with the in-batch logits matrix)."""
    c, n = model.config, model.n_users
    trip = model._triplets(batch)
    enc = model.encode(graphs)
    terms: dict[str, torch.Tensor] = {}
    total, reg = torch.zeros(()), torch.zeros(())
    for k, b in enumerate(model.order):
        e = enc["final"][b]
        U, P, N = trip[k]
        terms[f"bpr_{b}"] = bpr_of((e[U] * e[n + P]).sum(-1), (e[U] * e[n + N]).sum(-1), c.bpr_form)
        total = total + model.task_weights[b] * terms[f"bpr_{b}"]
        if c.reg_scope == "batch":
            reg = reg + 0.5 * (model.user_emb[U].pow(2).sum() + model.item_emb[P].pow(2).sum()
                               + model.item_emb[N].pow(2).sum()) / len(U)
    if c.reg_scope == "all":
        reg = sum(p.pow(2).sum() for p in model.parameters())
    terms["reg"] = c.reg * reg
    total = total + terms["reg"]
    if c.use_cpa:
        Ut, Pt, _ = trip[-1]
        if c.cpa_batch == "target":
            users, items = torch.unique(Ut), torch.unique(Pt)
        elif c.cpa_batch == "all":
            users = torch.unique(torch.cat([x[0] for x in trip]))
            items = torch.unique(torch.cat([x[1] for x in trip] + [x[2] for x in trip]))
        else:
            users, items = Ut, Pt
        t, g = enc["target"], enc["glob"]
        if c.cpa_negatives == "in_batch":
            cpa = info_nce(t[users], g[users], c.tau) + info_nce(t[n + items], g[n + items], c.tau)
        else:
            cpa = model.cpa_loss(t, g, users, items)
        terms["cpa"] = cpa
        total = total + c.cpa_weight * cpa
    terms["loss"] = total
    return terms


def bpr_of(pos: torch.Tensor, neg: torch.Tensor, form: str) -> torch.Tensor:
    from mbrec.losses import bpr

    return bpr(pos, neg, form=form)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"gate_input": "aux_target", "cgf_source": "chain", "cpa_batch": "all"},
        {"cpa_negatives": "full", "reg_scope": "all", "cpa_batch": "target_rows"},
        {"enhance_items": False, "cgf_detach": True, "layer_agg": "sum", "residual": "handover"},
        {"enhance_items": False, "gate_input": "aux_target", "use_cgf": False, "residual": "none"},
        {"use_gce": False, "global_layers": 0},
        {"use_cgf": False, "use_gce": False, "use_cpa": False},
        {"use_gce": False, "use_cpa": False, "cgf_source": "chain"},
        {"order": ["cart", "view", "buy"], "layers": [2, 1, 2], "global_layers": 3, "task_weights": {"view": 0.0}},
    ],
)
def test_row_restricted_loss_equals_full_computation(tiny: MultiBehaviorData, kw: dict) -> None:
    """``loss`` computes the target block's and the global LightGCN's last layer, CGF and GCE
    only at the rows the loss reads; the full computation gives the same terms and gradients."""
    model, graphs, batch = make(tiny, **kw)
    with torch.no_grad():  # non-trivial gates and projections
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    ref = full_loss(model, graphs, batch)
    ref["loss"].backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = model.loss(graphs, batch)
    got["loss"].backward()
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    g_got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(g_got) == set(g_ref)
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], rtol=1e-4, atol=1e-6)


def test_floor_products_on_synthetic() -> None:
    from mbrec.bench import DenseProduct, SparseProduct
    from mbrec.data.registry import load_dataset

    data = load_dataset("synthetic", n_users=60, n_items=50)
    torch.manual_seed(0)
    model = BiGEL(data, BiGELConfig(embedding_dim=8, batch_size=8, layers=[2, 2, 3]))
    graphs = model.build_graphs(data, DEV)
    batch = next(iter(model.make_sampler(data).epoch(np.random.default_rng(0))))
    prods = model.floor_products(graphs, batch)
    sparse = [p for p in prods if isinstance(p, SparseProduct)]
    dense = [p for p in prods if isinstance(p, DenseProduct)]
    b, g = graphs["behavior"], graphs["global"]
    assert [p.graph for p in sparse] == [b[0]] * 2 + [b[1]] * 2 + [b[2]] * 3 + [g] * 2
    assert all(p.backward and p.width == 8 for p in sparse)
    n = model.n_users
    trip = model._triplets(batch)
    aux = torch.unique(torch.cat([torch.cat([t[0], n + t[1], n + t[2]]) for t in trip[:2]]))
    U, P, N = trip[2]
    target = torch.unique(torch.cat([U, n + P, n + N, aux]))
    glob = torch.unique(torch.cat([aux, U, n + P]))
    assert [p.n_rows for p in sparse] == [None] * 6 + [len(target), None, len(glob)]
    assert len(target) < b[2].shape[0] and len(glob) < g.shape[0]
    # CGF gate, GCE gate and projection per auxiliary at its own rows; CPA users and items
    own = [len(torch.unique(torch.cat([t[0], n + t[1], n + t[2]]))) for t in trip[:2]]
    assert [p.m for p in dense[:6]] == [own[0]] * 3 + [own[1]] * 3
    nu, ni = len(torch.unique(U)), len(torch.unique(P))
    assert [(p.m, p.n) for p in dense[6:]] == [(nu, nu), (ni, ni)]
    full = BiGEL(data, BiGELConfig(embedding_dim=8, batch_size=8, cpa_negatives="full"))
    fp = full.floor_products(full.build_graphs(data, DEV), batch)
    assert [p.n_rows for p in fp if isinstance(p, SparseProduct) and p.name.startswith("global")] == [None, None]
    assert [(p.m, p.n) for p in fp if p.name.startswith("CPA")] == [(nu, n), (ni, model.n_items)]
