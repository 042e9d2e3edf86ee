"""PKEF: projection, parallel/cascade encoders, PME experts, unique pairs, full ranking."""

from __future__ import annotations

import numpy as np
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.graph import SparseGraph
from mbrec.losses import bpr, l2
from mbrec.models._experts import left_graphs, project, unique_matrices
from mbrec.models.pkef import PKEF, PKEFConfig
from mbrec.sampling import PairSampler

CPU = torch.device("cpu")


def _model(data: MultiBehaviorData, **kw) -> tuple[PKEF, list]:
    torch.manual_seed(0)
    m = PKEF(data, PKEFConfig(embedding_dim=4, **kw))
    return m, m.build_graphs(data, CPU)


def test_projection_by_hand() -> None:
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # row 0: <x,m>=3, |m|^2=1 -> (3, 0); row 1: <x,m>=1, |m|^2=2 -> (0.5, 0.5)
    torch.testing.assert_close(project(x, m), torch.tensor([[3.0, 0.0], [0.5, 0.5]]))


def test_parallel_and_cascade_by_hand(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny, layers=[2, 1, 1])
    out = m(g)
    A = [x.toarray().astype(np.float64) for x in left_graphs(tiny, "own")]
    e0 = torch.cat([m.user_emb, m.item_emb]).detach().double().numpy()

    def proj(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return (x * t).sum(1, keepdims=True) / ((t * t).sum(1, keepdims=True) + 1e-12) * t

    par = []
    for k in range(3):
        hs = [e0]
        for _ in range(m.layers[k]):
            hs.append(A[k] @ hs[-1] + hs[-1])
        par.append(hs)
        np.testing.assert_allclose(out["p"][k].detach().numpy(), np.sum(hs, 0), rtol=1e-4, atol=1e-6)
    inp = e0
    for k in range(3):
        hs = [inp]
        for layer in range(m.layers[k]):
            msg = A[k] @ hs[-1]
            hs.append(msg + hs[-1] + 0.3 * proj(par[k][layer + 1], msg))
        np.testing.assert_allclose(out["c"][k].detach().numpy(), np.sum(hs, 0), rtol=1e-4, atol=1e-6)
        inp = hs[-1] + inp


def test_projection_experts_by_hand(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny)
    c = [torch.randn(5, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    experts, unique = m.projection_experts(c, 1, slice(None))
    torch.testing.assert_close(experts[0], c[1])
    for n, j in enumerate((0, 2)):
        x, t = c[j].numpy(), c[1].numpy()
        shared = 0.01 * (x * t).sum(1, keepdims=True) / (t * t).sum(1, keepdims=True) * t
        np.testing.assert_allclose(experts[n + 1].numpy(), shared, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(unique[j].numpy(), 0.01 * x - shared, rtol=1e-5, atol=1e-7)
        # the unique part is orthogonal to the task's representation
        np.testing.assert_allclose((unique[j].numpy() * t).sum(1), 0, atol=1e-6)


def test_unique_pairs_and_sampler(tiny: MultiBehaviorData) -> None:
    U = unique_matrices(tiny)
    mats = [tiny.train[b] for b in tiny.behaviors]
    for (k, j), M in U.items():
        expect = mats[k].toarray() * (1 - mats[j].toarray())
        np.testing.assert_array_equal(M.toarray(), expect)
    # tiny is nested (buy < cart < view): only the upstream-but-not-downstream pairs exist
    assert set(U) == {(0, 1), (0, 2), (1, 2)}
    assert set(unique_matrices(tiny, skip=("cart",))) == {(0, 2)}
    s = PairSampler(mats, batch_users=12, unique=U)
    b = next(s.epoch(np.random.default_rng(0)))
    for (k, j), M in U.items():
        u, p, n = b[f"uusers_{k}_{j}"], b[f"upos_{k}_{j}"], b[f"uneg_{k}_{j}"]
        assert np.all(np.asarray(M[u, p]).ravel() == 1) and np.all(np.asarray(M[u, n]).ravel() == 0)
        uniq, cnt = np.unique(u, return_counts=True)
        cap = np.minimum(np.diff(mats[k].indptr)[uniq], np.diff(M.indptr)[uniq])
        np.testing.assert_array_equal(cnt, np.minimum(cap, 40))


def test_pme_score_by_hand_and_full_ranking(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny)
    emb = m(g)
    c = [x.detach() for x in emb["c"]]
    U, u, k = tiny.n_users, 2, 2
    exu, _ = m.projection_experts(c, k, torch.tensor([u]))
    exi, _ = m.projection_experts(c, k, torch.arange(U, U + tiny.n_items))
    W, b = m.head.weight[0].detach(), m.head.bias[0].detach()
    gate = torch.softmax(torch.cat([exu[0].expand(tiny.n_items, -1), exi[0]], 1) @ W + b, dim=1)
    inner = torch.stack([(a * bb).sum(1) for a, bb in zip(exu, exi)], 1)
    expect = 300 * (gate * inner).sum(1)
    with torch.no_grad():
        got = m.score(emb, torch.tensor([u]), "buy")[0]
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-3)


def test_training_step_and_options(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny, loss_weights=[0.0, 4 / 6, 2 / 6], users_per_epoch=8)
    s = m.make_sampler(tiny)
    batches = list(s.epoch(np.random.default_rng(0)))
    assert sum(len(np.unique(b["users_1"])) for b in batches) <= 8
    terms = m.loss(g, {k: torch.from_numpy(x) for k, x in batches[0].items()})
    assert torch.isfinite(terms["loss"])
    assert "parallel_view" not in terms and float(terms["unique_cart"]) > 0  # lambda_view = 0
    terms["loss"].backward()
    assert m.user_emb.grad is not None and m.head.weight.grad is not None
    m2, _ = _model(tiny, unique_loss=False)
    assert m2.unique_pairs == []
    assert not any(k.startswith("uusers") for k in next(m2.make_sampler(tiny).epoch(np.random.default_rng(0))))


def test_gate_weight_on_own_expert_is_logged(tiny: MultiBehaviorData) -> None:
    """``gate_own_<b>`` is the mean softmax weight of task b's own expert over its pairs."""
    m, g = _model(tiny, loss_weights=[0.0, 4 / 6, 2 / 6])
    batch = {k: torch.from_numpy(x) for k, x in next(m.make_sampler(tiny).epoch(np.random.default_rng(0))).items()}
    terms = m.loss(g, batch)
    assert "gate_own_view" not in terms  # lambda_view = 0: the task is skipped
    c = [x.detach() for x in m(g)["c"]]
    u, pos, neg = batch["users_2"], batch["pos_2"], batch["neg_2"]
    uu, ii = torch.cat([u, u]), torch.cat([pos, neg]) + tiny.n_users
    W, b = m.head.weight[0].detach(), m.head.bias[0].detach()
    expect = torch.softmax(torch.cat([c[2][uu], c[2][ii]], 1) @ W + b, dim=1)[:, 0].mean()
    torch.testing.assert_close(terms["gate_own_buy"], expect, rtol=1e-5, atol=1e-6)
    assert not terms["gate_own_buy"].requires_grad


def _grads(m: PKEF) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}


def test_row_restricted_loss_equals_full_computation(tiny: MultiBehaviorData) -> None:
    """``loss`` (last behavior's last layer at the read rows only, shared first message, compact
    rows) gives the loss terms and gradients of ``reference_loss`` (every node, every layer)."""
    cases = [dict(loss_weights=[0.0, 4 / 6, 2 / 6]), dict(), dict(layers=[2, 1, 2], loss_weights=[0.5, 0.0, 0.5]),
             dict(layers=[1, 1, 0]), dict(unique_loss=False, gate="per_task"),
             dict(loss_weights=[0.0, 0.0, 0.0])]
    restricted = False
    for kw in cases:
        m, g = _model(tiny, batch_users=3, **kw)
        # float64 (model and graphs): the hand-written backward is compared at tight tolerance
        m = m.double()
        g = [SparseGraph(x.mat.to(torch.float64), x.mat_t.to(torch.float64)) for x in g]
        batch = {k: torch.from_numpy(x) for k, x in next(m.make_sampler(tiny).epoch(np.random.default_rng(1))).items()}
        p_reads, c_reads = m._reads(batch)
        reads = [r for rs in p_reads + c_reads for r in rs]
        restricted |= bool(reads) and torch.unique(torch.cat(reads)).numel() < tiny.n_users + tiny.n_items
        got = m.loss(g, batch)
        got["loss"].backward()
        g_got = _grads(m)
        m.zero_grad(set_to_none=True)
        ref = reference_loss(m, g, batch)
        ref["loss"].backward()
        g_ref = _grads(m)
        assert set(got) == set(ref), kw
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=lambda s: f"{kw} {name}: {s}")
        for name in g_ref:
            torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-9, atol=1e-9, msg=lambda s: f"{kw} {name}: {s}")
    assert restricted  # some case really computed a strict subset of the rows


