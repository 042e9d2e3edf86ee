"""RMBRec: encoder, every loss term and every option against hand / NumPy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError
from mbrec.losses import bpr, info_nce
from mbrec.models.base import get_model_class
from mbrec.models.rmbrec import RMBRec, RMBRecConfig, bpr_dw

D = 3
BEHAVIORS = ("view", "cart", "buy")


# ----------------------------------------------------------------------------- fixtures
def small_data() -> MultiBehaviorData:
    """4 users x 4 items. User 2 has no cart; user 3 has neither cart nor buy."""
    view = [[1, 1, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1, 0]]
    cart = [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    buy = [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    csr = lambda m: sp.csr_matrix(np.array(m, dtype=np.float32))  # noqa: E731
    return MultiBehaviorData(
        name="small",
        behaviors=BEHAVIORS,
        train={"view": csr(view), "cart": csr(cart), "buy": csr(buy)},
        valid={},
        test={},
        user_ids=np.arange(4),
        item_ids=np.arange(4),
    )


# one triplet per user and behavior: [users, behaviors, (u, i+, j-)]; invalid rows as the
# shared sampler returns them, (u, 0, 0) with valid = False
TRIPLETS = np.array(
    [
        [[0, 0, 3], [0, 1, 3], [0, 1, 3]],
        [[1, 1, 0], [1, 3, 0], [1, 3, 2]],
        [[2, 3, 1], [2, 0, 0], [2, 0, 1]],
        [[3, 2, 0], [3, 0, 0], [3, 0, 0]],
    ]
)
VALID = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 0]], dtype=bool)


def batch() -> dict[str, torch.Tensor]:
    return {"triplets": torch.as_tensor(TRIPLETS), "valid": torch.as_tensor(VALID)}


def make(data: MultiBehaviorData | None = None, seed: int = 0, **kw: object) -> tuple[RMBRec, list]:
    data = data or small_data()
    cfg = RMBRecConfig(embedding_dim=D, n_layers=2, **kw)  # type: ignore[arg-type]
    m = RMBRec(data, cfg)
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # deterministic tables, independent of torch's RNG
        m.user_emb.copy_(torch.from_numpy(rng.normal(0, 0.5, m.user_emb.shape)))
        m.item_emb.copy_(torch.from_numpy(rng.normal(0, 0.5, m.item_emb.shape)))
    return m, m.build_graphs(data, torch.device("cpu"))


# ----------------------------------------------------------------------------- NumPy reference
def ref_propagate(Eu: np.ndarray, Ei: np.ndarray, mats: list[np.ndarray], L: int, official: bool) -> list[np.ndarray]:
    """Dense reference encoder: sym-normalised bipartite graph, per-layer row norm, layer sum."""
    out = []
    X0 = np.concatenate([Eu, Ei])
    for R in mats:
        nu, ni = R.shape
        A = np.zeros((nu + ni, nu + ni))
        A[:nu, nu:], A[nu:, :nu] = R, R.T
        s = (A.sum(1) + 1e-7) ** -0.5
        Ah = s[:, None] * A * s[None, :]
        x, acc = X0, X0.copy()
        for _ in range(L):
            x = Ah @ x
            if official:
                x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            acc = acc + x
        out.append(acc if official else acc / (L + 1))
    return out


def lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def reference_terms(m: RMBRec, data: MultiBehaviorData, official_rrm: bool = True) -> dict[str, float]:
    """Every term of the official loss, in float64 NumPy, for ``batch()``."""
    cfg = m.cfg
    pad = cfg.padding == "faithful"
    nu, ni = m.n_u, m.n_i
    mats = []
    for b in m.behaviors:
        R = np.zeros((nu, ni))
        R[: data.n_users, : data.n_items] = data.train[b].toarray()
        mats.append(R)
    H = ref_propagate(m.user_emb.detach().double().numpy(), m.item_emb.detach().double().numpy(),
                      mats, cfg.n_layers, cfg.encoder == "official")
    keep = [BEHAVIORS.index(b) for b in m.behaviors]
    trip, valid = TRIPLETS[:, keep], VALID[:, keep]
    B, nb = trip.shape[0], len(keep)
    u, i, j = trip[..., 0].copy(), trip[..., 1].copy(), trip[..., 2].copy()
    if pad:  # the official padding row (0, 0, 0): pad user, pad item, pad item
        u[~valid], i[~valid], j[~valid] = data.n_users, data.n_items, data.n_items
    i, j = i + nu, j + nu
    w = np.ones_like(valid, dtype=float) if pad else valid.astype(float)
    risks, reg = [], 0.0
    for k in range(nb):
        h = H[k]
        x = (h[u[:, k]] * h[i[:, k]]).sum(1) - (h[u[:, k]] * h[j[:, k]]).sum(1)
        ell = -np.log(1e-10 + 1 / (1 + np.exp(-x)))
        risks.append((ell * w[:, k]).sum() / w[:, k].sum())
        sq = (h[u[:, k]] ** 2).sum(1) + (h[i[:, k]] ** 2).sum(1) + (h[j[:, k]] ** 2).sum(1)
        reg += 0.5 * (sq * w[:, k]).sum() / B
    z = sum(H) / nb
    ut, it, jt, wt = u[:, -1], i[:, -1], j[:, -1], w[:, -1]
    x = (z[ut] * z[it]).sum(1) - (z[ut] * z[jt]).sum(1)
    main = (-np.log(1e-10 + 1 / (1 + np.exp(-x))) * wt).sum() / wt.sum()
    users = np.unique(ut[wt > 0])
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    a = norm(H[-1][users])
    rrm = []
    for k in range(nb - 1):
        c = norm(H[k][users])
        if official_rrm:
            S = a @ c.T / cfg.tau
            rrm.append(0.5 * ((lse(S, 1) - np.diag(S)).mean() + (lse(S, 0) - np.diag(S)).mean()))
        else:
            S = c @ c.T / cfg.tau
            pos = (c * a).sum(1) / cfg.tau
            S[np.arange(len(users)), np.arange(len(users))] = pos
            rrm.append((lse(S, 1) - pos).mean())
    risks_a = np.array(risks)
    out = {"main": main, "reg": reg, "orm": risks_a.var(ddof=1),
           "rrm": sum(rrm) if official_rrm else float(np.mean(rrm))}
    out.update({f"bpr_{b}": r for b, r in zip(m.behaviors, risks)})
    out["loss"] = main + cfg.reg * reg + cfg.lambda_cl * out["rrm"] + cfg.lambda_irm * out["orm"]
    return out


def values(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


# ----------------------------------------------------------------------------- encoder
def test_encoder_by_hand_on_two_by_two_graph() -> None:
    """u0-{i0, i1}, u1-{i1}: A_hat entries 1/sqrt(2*1), 1/sqrt(2*2), 1/sqrt(1*2); one layer."""
    R = sp.csr_matrix(np.array([[1, 1], [0, 1]], dtype=np.float32))
    data = MultiBehaviorData(name="2x2", behaviors=("buy",), train={"buy": R}, valid={}, test={},
                             user_ids=np.arange(2), item_ids=np.arange(2))
    Eu = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    Ei = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    r2 = math.sqrt(0.5)
    raw = torch.tensor([  # A_hat @ E, by hand
        [r2 * 1 + 0.5 * 1, r2 * 1 + 0.5 * -1],  # u0 = r2 * i0 + 0.5 * i1
        [r2 * 1, r2 * -1],  # u1 = r2 * i1
        [r2 * 1, 0.0],  # i0 = r2 * u0
        [0.5, r2],  # i1 = 0.5 * u0 + r2 * u1
    ])
    ego = torch.cat([Eu, Ei])
    for encoder, expected in (
        ("official", ego + raw / raw.norm(dim=1, keepdim=True)),  # u0 row: [1.9856, 0.1691]
        ("lightgcn", (ego + raw) / 2),
    ):
        m = RMBRec(data, RMBRecConfig(embedding_dim=2, n_layers=1, encoder=encoder, padding="masked"))
        with torch.no_grad():
            m.user_emb.copy_(Eu)
            m.item_emb.copy_(Ei)
        g = m.build_graphs(data, torch.device("cpu"))
        for requires_grad in (False, True):  # plain and fused (autograd) paths
            m.user_emb.requires_grad_(requires_grad)
            m.item_emb.requires_grad_(requires_grad)
            (h,) = m.propagate(g)
            torch.testing.assert_close(h.detach(), expected, atol=1e-5, rtol=1e-5)
        if encoder == "official":  # u0: [1, 0] + [1.2071, 0.2071] / sqrt(1.5)
            torch.testing.assert_close(expected[0], torch.tensor([1.9856, 0.1691]), atol=1e-4, rtol=0)


def test_encoder_matches_reference_with_padding_rows() -> None:
    data = small_data()
    for encoder in ("official", "lightgcn"):
        m, g = make(data, encoder=encoder)
        H = m.propagate(g)
        mats = []
        for b in BEHAVIORS:
            R = np.zeros((5, 5))
            R[:4, :4] = data.train[b].toarray()
            mats.append(R)
        ref = ref_propagate(m.user_emb.detach().double().numpy(), m.item_emb.detach().double().numpy(),
                            mats, 2, encoder == "official")
        for h, r in zip(H, ref):
            np.testing.assert_allclose(h.detach().numpy(), r, rtol=1e-5, atol=1e-5)
        # the padding user (row 4) and item (last row) are isolated: output = raw ego (official)
        if encoder == "official":
            torch.testing.assert_close(H[0][4], m.user_emb[4])
            torch.testing.assert_close(H[0][-1], m.item_emb[-1])


def test_fused_layer_gradient_equals_autograd_through_normalize() -> None:
    grads = []
    for fused in (True, False):
        m, g = make()
        m.fused_layers = fused
        m.loss(g, batch())["loss"].backward()
        grads.append((m.user_emb.grad, m.item_emb.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not RMBRec(small_data(), RMBRecConfig(orm="irm_v2_code")).fused_layers


def test_scipy_kernel_equals_torch_kernel() -> None:
    """cpu_kernel=scipy (SciPy + last layer on the batch rows only) == torch CSR on every row."""
    out = []
    for kernel in ("scipy", "torch"):
        m, g = make(cpu_kernel=kernel)
        assert all((x.csr is not None) == (kernel == "scipy") for x in g)
        terms = values(m.loss(g, batch()))
        m.loss(g, batch())["loss"].backward()
        with torch.no_grad():
            z = m(g)
        out.append((terms, m.user_emb.grad, m.item_emb.grad, z))
    (a, *ga), (b, *gb) = out
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    for x, y in zip(ga[:2], gb[:2]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga[2][0], gb[2][0])


# ----------------------------------------------------------------------------- loss pieces
def bpr_rows(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The official BPRLoss before its mean: per-row ``-log(1e-10 + sigmoid(pos - neg))``."""
    return bpr(pos, neg, form="log_eps", reduction="none")


