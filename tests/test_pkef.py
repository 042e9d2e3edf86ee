"""PKEF: projection, parallel/cascade encoders, PME experts, unique pairs, full ranking."""

from __future__ import annotations

import numpy as np
import torch

from mbrec.data.container import MultiBehaviorData
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
