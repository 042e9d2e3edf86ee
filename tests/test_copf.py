"""COPF: graph construction, COGCN hand-over, each DFME expert, stop-gradient, variants, sampler."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError
from mbrec.graph import bipartite, normalize_sym
from mbrec.losses import bpr
from mbrec.models._experts import left_graphs
from mbrec.models.copf import COPF, VARIANTS, COPFConfig
from mbrec.sampling import PairSampler

CPU = torch.device("cpu")


def small() -> MultiBehaviorData:
    """2 users x 3 items. view {(0,0),(0,1),(1,1),(1,2)}, cart {(0,0),(1,1)}, buy {(0,0),(1,2)}."""
    csr = sp.csr_matrix
    view = csr(np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float32))
    cart = csr(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    buy = csr(np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32))
    return MultiBehaviorData(
        name="small", behaviors=("view", "cart", "buy"),
        train={"view": view, "cart": cart, "buy": buy}, valid={}, test={},
        user_ids=np.array(["a", "b"]), item_ids=np.array(["x", "y", "z"]),
    )


def dense(g) -> np.ndarray:
    return g.mat.to_dense().numpy()


def test_cumulative_multigraph_left_normalised_by_hand() -> None:
    g = left_graphs(small(), "cumulative")
    # C_2 = view + cart = [[2,1,0],[0,2,1]]: user rows / row sums; item rows: columns / col sums
    expect2 = np.zeros((5, 5), dtype=np.float32)
    expect2[0, 2:] = [2 / 3, 1 / 3, 0]
    expect2[1, 2:] = [0, 2 / 3, 1 / 3]
    expect2[2, :2] = [1, 0]
    expect2[3, :2] = [1 / 3, 2 / 3]
    expect2[4, :2] = [0, 1]
    np.testing.assert_allclose(g[1].toarray(), expect2, rtol=1e-6)
    # C_3 adds buy: user 0 has (0,0) three times -> [3/4, 1/4, 0]; item 2 column [0, 2] -> [0, 1]
    np.testing.assert_allclose(g[2].toarray()[0, 2:], [3 / 4, 1 / 4, 0], rtol=1e-6)
    np.testing.assert_allclose(g[2].toarray()[1, 2:], [0, 2 / 4, 2 / 4], rtol=1e-6)
    # C_1 = view alone (binary)
    np.testing.assert_allclose(g[0].toarray()[0, 2:], [0.5, 0.5, 0], rtol=1e-6)
    own = left_graphs(small(), "own")
    np.testing.assert_allclose(own[1].toarray()[0, 2:], [1, 0, 0])  # cart only
    allg = left_graphs(small(), "all")
    assert all((m != allg[2]).nnz == 0 for m in allg) and (allg[2] != g[2]).nnz == 0


def _model(data: MultiBehaviorData, **kw) -> tuple[COPF, dict]:
    torch.manual_seed(0)
    m = COPF(data, COPFConfig(embedding_dim=4, **kw))
    return m, m.build_graphs(data, CPU)


def _ref_encoder(m: COPF, data: MultiBehaviorData, pre: str, mode: str, lightgcn: bool = False) -> list[np.ndarray]:
    """Dense reference of the encoder rules (Eqs. 5-7 and the variants' replacements)."""
    e0 = torch.cat([m.user_emb, m.item_emb]).detach().numpy().astype(np.float64)
    if lightgcn:
        gs = [normalize_sym(bipartite(data.train[b])).toarray() for b in data.behaviors]
    else:
        gs = [x.toarray() for x in left_graphs(data, mode)]
    outs, inp, lasts = [], e0, []
    for k, g in enumerate(gs):
        h = e0 if pre == "none" else inp
        hs = [h]
        for _ in range(m.layers[k]):
            h = g @ h if lightgcn else g @ h + h
            hs.append(h)
        outs.append(np.mean(hs, 0) if lightgcn else np.sum(hs, 0))
        lasts.append(h)
        inp = h if pre == "strict" else h + inp
    if pre == "cumulative":  # Eq. 6 unrolled: In_{k+1} = sum_{k' <= k} E^{k',L} + E0
        np.testing.assert_allclose(inp, sum(lasts) + e0, rtol=1e-10)
    return outs


@pytest.mark.parametrize(
    "variant,pre,mode,lgcn",
    [("full", "cumulative", "cumulative", False), ("P", "none", "cumulative", False), ("A", "cumulative", "all", False),
     ("F", "none", "all", False), ("B", "strict", "cumulative", False), ("H", "cumulative", "own", False),
     ("C", "strict", "own", False), ("wo_cogcn", "none", "own", True)],
)
def test_encoder_variants_against_dense_reference(tiny: MultiBehaviorData, variant: str, pre: str, mode: str, lgcn: bool) -> None:
    m, g = _model(tiny, layers=[2, 1, 3], variant=variant)
    got = [x.detach().numpy() for x in m.encode(g)]
    ref = _ref_encoder(m, tiny, pre, mode, lgcn)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cogcn_handover_one_layer_by_hand() -> None:
    """L = 1: e^{k,*} = (2I + C_k) In_k, In_{k+1} = (I + C_k) In_k + In_k = e^{k,*}."""
    data = small()
    m, g = _model(data)
    e0 = torch.cat([m.user_emb, m.item_emb]).detach().numpy()
    C = [x.toarray() for x in left_graphs(data, "cumulative")]
    e1 = 2 * e0 + C[0] @ e0
    e2 = 2 * e1 + C[1] @ e1
    got = m.encode(g)
    np.testing.assert_allclose(got[0].detach().numpy(), e1, rtol=1e-5)
    np.testing.assert_allclose(got[1].detach().numpy(), e2, rtol=1e-5)


def test_fitting_expert_by_hand() -> None:
    data = small()
    m, g = _model(data, mtl_layers=[2, 1, 1])
    e = m.encode(g)
    fit = m.fitting_experts(g, e)
    A = [x.toarray() for x in left_graphs(data, "own")]
    E = [x.detach().numpy() for x in e]
    r = m.beh_emb.detach().numpy()
    W = m.mtl_w[0].detach().numpy()
    for k in range(3):
        for j in range(3):
            if j == k:
                continue
            f0 = 0.5 * (0.1 * E[j] + 0.001 * E[k])  # alpha on the other behavior, beta on the task's own
            f1 = A[k] @ (f0 * r[k]) + f0
            total = f0 + f1
            if k == 0:  # two MTL layers: r passes through W^1 before layer 1
                total = total + A[k] @ (f1 * (r[k] @ W)) + f1
            np.testing.assert_allclose(fit[(k, j)].detach().numpy(), 0.1 * total, rtol=1e-5, atol=1e-8)


def test_fitting_experts_at_rows_equal_all_nodes_then_rows() -> None:
    """The training path (last layer at the rows the loss reads, the column scale r applied after
    the product) gives the rows of the all-node experts, in values and in gradients."""
    data = small()
    m, g = _model(data, mtl_layers=[2, 1, 1])
    n = m.n_users + m.n_items
    rows = {k: torch.tensor(sorted({0, 2, n - 1, k + 1}), dtype=torch.long) for k in range(3)}
    weights = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))

    def run(compact: bool) -> tuple[dict, list]:
        m.zero_grad()
        fit = m.fitting_experts(g, m.encode(g), rows=rows if compact else None)
        # the training path returns the experts a step detaches (stop-gradient) detached
        fit = fit if compact else {kj: x[rows[kj[0]]].detach() if m._detached(kj[1]) else x[rows[kj[0]]]
                                   for kj, x in fit.items()}
        sum((x * weights[rows[kj[0]]] * (1 + kj[1])).sum() for kj, x in fit.items()).backward()
        return fit, [p.grad.clone() for p in m.parameters() if p.grad is not None]

    full, g_full = run(False)
    part, g_part = run(True)
    for kj in full:
        torch.testing.assert_close(part[kj], full[kj], rtol=1e-5, atol=1e-7)
    assert len(g_full) == len(g_part)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gate_own_expert_and_tower_by_hand() -> None:
    data = small()
    m, g = _model(data, tower="sum300")
    emb = m(g)
    u, v, k = 1, 2, 2
    e = [x.detach().numpy() for x in emb["e"]]
    eu, ev = e[k][u], e[k][2 + v]
    W, b = m.head.weight[0].detach().numpy(), m.head.bias[0].detach().numpy()
    logits = np.concatenate([eu, ev]) @ W + b
    gate = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    experts = [eu * ev] + [emb["fit"][(k, j)].detach().numpy()[u] * emb["fit"][(k, j)].detach().numpy()[2 + v] for j in (0, 1)]
    expect = 300 * sum(gate[i] * experts[i].sum() for i in range(3))
    got = m._pair_scores(emb, k, torch.tensor([u]), torch.tensor([v]))
    np.testing.assert_allclose(got.item(), expect, rtol=1e-5)
    # full ranking (broadcast gate) equals the per-pair score for every item
    full = m.score(emb, torch.tensor([u]), "buy").detach().numpy()[0]
    per = m._pair_scores(emb, k, torch.tensor([u] * 3), torch.arange(3)).detach().numpy()
    np.testing.assert_allclose(full, per, rtol=1e-5)
    mean_m, _ = _model(data, tower="mean")
    assert mean_m.head.tower_scale == pytest.approx(1 / 4)


