"""Each model's scorer, as arrays (export) and as torch code that needs only those arrays (serve).

Three kinds cover every built-in model (docs/serving.md has the table):

* ``dot``: ``score(u, i) = user[u] . item[i]``. LightGCN (the behavior's table), RMBRec (the
  fused ``z``), MB-CGCN (summed blocks), CRGCN (behavior ``b``'s stage), BiGEL (behavior ``b``'s
  final embeddings), and COPF's ``bilinear``/``shared`` heads (the user side carries
  ``tower_scale * e_u * h_k``, computed exactly as the model computes it).
* ``gated``: the gated mixture of experts of COPF's DFME and PKEF's PME heads
  (:class:`mbrec.models._experts.GatedTower`): per user the gate input ``e_u`` and the ``M``
  expert factors ``a_m(u)``; per item ``e_v`` and ``b_m(v)``; the gate ``W_u``, ``W_v``, ``b``
  and the tower scale. Serving evaluates ``GatedTower.full`` with the same operations (two
  GEMMs per request batch).
* ``dense``: the fallback for a model without an extractor: the full ``[users, items]`` score
  matrix, written only when it fits ``max_dense_mb``.

A model outside mbrec may define ``export_scorer(emb, behavior) -> ScorerSpec`` to export
itself; otherwise :data:`EXTRACTORS` (by registered name) or the dense fallback applies.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from mbrec.errors import MbrecError
from mbrec.models.base import Model
from mbrec.serving.artifact import ScorerSpec

# ----------------------------------------------------------------------------- extraction


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def dot_spec(user: torch.Tensor, item: torch.Tensor) -> ScorerSpec:
    return ScorerSpec("dot", {"user": _np(user), "item": _np(item)})


def gated_spec(head: Any, task: int, eu: torch.Tensor, ev: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor]]) -> ScorerSpec:
    """The arrays ``GatedTower.full(task, eu, ev, experts)`` reads, for all users and items."""
    w, b = head._wb(task)
    d = head.dim
    return ScorerSpec("gated", {
        "gate_user": _np(eu), "gate_item": _np(ev),
        "gate_w_user": _np(w[:d]), "gate_w_item": _np(w[d:]), "gate_b": _np(b),
        "expert_user": _np(torch.stack([a for a, _ in experts], 1)),  # [U, M, d]
        "expert_item": _np(torch.stack([bb for _, bb in experts], 1)),  # [I, M, d]
    }, {"scale": float(head.tower_scale)})


def _lightgcn(model: Any, emb: torch.Tensor, behavior: str) -> ScorerSpec:
    table = emb[model.behaviors.index(behavior) if model.n_tables > 1 else 0]
    return dot_spec(table[: model.n_users], table[model.n_users :])


def _rmbrec(model: Any, emb: tuple[torch.Tensor, torch.Tensor], behavior: str) -> ScorerSpec:
    zu, zi = emb
    return dot_spec(zu[: model.n_users], zi[: model.n_items])


def _bigel(model: Any, emb: dict[str, tuple[torch.Tensor, torch.Tensor]], behavior: str) -> ScorerSpec:
    u, i = emb[behavior]
    return dot_spec(u, i)


def _crgcn(model: Any, emb: dict[str, torch.Tensor], behavior: str) -> ScorerSpec:
    e = emb[behavior]
    return dot_spec(e[: model.n_users], e[model.n_users :])


def _mbcgcn(model: Any, emb: dict[str, torch.Tensor], behavior: str) -> ScorerSpec:
    return dot_spec(emb["user"], emb["item"])


def _copf(model: Any, emb: dict[str, Any], behavior: str) -> ScorerSpec:
    k, U = model.behaviors.index(behavior), model.n_users
    if model.spec["head"] != "dfme":
        e = emb["e"][-1 if model.spec["head"] == "shared" else k]
        return dot_spec(model.head.tower_scale * (e[:U] * model.bilinear[k]), e[U:])
    e = emb["e"][k]
    ex = model._experts(emb, k, train=False)
    return gated_spec(model.head, k, e[:U], e[U:], [(x[:U], x[U:]) for x in ex])


def _pkef(model: Any, emb: dict[str, list[torch.Tensor]], behavior: str) -> ScorerSpec:
    k, U = model.behaviors.index(behavior), model.n_users
    exu, _ = model.projection_experts(emb["c"], k, slice(0, U))
    exi, _ = model.projection_experts(emb["c"], k, slice(U, None))
    return gated_spec(model.head, k, exu[0], exi[0], list(zip(exu, exi)))


#: registered model name -> extractor ``(model, emb, behavior) -> ScorerSpec``
EXTRACTORS: dict[str, Callable[[Any, Any, str], ScorerSpec]] = {
    "lightgcn": _lightgcn, "rmbrec": _rmbrec, "bigel": _bigel, "crgcn": _crgcn,
    "mbcgcn": _mbcgcn, "copf": _copf, "pkef": _pkef,
}


def dense_spec(model: Model, emb: Any, behavior: str, *, max_dense_mb: float, chunk: int = 1024) -> ScorerSpec:
    """The fallback: every user's scores, refused when the matrix exceeds ``max_dense_mb``."""
    mb = model.n_users * model.n_items * 4 / 2**20
    if mb > max_dense_mb:
        raise MbrecError(f"model {model.name!r} has no serving extractor, and its dense score matrix "
                         f"({model.n_users:,} x {model.n_items:,} = {mb:,.0f} MiB) exceeds --max-dense-mb "
                         f"{max_dense_mb:,.0f}; raise the limit or give the model an export_scorer method "
                         "(docs/serving.md)")
    device = next(model.parameters()).device
    rows = [model.score(emb, torch.arange(s, min(s + chunk, model.n_users), device=device), behavior).float()
            for s in range(0, model.n_users, chunk)]
    return ScorerSpec("dense", {"scores": _np(torch.cat(rows))})