def cross_view_nce(anchor: torch.Tensor, views: torch.Tensor, tau: float) -> torch.Tensor:
    """RRM as coded (unit rows), per auxiliary view."""
    return info_nce(anchor, views, tau, symmetric=True, normalize=False)


def intra_view_nce(anchor: torch.Tensor, views: torch.Tensor, tau: float) -> torch.Tensor:
    """RRM as in the paper (Eq. 3), per auxiliary view."""
    return info_nce(views, anchor, tau, negatives="query", normalize=False)


def test_bpr_row_values_by_hand() -> None:
    # padding row: equal scores -> -log(1e-10 + 1/2) = log 2, zero gradient through pos - neg
    assert float(bpr_rows(torch.tensor([0.3]), torch.tensor([0.3]))) == pytest.approx(math.log(2), abs=1e-6)
    assert float(bpr_rows(torch.tensor([2.0]), torch.tensor([0.0]))) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # IRMv1 gradient d/dw -log sigmoid(w x) at w = 1: -(1 - sigmoid(x)) x
    s2 = 1 / (1 + math.exp(-2))
    assert float(bpr_dw(torch.tensor(2.0), 1.0)) == pytest.approx(-(1 - s2) * 2, rel=1e-6)
    assert float(bpr_dw(torch.tensor(0.0), 1.0)) == 0.0
    w = torch.tensor(0.7, requires_grad=True)
    x = torch.tensor([1.5, -0.4])
    (g,) = torch.autograd.grad(bpr_rows(w * x, torch.zeros(2)).sum(), w)
    assert float(bpr_dw(x, 0.7).sum()) == pytest.approx(float(g), rel=1e-5)