def test_full_ranking_matches_pairs_for_every_behavior(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny, gate="per_task")
    emb = m(g)
    users = torch.tensor([0, 3, 7])
    for k, b in enumerate(tiny.behaviors):
        full = m.score(emb, users, b)
        uu = users.repeat_interleave(tiny.n_items)
        ii = torch.arange(tiny.n_items).repeat(len(users))
        per = m._pair_scores(emb, k, uu, ii).reshape(len(users), -1)
        torch.testing.assert_close(full, per, rtol=1e-4, atol=1e-4)


def _grad_of(m: COPF, g: dict, task: int, watch: int) -> torch.Tensor | None:
    """Gradient that task ``task``'s BPR alone sends into behavior ``watch``'s COGCN output."""
    emb = m(g)
    emb["e"][watch].retain_grad()
    users = torch.tensor([0, 1, 2, 0, 1, 2])
    items = torch.tensor([0, 1, 2, 5, 6, 7])
    bpr(*m._pair_scores(emb, task, users, items).tensor_split(2)).backward()
    return emb["e"][watch].grad


def test_stop_gradient_options(tiny: MultiBehaviorData) -> None:
    """intended: an auxiliary task sends no gradient into the target behavior (its only route is
    the detached fitting expert built from e^K); released: it does; the target task always does."""
    m, g = _model(tiny, stop_gradient="intended")
    gr = _grad_of(m, g, task=1, watch=2)
    assert gr is None or float(gr.abs().sum()) == 0.0
    assert float(_grad_of(m, g, task=2, watch=2).abs().sum()) > 0
    assert float(_grad_of(m, g, task=1, watch=0).abs().sum()) > 0  # the view expert still flows
    m, g = _model(tiny, stop_gradient="released")
    assert float(_grad_of(m, g, task=1, watch=2).abs().sum()) > 0
    # parameter level: cart's modulation vector r_cart gets gradient only via cart's fitting experts
    for sg, expect_zero in (("all", True), ("intended", False)):
        m, g = _model(tiny, stop_gradient=sg)
        emb = m(g)
        bpr(*m._pair_scores(emb, 1, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 4, 5])).tensor_split(2)).backward()
        grad = m.beh_emb.grad
        assert (grad is None or float(grad[1].abs().sum()) == 0.0) == expect_zero