def extract_scorer(model: Model, emb: Any, behavior: str, *, max_dense_mb: float = 1024.0) -> ScorerSpec:
    """The arrays ``model.score(emb, ., behavior)`` needs: the model's own ``export_scorer``,
    else its entry in :data:`EXTRACTORS`, else the dense fallback."""
    own = getattr(model, "export_scorer", None)
    if callable(own):
        spec = own(emb, behavior)
        if not isinstance(spec, ScorerSpec):
            raise MbrecError(f"{type(model).__name__}.export_scorer returned {type(spec).__name__}, not a ScorerSpec")
        return spec
    if model.name in EXTRACTORS:
        return EXTRACTORS[model.name](model, emb, behavior)
    return dense_spec(model, emb, behavior, max_dense_mb=max_dense_mb)


# ----------------------------------------------------------------------------- serving


class Scorer:
    """Scores ``[len(users), n_items]`` from an artifact's arrays (torch, no model)."""

    #: item vectors for item-to-item similarity (``GET /v1/similar``)
    item_vectors: torch.Tensor

    def score(self, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DotScorer(Scorer):
    """``user[users] @ item.T``, the operation the dot-product models run. The product is
    numpy's (OpenBLAS): on AMD CPUs torch's MKL GEMM runs this shape about 3x slower
    (benchmarks/serve.md); the scores agree with torch's to float rounding."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.user, self.item = spec.arrays["user"], spec.arrays["item"]
        self.item_t = self.item.T  # a transposed view: GEMM with trans_b, as torch's ``@ item.T``
        self.item_vectors = torch.from_numpy(self.item)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.user[users.numpy()] @ self.item_t)


class GatedScorer(Scorer):
    """:meth:`mbrec.models._experts.GatedTower.full` with the item side computed once."""

    def __init__(self, spec: ScorerSpec) -> None:
        a = {k: torch.from_numpy(v) for k, v in spec.arrays.items()}
        self.eu, self.wu = a["gate_user"], a["gate_w_user"]
        self.experts_user = a["expert_user"]  # [U, M, d]
        self.scale = float(spec.params["scale"])
        self.y = a["gate_item"] @ a["gate_w_item"] + a["gate_b"]  # [I, M]
        self.ey = torch.exp(self.y - self.y.max(1, keepdim=True).values)
        ei = a["expert_item"]  # [I, M, d]
        self.items_cat = (ei * self.ey[:, :, None]).reshape(ei.shape[0], -1)  # cat_m(b_m * ey_m)
        self.experts_item = ei
        self.item_vectors = a["gate_item"]

    def score(self, users: torch.Tensor) -> torch.Tensor:
        x = self.eu[users] @ self.wu  # [n, M]
        ex = torch.exp(x - x.max(1, keepdim=True).values)
        eu = self.experts_user[users]  # [n, M, d]
        num = (eu * ex[:, :, None]).reshape(len(users), -1) @ self.items_cat.T
        den = ex @ self.ey.T
        out = self.scale * num / den
        bad = ~torch.isfinite(out).all(1) | (den <= 0).any(1)
        if bool(bad.any()):  # the broadcast softmax, as GatedTower.full falls back to
            rows = torch.nonzero(bad).ravel()
            g = torch.softmax(x[rows, None, :] + self.y[None, :, :], dim=-1)
            inner = torch.einsum("nmd,imd->nim", eu[rows], self.experts_item)
            out[rows] = self.scale * (g * inner).sum(-1)
        return out


class DenseScorer(Scorer):
    """Rows of the exported score matrix; item vectors are its columns."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.scores = torch.from_numpy(spec.arrays["scores"])
        self.item_vectors = self.scores.T

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores[users]


_RUNTIME: dict[str, type[Scorer]] = {"dot": DotScorer, "gated": GatedScorer, "dense": DenseScorer}


def build_scorer(spec: ScorerSpec) -> Scorer:
    """The torch scorer of an exported spec."""
    return _RUNTIME[spec.kind](spec)


def check_reproduces(model: Model, emb: Any, behavior: str, spec: ScorerSpec, n_check: int = 256) -> None:
    """Refuse an export whose scorer does not give ``model.score``'s values (a model whose
    scoring changed without its extractor), on up to ``n_check`` users spread over all."""
    users = np.unique(np.linspace(0, model.n_users - 1, min(n_check, model.n_users)).round().astype(np.int64))
    device = next(model.parameters()).device
    want = model.score(emb, torch.from_numpy(users).to(device), behavior).float().cpu()
    got = build_scorer(spec).score(torch.from_numpy(users))
    tol = 1e-4 * max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if not math.isfinite(err) or err > tol:
        raise MbrecError(f"the exported {spec.kind!r} scorer of {model.name!r} for {behavior!r} does not reproduce the "
                         f"model's scores (largest difference {err:.3g}, allowed {tol:.3g}); its extractor in "
                         "mbrec.serving.scorers no longer matches the model")