def test_contrastive_forms_by_hand() -> None:
    e = torch.eye(2)
    # official: S = I / tau (tau = 1); each row CE = log(e + 1) - 1, both directions equal
    assert float(cross_view_nce(e, e.unsqueeze(0), 1.0)) == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)
    # paper: negatives from the auxiliary view (orthogonal, sim 0); positive = target view, here
    # orthogonal too (sim 0) -> every row is -log(1/2)
    anchor = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert float(intra_view_nce(anchor, e.unsqueeze(0), 1.0)) == pytest.approx(math.log(2), rel=1e-6)
    # paper form with the positive equal to the anchor row: log(e + 1) - 1 as well
    assert float(intra_view_nce(e, e.unsqueeze(0), 1.0)) == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)


# ----------------------------------------------------------------------------- full loss
@pytest.mark.parametrize("padding", ["faithful", "masked"])
@pytest.mark.parametrize("rrm", ["official", "paper"])
def test_every_term_matches_reference(padding: str, rrm: str) -> None:
    data = small_data()
    m, g = make(data, padding=padding, rrm=rrm, lambda_cl=0.8)
    got = values(m.loss(g, batch()))
    want = reference_terms(m, data, official_rrm=rrm == "official")
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-4, abs=1e-5), k


def test_faithful_padding_adds_log2_rows() -> None:
    """cart: 2 of 4 rows are padding -> L_cart(faithful) = (2 L_cart(masked) + 2 log 2) / 4."""
    data = small_data()
    mf, gf = make(data, padding="faithful")
    mm, gm = make(data, padding="masked")
    with torch.no_grad():  # same real rows in both models
        mm.user_emb.copy_(mf.user_emb[:4])
        mm.item_emb.copy_(mf.item_emb[:4])
    f, k = values(mf.loss(gf, batch())), values(mm.loss(gm, batch()))
    assert f["bpr_cart"] == pytest.approx((2 * k["bpr_cart"] + 2 * math.log(2)) / 4, rel=1e-5)
    assert f["bpr_buy"] == pytest.approx((3 * k["bpr_buy"] + math.log(2)) / 4, rel=1e-5)
    assert f["bpr_view"] == pytest.approx(k["bpr_view"], rel=1e-5)  # no padding under view
    assert f["main"] == pytest.approx((3 * k["main"] + math.log(2)) / 4, rel=1e-5)