def test_contrastive_matches_naive_rows(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny, tau=0.2, gamma=1.0)
    emb = m(g)
    users = torch.tensor([0, 0, 0, 3, 5, 5])
    items = torch.tensor([1, 2, 1, 4, 4, 9])
    got = m.contrastive(emb, users, items)
    e = emb["e"]
    U = tiny.n_users
    naive = 0.0
    for ids, off, n in ((users, 0, U), (items, U, tiny.n_items)):
        for k in range(2):
            a = torch.nn.functional.normalize(e[2][ids + off], dim=1)
            allk = torch.nn.functional.normalize(e[k][off : off + n], dim=1)
            logits = a @ allk.T / 0.2
            naive = naive + torch.nn.functional.cross_entropy(logits, ids, reduction="sum")
    torch.testing.assert_close(got, naive / U)


def test_variants_run_and_change_what_they_claim(tiny: MultiBehaviorData) -> None:
    sampler_rng = np.random.default_rng(0)
    for v in VARIANTS:
        m, g = _model(tiny, variant=v, loss_weights=[0.2, 0.3, 0.5])
        batch = next(m.make_sampler(tiny).epoch(sampler_rng))
        terms = m.loss(g, {k: torch.from_numpy(x) for k, x in batch.items()})
        assert torch.isfinite(terms["loss"]), v
        terms["loss"].backward()
        emb = m(g)
        assert m.score(emb, torch.arange(4), "buy").shape == (4, tiny.n_items)
        no_cl = v in ("wo_con", "D")
        assert (float(terms["cl"]) == 0.0) == no_cl, v
        assert (len(emb["fit"]) == 0) == (v in ("wo_for", "wo_fit", "wo_dfme", "D")), v
        if v in ("wo_back", "wo_fit"):
            assert m.spec["stop_gradient"] == "released"
        if v == "all_sg":
            assert m.spec["stop_gradient"] == "all"
    # D: every task scores the last behavior's output; wo_dfme: each task its own
    m, g = _model(tiny, variant="D")
    emb = m(g)
    emb["e"][0] = emb["e"][0] * 0 + 123.0
    s_d = m.score(emb, torch.arange(2), "view")
    torch.testing.assert_close(s_d, m.score(m(g), torch.arange(2), "view"))
    m, g = _model(tiny, variant="wo_for")
    emb = m(g)
    ex = m._experts(emb, 0, train=False)
    assert ex[1] is emb["e"][1] and ex[2] is emb["e"][2]


