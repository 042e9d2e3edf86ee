"""RMBRec's adaptive alignment (issue 23): BAR weights, learned weights, automatic drops.

Hand-made data with known training BARs: ``never`` shares no pair with the target (BAR 0),
``half`` covers two of the four target pairs (BAR 0.5), ``perfect`` covers all of them (BAR 1).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.cli.main import main
from mbrec.config import build_config
from mbrec.data.container import MultiBehaviorData
from mbrec.data.stats import training_bar
from mbrec.errors import ConfigError
from mbrec.losses import info_nce
from mbrec.models.alignment import bar_weights, below_threshold, learned_weights, weight_entropy_penalty
from mbrec.models.rmbrec import RMBRec, RMBRecConfig
from mbrec.optim import adam
from mbrec.train import to_tensors, train
from conftest import tiny_data

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- data and helpers
def _csr(pairs: list[tuple[int, int]], shape: tuple[int, int] = (4, 6)) -> sp.csr_matrix:
    rows, cols = zip(*pairs) if pairs else ((), ())
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)


def aligned_data() -> MultiBehaviorData:
    """4 users x 6 items; target ``buy`` has 4 training pairs (plus held-out pairs that overlap
    ``never``, which must not count: BAR reads training pairs only)."""
    buy = [(0, 0), (0, 1), (1, 2), (2, 3)]
    return MultiBehaviorData(
        name="aligned",
        behaviors=("never", "half", "perfect", "buy"),
        train={
            "never": _csr([(0, 5), (1, 0), (2, 1), (3, 2), (3, 4)]),       # no target pair
            "half": _csr([(0, 0), (1, 2), (2, 5), (3, 1)]),                 # 2 of 4 target pairs
            "perfect": _csr(buy + [(0, 4), (3, 5), (3, 0)]),                # every target pair
            "buy": _csr(buy),
        },
        valid={"buy": _csr([(1, 0)])},
        test={"buy": _csr([(3, 2)])},
        user_ids=np.arange(4),
        item_ids=np.arange(6),
    )


def model(data: MultiBehaviorData, seed: int = 0, **kw: object) -> RMBRec:
    """An RMBRec with deterministic tables (independent of torch's global generator)."""
    kw = {"batch_size": 64, **kw}
    m = RMBRec(data, RMBRecConfig(embedding_dim=4, n_layers=2, **kw))  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        m.user_emb.copy_(torch.from_numpy(rng.normal(0, 0.5, m.user_emb.shape)))
        m.item_emb.copy_(torch.from_numpy(rng.normal(0, 0.5, m.item_emb.shape)))
    return m


def batches(m: RMBRec, data: MultiBehaviorData, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` training batches from the model's own sampler (several epochs if needed)."""
    rng, sampler, out = np.random.default_rng(seed), m.make_sampler(data), []
    while len(out) < n:
        out += [to_tensors(b, CPU) for b in sampler.epoch(rng)]
    return out[:n]


def per_view_rrm(m: RMBRec, data: MultiBehaviorData, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Official RRM of each auxiliary view of ``m`` (unweighted), from scratch: the batch's
    target users (a user without a target row is the padding user, as in the code)."""
    trip, valid = torch.as_tensor(batch["triplets"]), torch.as_tensor(batch["valid"]).bool()
    u = torch.unique(torch.where(valid[:, -1], trip[:, -1, 0], m.n_users))
    with torch.no_grad():
        H = m.propagate(m.build_graphs(data, CPU))
        P = torch.nn.functional.normalize(torch.stack([h[u] for h in H]), dim=-1)
        return info_nce(P[-1], P[:-1], m.cfg.tau, symmetric=True, normalize=False)


def weights(m: RMBRec) -> dict[str, float]:
    w = m.align_weights()
    return {b: (1.0 if w is None else float(w[k].detach())) for k, b in enumerate(m.aligned)}


# ----------------------------------------------------------------------------- BAR and its weights
def test_training_bar_reads_training_pairs_only():
    assert training_bar(aligned_data()) == {"never": 0.0, "half": 0.5, "perfect": 1.0}
    assert training_bar(aligned_data(), ["half"]) == {"half": 0.5}


def test_bar_weight_formula_by_hand():
    bar = {"a": 0.0, "b": 0.2, "c": 0.6, "d": 1.0}
    assert bar_weights(bar) == bar  # defaults: w = BAR
    # floor 0.2, min 0.1: x = clip((BAR - 0.2) / 0.8) = 0, 0, 0.5, 1; w = 0.1 (1 - x) + x
    assert bar_weights(bar, floor=0.2, min_weight=0.1) == pytest.approx({"a": 0.1, "b": 0.1, "c": 0.55, "d": 1.0})
    w = bar_weights(bar, floor=0.2, min_weight=0.1)
    assert w["a"] == 0.1 and w["d"] == 1.0  # exact at both ends
    with pytest.raises(ConfigError, match="align_floor"):
        bar_weights(bar, floor=1.0)
    with pytest.raises(ConfigError, match="BAR"):
        bar_weights({"a": 1.5})
    assert below_threshold(bar, 0.6) == ["a", "b"]


def test_never_cooccurring_gets_min_weight_and_perfect_gets_max():
    m = model(aligned_data(), align="bar", align_min_weight=0.1)
    assert m.align_bar == {"never": 0.0, "half": 0.5, "perfect": 1.0}
    got = weights(m)
    assert got["never"] == pytest.approx(0.1) and got["perfect"] == 1.0
    assert got["half"] == pytest.approx(0.55)
    assert got["never"] == min(got.values()) and got["perfect"] == max(got.values())


def test_bar_weights_enter_rrm_per_view():
    data = aligned_data()
    mu, mb = model(data), model(data, align="bar", align_min_weight=0.1)
    batch = batches(mu, data, 1)[0]
    tu, tb = mu.loss(mu.build_graphs(data, CPU), batch), mb.loss(mb.build_graphs(data, CPU), batch)
    # the same views, weighted: rrm = sum_b w_b L_b; everything else as RMBRec
    per_view = per_view_rrm(mu, data, batch)
    assert float(tu["rrm"].detach()) == pytest.approx(float(per_view.sum()), rel=1e-5)
    assert float(tb["rrm"].detach()) == pytest.approx(float((torch.tensor([0.1, 0.55, 1.0]) * per_view).sum()), rel=1e-5)
    for k in ("main", "reg", "orm"):
        assert torch.equal(tu[k], tb[k])
    assert float(tb["align_never"]) == pytest.approx(0.1) and float(tb["align_perfect"]) == 1.0


# ----------------------------------------------------------------------------- automatic drop
def test_drop_below_threshold_removes_the_behavior():
    data = aligned_data()
    m = model(data, align_drop_below=0.3)
    assert m.behaviors == ("half", "perfect", "buy") and m.aligned == ("half", "perfect")
    assert m.align_dropped == {"never": 0.0}
    assert len(m.build_graphs(data, CPU)) == 3
    b = batches(m, data, 1)[0]
    assert b["triplets"].shape[1] == 3  # no triplets for the dropped behavior
    # exactly the drop_behaviors ablation
    ref = model(data, drop_behaviors=["never"])
    assert torch.equal(m.loss(m.build_graphs(data, CPU), b)["loss"], ref.loss(ref.build_graphs(data, CPU), b)["loss"])
    # a threshold above every BAR but the perfect one leaves only that behavior
    assert model(data, align_drop_below=0.9).behaviors == ("perfect", "buy")


def test_drop_scope_rrm_keeps_the_encoder_and_removes_its_term():
    data = aligned_data()
    m = model(data, align_drop_below=0.3, align_drop_scope="rrm")
    assert m.behaviors == data.behaviors and m.aligned == ("half", "perfect")
    batch = batches(m, data, 1)[0]
    t = m.loss(m.build_graphs(data, CPU), batch)
    per_view = per_view_rrm(m, data, batch)
    assert float(t["rrm"].detach()) == pytest.approx(float(per_view[1:].sum()), rel=1e-5)
    assert "bpr_never" in t  # still encoded, fused and in ORM


def test_drop_threshold_zero_drops_nothing_and_target_is_never_dropped():
    data = aligned_data()
    assert model(data, align_drop_below=0.0).behaviors == data.behaviors
    m = model(data, align_drop_below=1.0)  # only perfect (BAR 1) survives; the target always does
    assert m.behaviors == ("perfect", "buy")


# ----------------------------------------------------------------------------- uniform = RMBRec
@pytest.mark.parametrize("rrm", ["official", "paper"])
def test_equal_weights_reproduce_rmbrec_exactly(rrm):
    """Every auxiliary behavior of the tiny data covers every target pair (BAR 1), so ``bar``
    gives weight 1 to each; losses and gradients equal RMBRec's bit for bit over several steps."""
    data = tiny_data()
    assert training_bar(data) == {"view": 1.0, "cart": 1.0}
    ref, var = model(data, rrm=rrm, batch_size=5), model(data, rrm=rrm, batch_size=5, align="bar")
    assert weights(var) == {"view": 1.0, "cart": 1.0}
    g_ref, g_var = ref.build_graphs(data, CPU), var.build_graphs(data, CPU)
    o_ref, o_var = adam(ref.parameters(), 1e-2, 1e-3), adam(var.parameters(), 1e-2, 1e-3)
    for batch in batches(ref, data, 4):
        t_ref, t_var = ref.loss(g_ref, batch), var.loss(g_var, batch)
        for k, v in t_ref.items():
            assert torch.equal(v, t_var[k]), k
        for o, t in ((o_ref, t_ref), (o_var, t_var)):
            o.zero_grad()
            t["loss"].backward()
        for (n, p), q in zip(ref.named_parameters(), var.parameters()):
            assert torch.equal(p.grad, q.grad), n
        o_ref.step()
        o_var.step()
    assert torch.equal(ref.user_emb, var.user_emb) and torch.equal(ref.item_emb, var.item_emb)


def test_learned_weights_start_as_rmbrec():
    data = tiny_data()
    ref, var = model(data, batch_size=5), model(data, batch_size=5, align="learned")
    batch = batches(ref, data, 1)[0]
    t_ref, t_var = ref.loss(ref.build_graphs(data, CPU), batch), var.loss(var.build_graphs(data, CPU), batch)
    assert float(t_var["align_reg"].detach()) == 0.0
    for k, v in t_ref.items():
        assert torch.equal(v, t_var[k]), k
    t_ref["loss"].backward()
    t_var["loss"].backward()
    assert torch.equal(ref.user_emb.grad, var.user_emb.grad)


# ----------------------------------------------------------------------------- learned weights
def _fit(losses: list[float], temperature: float, steps: int = 600) -> torch.Tensor:
    """Minimise sum_b w_b L_b + temperature * sum_b w_b log w_b over the logits (fixed L)."""
    theta = torch.nn.Parameter(torch.zeros(len(losses)))
    opt = torch.optim.Adam([theta], lr=0.05)
    L = torch.tensor(losses)
    for _ in range(steps):
        w = learned_weights(theta)
        obj = (w * L).sum() + temperature * weight_entropy_penalty(w)
        opt.zero_grad()
        obj.backward()
        opt.step()
    return learned_weights(theta).detach()


def test_learned_weights_reach_the_documented_optimum_and_do_not_collapse():
    w = _fit([1.0, 3.0], temperature=1.0)
    expected = 2 * torch.softmax(-torch.tensor([1.0, 3.0]), 0)  # n softmax(-L / temperature)
    assert torch.allclose(w, expected, atol=1e-3)
    assert float(w.min()) > 0.2 and float(w.mean()) == pytest.approx(1.0)
    collapsed = _fit([1.0, 3.0], temperature=0.0)  # without the regulariser: all on one behavior
    assert float(collapsed.min()) < 0.02


def test_weight_entropy_penalty_by_hand():
    assert float(weight_entropy_penalty(torch.ones(3))) == 0.0
    w = torch.tensor([1.5, 0.5])
    assert float(weight_entropy_penalty(w)) == pytest.approx(1.5 * math.log(1.5) + 0.5 * math.log(0.5))
    assert float(weight_entropy_penalty(torch.tensor([2.0, 0.0]))) == pytest.approx(2 * math.log(2))


def _train_learned(temperature: float, steps: int = 40) -> list[dict[str, float]]:
    """The weights after each of ``steps`` Adam steps (logits move ~1 per step: lr 1e-2 x 100)."""
    data = aligned_data()
    m = model(data, align="learned", align_lr_mult=100.0, align_temperature=temperature)
    g = m.build_graphs(data, CPU)
    opt = adam(m.parameters(), 1e-2, 1e-3)
    seen = []
    for batch in batches(m, data, steps):
        opt.zero_grad()
        m.loss(g, batch)["loss"].backward()
        opt.step()
        seen.append(weights(m))
    return seen


def test_learned_weights_move_in_training_and_stay_away_from_collapse():
    seen = _train_learned(temperature=1.0)
    assert max(abs(v - 1.0) for w in seen for v in w.values()) > 0.5  # they move
    assert min(seen[0], key=seen[0].__getitem__) == "never"  # first away from the unaligned behavior
    assert all(sum(w.values()) == pytest.approx(3.0, abs=1e-5) for w in seen)  # mean 1 by construction
    assert min(seen[-1].values()) > 0.5  # the regulariser pulls them back as the RRM terms even out
    # without the regulariser the same run collapses onto one behavior
    collapsed = _train_learned(temperature=0.0)[-1]
    assert min(collapsed.values()) < 1e-3 and max(collapsed.values()) > 2.9


# ----------------------------------------------------------------------------- trainer: logs, resume, help
def _cfg(*extra: str):
    return build_config("rmbrec", "tiny", overrides=[
        "model_args.batch_size=5", "model_args.embedding_dim=8", "model_args.n_layers=1",
        "train.patience=50", "train.min_epochs=0", "protocol.ks=[5,10]", *extra])


def test_weights_logged_at_start_and_per_epoch(tmp_path):
    m = train(_cfg("train.epochs=2", "model_args.align=bar"), tmp_path / "bar", data=tiny_data(), quiet=True)
    log = (tmp_path / "bar" / "train.log").read_text()
    assert "alignment (bar, floor 0, min weight 0): view BAR 1.0000 weight 1.0000; cart BAR 1.0000 weight 1.0000" in log
    assert all(h["align_view"] == 1.0 for h in m["history"])
    m = train(_cfg("train.epochs=2", "model_args.align=learned", "model_args.align_lr_mult=100"),
              tmp_path / "learned", data=tiny_data(), quiet=True)
    assert "alignment (learned" in (tmp_path / "learned" / "train.log").read_text()
    seen = [(h["align_view"], h["align_cart"]) for h in m["history"]]
    assert seen[0] != seen[1] and all(a + b == pytest.approx(2.0) for a, b in seen)


def test_resume_with_learned_weights_equals_an_uninterrupted_run(tmp_path):
    over = ("model_args.align=learned", "model_args.align_lr_mult=100")
    full = train(_cfg("train.epochs=3", *over), tmp_path / "full", data=tiny_data(), quiet=True)
    train(_cfg("train.epochs=1", *over), tmp_path / "cut", data=tiny_data(), quiet=True)
    resumed = train(_cfg("train.epochs=3", *over), tmp_path / "cut", data=tiny_data(), resume=True, quiet=True)
    keys = ("loss", "rrm", "align_reg", "align_view", "align_cart")
    assert [[h[k] for k in keys] for h in resumed["history"]] == [[h[k] for k in keys] for h in full["history"]]
    assert resumed["test"] == full["test"]
    ck = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert ck["model"]["align_logits"].shape == (2,)
    assert "align_fixed" not in ck["model"] and "_aligned_idx" not in ck["model"]
    assert any(s.get("exp_avg") is not None and s["exp_avg"].shape == (2,) for s in ck["optimizer"]["state"].values())


def test_options_named_in_models_help_and_checked(capsys):
    assert main(["models", "rmbrec"]) == 0
    out = capsys.readouterr().out
    for name in ("align ", "align_floor", "align_min_weight", "align_temperature", "align_lr_mult",
                 "align_drop_below", "align_drop_scope"):
        assert name in out, name
    with pytest.raises(ConfigError, match="align"):
        _cfg("model_args.align=sometimes")
    with pytest.raises(ConfigError, match="align_drop_below"):
        _cfg("model_args.align_drop_below=1.5")


def test_uniform_default_log_shows_bars(tmp_path):
    train(_cfg("train.epochs=1"), tmp_path / "u", data=tiny_data(), quiet=True)
    log = (tmp_path / "u" / "train.log").read_text()
    assert "alignment (uniform, weight 1 each): view BAR 1.0000 weight 1.0000" in log
    saved = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert not any(k.startswith("align_") for k in saved["history"][0])