def test_encoder_at_rows_equals_full_rows(tiny: MultiBehaviorData) -> None:
    m, g = _model(tiny, layers=[2, 1, 2])
    rows = torch.tensor([0, 3, 5, tiny.n_users + 1, tiny.n_users + 7])
    full, part = m(g), m._encode(g, rows)
    for k in range(3):
        torch.testing.assert_close(part["c"][k], full["c"][k][rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part["p"][k], full["p"][k][rows], rtol=1e-5, atol=1e-6)


def test_floor_products(tiny: MultiBehaviorData) -> None:
    from mbrec.bench import SparseProduct

    m, g = _model(tiny, layers=[3, 1, 2], loss_weights=[0.0, 4 / 6, 2 / 6], batch_users=3)
    batch = {k: torch.from_numpy(x) for k, x in next(m.make_sampler(tiny).epoch(np.random.default_rng(1))).items()}
    prods = m.floor_products(g, batch)
    assert all(isinstance(p, SparseProduct) and p.width == 4 and p.backward for p in prods)
    # every layer of both branches, less the cascade's first layer of the first behavior (same input E0)
    assert len(prods) == 2 * (3 + 1 + 2) - 1
    assert sum(p.graph is g[0] for p in prods) == 5 and sum(p.graph is g[1] for p in prods) == 2
    cut = [p for p in prods if p.n_rows is not None]
    assert [p.name for p in cut] == ["parallel buy layer 2", "cascade buy layer 2"]
    U = tiny.n_users
    task = lambda k: torch.cat([batch[f"users_{k}"], batch[f"pos_{k}"] + U, batch[f"neg_{k}"] + U])  # noqa: E731
    uni = torch.cat([batch["uusers_1_2"], batch["upos_1_2"] + U, batch["uneg_1_2"] + U])
    n_c = torch.unique(torch.cat([task(1), task(2), uni])).numel()
    assert cut[1].n_rows == n_c and cut[0].n_rows == n_c  # p[buy]'s rows are among c[buy]'s
    assert n_c < U + tiny.n_items
    m0, g0 = _model(tiny, loss_weights=[0.0, 0.0, 0.0])
    assert m0.floor_products(g0, batch) == []  # nothing trained: nothing required


def test_inject_backward_gradcheck() -> None:
    from mbrec.models.pkef import inject

    gen = torch.Generator().manual_seed(0)
    msg, prev, par = (torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: inject(a, b, c, 0.3), (msg, prev, par))
    with torch.no_grad():
        torch.testing.assert_close(inject(msg, prev, par, 0.3), msg + prev + 0.3 * project(par, msg))


def reference_loss(self, graphs, batch):  # noqa: ANN001 - the model is the first argument
    """The plain full computation of :meth:`loss` (every node, every layer): the reference
    the row-restricted path is tested against."""
    emb = self._encode(graphs, plain=True)
    U, scale = self.n_users, self.head.tower_scale
    p, c = emb["p"], emb["c"]
    total = p[0].new_zeros(())
    out: dict[str, torch.Tensor] = {}
    for k, b in enumerate(self.behaviors):
        if self.lam[k] == 0.0:
            continue
        u, pos, neg = batch[f"users_{k}"], batch[f"pos_{k}"], batch[f"neg_{k}"]
        uu, ii = torch.cat([u, u]), torch.cat([pos, neg]) + U
        par = bpr(*(scale * (p[k][uu] * p[k][ii]).sum(-1)).tensor_split(2))
        exu, _ = self.projection_experts(c, k, uu)
        exi, _ = self.projection_experts(c, k, ii)
        scores, gate = self.head.pairs(k, exu[0], exi[0], list(zip(exu, exi)), return_gate=True)
        pme = bpr(*scores.tensor_split(2))
        out[f"gate_own_{b}"] = gate[:, 0].detach().mean() if len(gate) else gate.new_zeros(())
        uni = total.new_zeros(())
        for (kk, j) in self.unique_pairs:
            if kk != k:
                continue
            u2, p2, n2 = batch[f"uusers_{k}_{j}"], batch[f"upos_{k}_{j}"], batch[f"uneg_{k}_{j}"]
            uu2, ii2 = torch.cat([u2, u2]), torch.cat([p2, n2]) + U
            _, unu = self.projection_experts(c, k, uu2)
            _, uni_i = self.projection_experts(c, k, ii2)
            uni = uni + bpr(*(scale * (unu[j] * uni_i[j]).sum(-1)).tensor_split(2))
        w = 3.0 * self.lam[k]
        out[f"parallel_{b}"], out[f"pme_{b}"], out[f"unique_{b}"] = (w * par).detach(), (w * pme).detach(), (w * uni).detach()
        total = total + w * (par + pme + uni)
    reg = self.config.reg * l2(self.user_emb, self.item_emb, self.head.weight)
    out.update({"loss": total + reg, "bpr": total.detach(), "reg": reg.detach()})
    return out