def test_sampler_up_to_40_pairs_per_behavior_negatives() -> None:
    rng = np.random.default_rng(1)
    R = sp.random(30, 60, density=0.8, random_state=3, format="csr")
    R.data[:] = 1
    keep = np.ones(30)
    keep[5] = 0  # user 5 has no positive under behavior 0
    R = (sp.diags(keep) @ R).tocsr()
    R.eliminate_zeros()
    S = sp.random(30, 60, density=0.1, random_state=4, format="csr")
    S.data[:] = 1
    s = PairSampler([R, S], batch_users=10, max_pairs=40)
    n_batches = 0
    for b in s.epoch(rng):
        n_batches += 1
        for k, M in enumerate((R, S)):
            u, p, n = b[f"users_{k}"], b[f"pos_{k}"], b[f"neg_{k}"]
            assert np.all(np.asarray(M[u, p]).ravel() == 1)
            assert np.all(np.asarray(M[u, n]).ravel() == 0)
            uniq, cnt = np.unique(u, return_counts=True)
            deg = np.diff(M.indptr)[uniq]
            np.testing.assert_array_equal(cnt, np.minimum(deg, 40))
        assert 5 not in b["users_0"]
    assert n_batches == 3
    sub = PairSampler([R], batch_users=4, users_per_epoch=10)
    assert sum(len(np.unique(b["users_0"])) for b in sub.epoch(rng)) <= 10 and len(sub) == 3


def test_config_validation(tiny: MultiBehaviorData) -> None:
    with pytest.raises(ConfigError, match="variant"):
        COPF(tiny, COPFConfig(variant="Z"))
    with pytest.raises(ConfigError, match="layers"):
        COPF(tiny, COPFConfig(layers=[1, 1]))
    with pytest.raises(ConfigError, match="loss_weights"):
        COPF(tiny, COPFConfig(loss_weights=[1.0]))
    with pytest.raises(ConfigError, match="stop_gradient"):
        COPF(tiny, COPFConfig(stop_gradient="never"))


@pytest.mark.parametrize("model", ["copf", "pkef"])
@pytest.mark.parametrize("name", ["hkuds-beibei", "mule-taobao", "synthetic"])
def test_configs_resolve(model: str, name: str) -> None:
    from pathlib import Path

    from mbrec.config import build_config

    cfg = build_config(model, config_file=Path(__file__).resolve().parents[1] / "configs" / model / f"{name}.yaml")
    if name != "synthetic":
        assert cfg.protocol.selection == "test" and cfg.protocol.hr == "hits_per_user"
        assert cfg.train.lr_decay == 0.96 and cfg.train.patience == 0
        assert sum(cfg.model_args.loss_weights) == pytest.approx(1.0)
    if model == "copf" and name == "hkuds-beibei":
        assert cfg.train.lr_decay_steps == 21716 // 256 and cfg.model_args.loss_weights[0] == 0.0


@pytest.mark.realdata
def test_beibei_cumulative_graph(shared_datasets) -> None:
    from mbrec.data.registry import load_dataset

    data = load_dataset(str(shared_datasets / "hkuds-beibei"))
    C = bipartite(data.train["pv"] + data.train["cart"] + data.train["buy"], binary=False)
    # beibei is nested (buy < cart < pv): every buy pair weighs 3 in the cumulative multigraph
    u, i = data.train["buy"].nonzero()
    assert np.all(np.asarray(C[u[:1000], data.n_users + i[:1000]]).ravel() == 3)
    g = left_graphs(data, "cumulative")[2]
    rows = np.asarray(g.sum(1)).ravel()
    np.testing.assert_allclose(rows[rows > 0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("logit_scale", [1.0, 60.0])
def test_separable_gate_ranking_equals_broadcast_softmax(logit_scale: float) -> None:
    from mbrec.models._experts import GatedTower

    torch.manual_seed(3)
    head = GatedTower(4, 3)
    with torch.no_grad():
        head.weight.mul_(logit_scale)
        head.bias.normal_()
    eu, ev = torch.randn(5, 4), torch.randn(7, 4)
    ex = [(torch.randn(5, 4), torch.randn(7, 4)) for _ in range(3)]
    w, b = head.weight[0], head.bias[0]
    g = torch.softmax((eu @ w[:4])[:, None, :] + (ev @ w[4:] + b)[None], dim=-1)
    expect = 300 * (g * torch.stack([a @ bb.T for a, bb in ex], -1)).sum(-1)
    torch.testing.assert_close(head.full(0, eu, ev, ex), expect, rtol=1e-4, atol=1e-3)