def test_padding_rows_get_no_bpr_gradient() -> None:
    m, g = make(lambda_cl=0.0, reg=0.0, lambda_irm=0.0)  # main BPR only
    m.loss(g, batch())["loss"].backward()
    assert torch.all(m.user_emb.grad[4] == 0) and torch.all(m.item_emb.grad[-1] == 0)
    assert m.user_emb.grad[:4].abs().sum() > 0


@pytest.mark.parametrize("orm", ["rex", "irm_v1_code", "irm_v2_code", "irm_v1_paper", "irm_v2_paper"])
def test_orm_variants(orm: str) -> None:
    data = small_data()
    m, g = make(data, orm=orm)
    base, _ = make(data, orm="rex")
    got, ref = values(m.loss(g, batch())), values(base.loss(g, batch()))
    risks = np.array([ref[f"bpr_{b}"] for b in BEHAVIORS])
    if orm == "rex":
        want = risks.var(ddof=1)
    elif orm == "irm_v1_code":
        want = (risks**2).sum()
    elif orm in ("irm_v1_paper", "irm_v2_paper"):
        # sum_b (d/dw L_b(w * logits) at w = 1)^2, by autograd on a scalar w
        H = base.propagate(g)
        u, i, j, _ = base._index(batch())
        want = 0.0
        for k, h in enumerate(H):
            w = torch.ones((), requires_grad=True)
            x = (h[u[k]] * h[i[k]]).sum(-1) - (h[u[k]] * h[j[k]]).sum(-1)
            (gw,) = torch.autograd.grad(bpr_rows(w * x.detach(), torch.zeros_like(x)).mean(), w)
            want += float(gw) ** 2
    else:  # irm_v2_code: variance over behaviors of dL_b/dE_user, mean over entries
        grads = []
        for k in range(3):
            mk, gk = make(data, orm="rex")
            r = mk.loss(gk, batch())
            H = mk.propagate(gk)  # recompute the risk with a graph to differentiate
            u, i, j, _ = mk._index(batch())
            h = H[k]
            risk = bpr_rows((h[u[k]] * h[i[k]]).sum(-1), (h[u[k]] * h[j[k]]).sum(-1)).mean()
            assert float(risk.detach()) == pytest.approx(float(r[f"bpr_{BEHAVIORS[k]}"]), rel=1e-5)
            grads.append(torch.autograd.grad(risk, mk.user_emb)[0].flatten())
        want = float(torch.stack(grads).var(0).mean())
    assert got["orm"] == pytest.approx(want, rel=1e-4, abs=1e-9)
    # only the ORM term differs from the REx model
    for k in ("main", "reg", "rrm", "bpr_view", "bpr_cart", "bpr_buy"):
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k


def test_population_variance_option() -> None:
    m, g = make(rex_variance="population")
    got = values(m.loss(g, batch()))
    r = np.array([got[f"bpr_{b}"] for b in BEHAVIORS])
    assert got["orm"] == pytest.approx(r.var(ddof=0), rel=1e-5)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("orm", ["rex", "irm_v1_paper", "irm_v2_code"])
def test_every_parameter_learns(orm: str) -> None:
    m, g = make(orm=orm)
    m.loss(g, batch())["loss"].backward()
    names = {n for n, _ in m.named_parameters()}
    assert names == ({"user_emb", "item_emb", "irm_w"} if orm == "irm_v1_paper" else {"user_emb", "item_emb"})
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ----------------------------------------------------------------------------- ablations
def test_lambda_cl_zero_removes_rrm_only() -> None:
    full, g = make(lambda_cl=0.8)
    abl, _ = make(lambda_cl=0.0)
    a, b = values(full.loss(g, batch())), values(abl.loss(g, batch()))
    assert "rrm" not in b
    for k in ("main", "reg", "orm", "bpr_view", "bpr_cart", "bpr_buy"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert a["loss"] - b["loss"] == pytest.approx(0.8 * a["rrm"], rel=1e-5)


def test_lambda_irm_zero_removes_orm_only() -> None:
    full, g = make()
    abl, _ = make(lambda_irm=0.0)
    a, b = values(full.loss(g, batch())), values(abl.loss(g, batch()))
    assert "orm" not in b
    for k in ("main", "reg", "rrm", "bpr_view", "bpr_cart", "bpr_buy"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert a["loss"] - b["loss"] == pytest.approx(a["orm"], rel=1e-4)


def test_rrm_and_encoder_options_change_only_their_terms() -> None:
    off, g = make()
    pap, _ = make(rrm="paper")
    a, b = values(off.loss(g, batch())), values(pap.loss(g, batch()))
    assert a["rrm"] != pytest.approx(b["rrm"])
    for k in ("main", "reg", "orm"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    lg, g2 = make(encoder="lightgcn")
    c = values(lg.loss(g2, batch()))
    assert c["main"] != pytest.approx(a["main"])  # the encoder changes every embedding


def test_drop_behavior_equals_model_on_restricted_data() -> None:
    data = small_data()
    m, g = make(data, drop_behaviors=["cart"])
    assert m.behaviors == ("view", "buy") and len(g) == 2
    sub = data.select_behaviors(("view", "buy"))
    m2, g2 = make(sub)
    b = batch()
    b2 = {"triplets": b["triplets"][:, [0, 2]], "valid": b["valid"][:, [0, 2]]}
    a, c = values(m.loss(g, b2)), values(m2.loss(g2, b2))
    assert set(a) == set(c) and "bpr_cart" not in a
    for k in a:
        assert a[k] == pytest.approx(c[k], rel=1e-6), k
    # negatives are rejected against the union of the kept behaviors only
    s = m.make_sampler(data)
    assert s.exclude.keys.size == sub.train_union().nnz
    with pytest.raises(ConfigError):
        RMBRec(data, RMBRecConfig(drop_behaviors=["buy"]))


def test_bad_option_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="orm"):
        RMBRec(small_data(), RMBRecConfig(orm="irmv1"))


# ----------------------------------------------------------------------------- sampler, scoring
def test_sampler_one_triplet_per_user_and_behavior(tiny: MultiBehaviorData) -> None:
    m = RMBRec(tiny, RMBRecConfig(batch_size=5))
    s = m.make_sampler(tiny)
    batches = list(s.epoch(np.random.default_rng(0)))
    assert [len(b["triplets"]) for b in batches] == [5, 5, 2] and s.n_batches == 3
    trip = np.concatenate([b["triplets"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert sorted(trip[:, 0, 0]) == list(range(tiny.n_users))
    union = tiny.train_union().toarray()
    for k, b in enumerate(tiny.behaviors):
        R = tiny.train[b].toarray()
        u, i, j = trip[:, k].T
        assert np.all(R[u[valid[:, k]], i[valid[:, k]]] == 1)
        assert np.all(union[u[valid[:, k]], j[valid[:, k]]] == 0)


def test_score_shape_and_registration(tiny: MultiBehaviorData) -> None:
    assert get_model_class("rmbrec") is RMBRec
    m = RMBRec(tiny, RMBRecConfig())
    g = m.build_graphs(tiny, torch.device("cpu"))
    with torch.no_grad():
        emb = m(g)
        s = m.score(emb, torch.arange(4), "buy")
    assert s.shape == (4, tiny.n_items)  # the padding item is not a candidate
    assert emb[0].shape[0] == tiny.n_users + 1  # ... but the padding user row exists (faithful)
    assert m.scored_behaviors == ("buy",)
    assert RMBRec.train_defaults == {"lr": 1e-3, "weight_decay": 1e-3, "epochs": 200, "patience": 20, "min_epochs": 50}


@pytest.mark.realdata
def test_beibei_batch_fast_path_equals_torch_path(shared_datasets) -> None:  # type: ignore[no-untyped-def]
    """On the real graphs: every user has every behavior (no padding rows on Beibei), and the
    CPU fast path (row-restricted last layer, SciPy) gives the torch path's loss terms
    (view dropped to keep the test short)."""
    from mbrec.data.registry import load_dataset
    from mbrec.models.rmbrec import BehaviorGraph

    data = load_dataset(shared_datasets / "crgcn-beibei")
    torch.manual_seed(0)
    m = RMBRec(data, RMBRecConfig(lambda_cl=0.8, batch_size=256, drop_behaviors=["view"]))
    g = m.build_graphs(data, torch.device("cpu"))
    raw = next(m.make_sampler(data).epoch(np.random.default_rng(0)))
    assert raw["valid"].all()
    b = {k: torch.as_tensor(v) for k, v in raw.items()}
    with torch.no_grad():
        fast = values(m.loss(g, b))
        slow = values(m.loss([BehaviorGraph(x.sparse, None) for x in g], b))
    for k in fast:
        assert fast[k] == pytest.approx(slow[k], rel=1e-5), k
