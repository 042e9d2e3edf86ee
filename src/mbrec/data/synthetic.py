"""Built-in synthetic multi-behavior data, generated deterministically from a seed.

Behavior model (all draws from ``numpy.random.default_rng(seed)``):

1. **Preferences.** Users ``P ~ N(0, I/dim)``, items ``Q ~ N(0, I/dim)``; affinity
   ``a(u, i) = <P_u, Q_i>``, standardised to zero mean / unit variance. Items get a popularity
   bias ``-popularity * log(1 + rank)`` (a random rank). The choice score is
   ``preference_strength * a + bias``.
2. **Views.** User ``u`` views ``n_u = max(min_target + 2, Poisson(views_per_user))`` items
   (capped at half the items), drawn without replacement with probability ∝ ``exp(score)``
   (Gumbel top-k over all items; with ``candidates = C > 0``, over ``C`` items per user drawn
   with probability ∝ ``exp(bias)``, re-ranked by Gumbel top-k of the affinity term: an
   approximation whose cost is linear in users instead of users x items). A share ``view_noise`` of each user's views is replaced by items drawn
   uniformly at random: **auxiliary noise** unrelated to preference.
3. **Funnel.** Each view becomes a cart with probability ``sigmoid(logit(p_cart) +
   funnel_effect * a)``; each cart becomes a buy with ``sigmoid(logit(p_buy_cart) +
   funnel_effect * a)``; a viewed but not carted item is bought with ``sigmoid(logit(p_buy_view)
   + funnel_effect * a)`` (so BAR(cart) < BAR(view)).
4. **Direct buys.** Each user also buys ``Poisson(direct_buy / (1 - direct_buy) * m_u)`` items
   they never viewed (``m_u`` = their funnel buys, at least 1), the next items of the same
   preference-ordered draw: purchases with no auxiliary behavior. ``direct_buy`` sets DT
   (approximately) and, with ``p_buy_view``, the BAR values.
5. **Minimum.** Users with fewer than ``min_target`` buys get their highest-affinity viewed items
   promoted to cart + buy.
6. **Held-out.** For **every** behavior, each user with >= 3 pairs gives one random pair to
   ``test`` and one to ``valid`` (leave-one-out). As in the real benchmarks, a held-out buy keeps
   its view/cart edges in the auxiliary training graphs.

Auxiliary behaviors are denser than buys and driven by the same preferences, so they carry signal
about held-out buys that a buy-only model lacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData, pairs_to_csr
from mbrec.data.io import check_options
from mbrec.data.split import leave_one_out, rank_from_end
from mbrec.errors import DataError

BEHAVIORS = ("view", "cart", "buy")
CHUNK = 2048  # users per generation chunk (bounds memory; part of the generator's definition)
PAIR_CHUNK = 1 << 20  # view pairs per affinity chunk (bounds memory; does not change the data)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic behavior model (see the module docstring)."""

    n_users: int = 500  #: number of users
    n_items: int = 400  #: number of items
    dim: int = 8  #: latent preference dimension
    preference_strength: float = 2.0  #: weight of affinity vs popularity in choices
    popularity: float = 0.5  #: exponent of the popularity bias (0 = none)
    views_per_user: float = 30.0  #: mean views per user (Poisson)
    view_noise: float = 0.2  #: share of views drawn uniformly at random (auxiliary noise)
    p_cart: float = 0.3  #: P(cart | view) at average affinity
    p_buy_cart: float = 0.35  #: P(buy | cart) at average affinity
    p_buy_view: float = 0.02  #: P(buy | view, no cart) at average affinity
    funnel_effect: float = 1.0  #: affinity's effect on the funnel logits (per std)
    direct_buy: float = 0.1  #: target share of buys with no auxiliary behavior (about DT)
    min_target: int = 3  #: minimum buys per user (before held-out splitting)
    #: 0: views drawn over all items (exact; time users x items); C > 0: over C popularity-drawn
    #: candidates per user (approximate; time linear in users, for large scales)
    candidates: int = 0

    def validate(self) -> None:
        if self.n_users < 2 or self.n_items < 2 * (self.min_target + 2):
            raise DataError("synthetic: too few users or items", value=(self.n_users, self.n_items))
        for k in ("view_noise", "p_cart", "p_buy_cart", "p_buy_view"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise DataError(f"synthetic: {k} must be in [0, 1]", value=v)
        if not 0.0 <= self.direct_buy < 1.0:
            raise DataError("synthetic: direct_buy must be in [0, 1)", value=self.direct_buy)
        if self.candidates and self.candidates < 2 * (self.min_target + 2):
            raise DataError(f"synthetic: candidates must be 0 or at least {2 * (self.min_target + 2)}",
                            value=self.candidates)


BUILTINS: dict[str, SyntheticConfig] = {
    "synthetic": SyntheticConfig(),
    "synthetic-large": SyntheticConfig(n_users=20000, n_items=8000, dim=16, views_per_user=40.0),
}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate(config: SyntheticConfig, seed: int = 0, name: str = "synthetic") -> MultiBehaviorData:
    """The dataset of ``config`` and ``seed`` (identical for identical inputs).

    The stages below draw from one generator in a fixed order; that order is part of the
    dataset's definition (changing it changes every synthetic number in the project)."""
    c = config
    c.validate()
    rng = np.random.default_rng(seed)
    lat = _Latent.draw(c, rng)
    views, later = _views(c, rng, lat)
    vu, vi, va, cart, buy = _funnel(c, rng, lat, views)
    du, di = _direct_buys(c, rng, vu, buy, later)
    promote = _minimum_buys(c, rng, vu, va, buy, du)
    cart |= promote
    buy |= promote
    train = {
        "view": (vu, vi),
        "cart": (vu[cart], vi[cart]),
        "buy": (np.r_[vu[buy], du], np.r_[vi[buy], di]),
    }
    tr, va_, te = _hold_out(train, rng, c.n_users, c.n_items)
    params = ", ".join(f"{k}={v}" for k, v in asdict(c).items() if k != "candidates" or v)
    desc = (
        f"Synthetic view->cart->buy funnel (mbrec.data.synthetic), seed {seed}: {params}. "
        "Leave-one-out valid/test (random) for every behavior, users with >= 3 pairs."
    )
    return MultiBehaviorData(
        name=name, behaviors=BEHAVIORS, train=tr, valid=va_, test=te,
        user_ids=np.char.add("u", np.arange(c.n_users).astype(str)),
        item_ids=np.char.add("i", np.arange(c.n_items).astype(str)),
        description=desc, source=f"builtin:{name}",
    )


@dataclass
class _Latent:
    """Stage 1: preferences ``P``, ``Q``, the affinity scale and the item popularity bias."""

    P: np.ndarray
    Q: np.ndarray
    scale: float
    bias: np.ndarray

    @classmethod
    def draw(cls, c: SyntheticConfig, rng: np.random.Generator) -> "_Latent":
        P = rng.normal(0.0, 1.0 / np.sqrt(c.dim), (c.n_users, c.dim))
        Q = rng.normal(0.0, 1.0 / np.sqrt(c.dim), (c.n_items, c.dim))
        scale = float(np.sqrt((P**2).sum(1).mean() * (Q**2).sum(1).mean() / c.dim)) or 1.0
        bias = -c.popularity * np.log1p(rng.permutation(c.n_items).astype(np.float64))
        return cls(P, Q, scale, bias)


def _direct_prefix(c: SyntheticConfig) -> int:
    """How many preference-ordered items past the views to keep for direct buys (generous: the
    direct-buy count needs the funnel's output)."""
    return max(8, int(4 * c.direct_buy / max(1e-9, 1 - c.direct_buy) * c.views_per_user
                      * c.p_cart * c.p_buy_cart + 8))


def _views(c: SyntheticConfig, rng: np.random.Generator, lat: _Latent) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """Stage 2: ``((view users, view items), (users, items, rank) of the preference-ordered items
    after each user's views)``, the latter the candidates for direct buys."""
    nu = c.n_users
    n_view = np.clip(rng.poisson(c.views_per_user, nu), c.min_target + 2, c.n_items // 2)
    n_noise = rng.binomial(n_view, c.view_noise)
    n_pref = n_view - n_noise
    kmax = int(min(c.n_items - 1, n_pref.max() + _direct_prefix(c)))
    if c.candidates:
        kmax = min(kmax, c.candidates - 1)
    parts = [_view_chunk(c, rng, lat, lo, min(nu, lo + CHUNK), n_pref, n_noise, kmax) for lo in range(0, nu, CHUNK)]
    cat = [np.concatenate([p[k] for p in parts]) for k in range(5)]
    return (cat[0], cat[1]), (cat[2], cat[3], cat[4])


def _view_chunk(c: SyntheticConfig, rng: np.random.Generator, lat: _Latent, lo: int, hi: int,
                n_pref: np.ndarray, n_noise: np.ndarray, kmax: int) -> tuple[np.ndarray, ...]:
    """Views of users ``lo:hi`` (Gumbel top-k by preference, plus uniform noise views) and the
    ranked items after them."""
    ni = c.n_items
    top, valid = (_ranked_candidates if c.candidates else _ranked_all)(c, rng, lat, lo, hi, kmax)
    rows = np.arange(hi - lo)[:, None]
    pos = np.arange(kmax)[None, :]
    pref = (pos < n_pref[lo:hi, None]) & valid
    rest = ~(pos < n_pref[lo:hi, None]) & valid
    # uniform noise views: random items outside this user's preference-ordered prefix
    nu_rows = np.repeat(np.arange(hi - lo), n_noise[lo:hi])
    noise_items = rng.integers(0, ni, len(nu_rows))
    keep = ~_in_rows(top, valid, nu_rows, noise_items, ni)
    vu = np.r_[np.broadcast_to(rows, top.shape)[pref], nu_rows[keep]]
    vi = np.r_[top[pref], noise_items[keep]]
    return (vu + lo, vi, np.broadcast_to(rows, top.shape)[rest] + lo, top[rest],
            (pos - n_pref[lo:hi, None])[rest])


def _neg_gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``log(-log U)`` for uniforms ``U`` (float32, in place): minus standard Gumbel noise, so
    ``logits - _neg_gumbel(...)`` is the Gumbel-max perturbation whose top-k samples without
    replacement with probability ∝ ``exp(logits)``."""
    g = rng.random(shape, dtype=np.float32)
    np.maximum(g, np.float32(1e-30), out=g)
    np.log(g, out=g)
    np.negative(g, out=g)
    np.log(g, out=g)
    return g


def _ranked_all(c: SyntheticConfig, rng: np.random.Generator, lat: _Latent, lo: int, hi: int,
                kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Users ``lo:hi``'s first ``kmax`` items of a Gumbel top-k draw over all items (exact),
    and which of them are real (all)."""
    aff = ((lat.P[lo:hi].astype(np.float32) @ lat.Q.astype(np.float32).T) / np.float32(lat.scale)).astype(np.float32)
    g = np.float32(c.preference_strength) * aff + lat.bias.astype(np.float32) - _neg_gumbel(rng, aff.shape)
    top = np.argpartition(-g, kmax, axis=1)[:, :kmax]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(g, top, 1), axis=1), 1)
    return top, np.ones(top.shape, dtype=bool)


def _ranked_candidates(c: SyntheticConfig, rng: np.random.Generator, lat: _Latent, lo: int, hi: int,
                       kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_ranked_all` over ``c.candidates`` items per user drawn (with replacement)
    with probability ∝ ``exp(bias)`` and ranked by Gumbel top-k of the affinity term
    (sampling-importance-resampling); a repeated candidate counts once, so a row may hold fewer
    than ``kmax`` real items (``valid`` False after them)."""
    n, k = hi - lo, c.candidates
    cand = _popular_items(lat.bias, c.popularity, rng.random((n, k)))
    aff = np.einsum("ud,ukd->uk", lat.P[lo:hi].astype(np.float32), lat.Q.astype(np.float32)[cand]) / np.float32(lat.scale)
    g = np.float32(c.preference_strength) * aff - _neg_gumbel(rng, (n, k))
    order = np.argsort(-g, axis=1, kind="stable")
    cand = np.take_along_axis(cand, order, 1)
    # a repeated item keeps its best-ranked copy: sort each row by item (stable: rank order kept)
    by_item = np.argsort(cand, axis=1, kind="stable")
    items_sorted = np.take_along_axis(cand, by_item, 1)
    dup = np.zeros((n, k), dtype=bool)
    dup[:, 1:] = items_sorted[:, 1:] == items_sorted[:, :-1]
    is_dup = np.empty_like(dup)
    np.put_along_axis(is_dup, by_item, dup, 1)
    first = np.argsort(is_dup, axis=1, kind="stable")[:, :kmax]  # unique items first, in rank order
    return np.take_along_axis(cand, first, 1), ~np.take_along_axis(is_dup, first, 1)


def _popular_items(bias: np.ndarray, popularity: float, u: np.ndarray) -> np.ndarray:
    """Items drawn with probability ∝ ``exp(bias) = (1 + rank)^-popularity`` from uniforms ``u``:
    the inverse CDF of the continuous density ``(1 + x)^-a`` on ``[0, n)``, floored to a rank
    (O(1) per draw; the discrete head is approximated), mapped to the item of that rank."""
    n, a = len(bias), popularity
    if abs(1.0 - a) < 1e-9:
        x = np.power(float(n + 1), u) - 1.0
    else:
        x = np.power(1.0 + u * ((n + 1.0) ** (1.0 - a) - 1.0), 1.0 / (1.0 - a)) - 1.0
    by_rank = np.argsort(-bias, kind="stable")  # item of each popularity rank
    return by_rank[np.clip(x.astype(np.int64), 0, n - 1)]


def _in_rows(top: np.ndarray, valid: np.ndarray, rows: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Whether item ``items[j]`` is among the valid entries of row ``rows[j]`` of ``top``
    (sorted-key search: memory linear in the entries, not rows x items)."""
    r = np.broadcast_to(np.arange(top.shape[0])[:, None], top.shape)
    keys = np.sort(r[valid].astype(np.int64) * n_items + top[valid])
    q = rows.astype(np.int64) * n_items + items
    if len(keys) == 0:
        return np.zeros(len(q), dtype=bool)
    return keys[np.minimum(np.searchsorted(keys, q), len(keys) - 1)] == q


def _funnel(c: SyntheticConfig, rng: np.random.Generator, lat: _Latent,
            views: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Stage 3: ``(view users, view items, standardised affinity, cart?, buy?)`` per unique view."""
    view = pairs_to_csr(views[0], views[1], c.n_users, c.n_items).tocoo()
    # pairs_to_csr collapses duplicate noise views; recompute affinities for the unique pairs
    vu, vi = view.row.astype(np.int64), view.col.astype(np.int64)
    va = np.concatenate([np.einsum("kd,kd->k", lat.P[vu[s:s + PAIR_CHUNK]], lat.Q[vi[s:s + PAIR_CHUNK]])
                         for s in range(0, len(vu), PAIR_CHUNK)] or [np.zeros(0)]) / lat.scale
    # the funnel is centred on the viewed pairs: p_cart is P(cart | view) at a typical view
    va = (va - va.mean()) / (va.std() or 1.0)
    cart = rng.random(len(vu)) < _sigmoid(_logit(c.p_cart) + c.funnel_effect * va)
    r = rng.random(len(vu))
    buy = np.where(
        cart,
        r < _sigmoid(_logit(c.p_buy_cart) + c.funnel_effect * va),
        r < _sigmoid(_logit(c.p_buy_view) + c.funnel_effect * va),
    )
    return vu, vi, va, cart, buy


def _direct_buys(c: SyntheticConfig, rng: np.random.Generator, vu: np.ndarray, buy: np.ndarray,
                 later: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Stage 4: buys without any view, the next preference-ordered items after the views."""
    funnel_per_user = np.bincount(vu[buy], minlength=c.n_users)
    lam = c.direct_buy / (1.0 - c.direct_buy) * np.maximum(funnel_per_user, 1)
    n_direct = np.minimum(rng.poisson(lam), _direct_prefix(c))
    du, di, drank = later
    dsel = drank < n_direct[du]
    return du[dsel], di[dsel]


def _minimum_buys(c: SyntheticConfig, rng: np.random.Generator, vu: np.ndarray, va: np.ndarray,
                  buy: np.ndarray, du: np.ndarray) -> np.ndarray:
    """Stage 5: which views to promote to cart + buy so that every user has ``min_target`` buys
    (the highest-affinity viewed, not yet bought items)."""
    nu = c.n_users
    deficit = np.maximum(0, c.min_target - (np.bincount(vu[buy], minlength=nu) + np.bincount(du, minlength=nu)))
    cand = ~buy
    rank, _ = rank_from_end(vu[cand], rng, va[cand])  # 0 = highest affinity
    promote = np.zeros(len(vu), dtype=bool)
    promote[np.flatnonzero(cand)[rank < deficit[vu[cand]]]] = True
    return promote


def _hold_out(train: dict[str, tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, nu: int,
              ni: int) -> tuple[dict[str, sp.csr_matrix], ...]:
    """Stage 6: leave-one-out valid/test for every behavior; ``(train, valid, test)`` matrices."""
    tr: dict[str, sp.csr_matrix] = {}
    va_: dict[str, sp.csr_matrix] = {}
    te: dict[str, sp.csr_matrix] = {}
    for b in BEHAVIORS:
        u, i = train[b]
        is_valid, is_test = leave_one_out(u, rng)
        keep = ~(is_valid | is_test)
        tr[b] = pairs_to_csr(u[keep], i[keep], nu, ni)
        va_[b] = pairs_to_csr(u[is_valid], i[is_valid], nu, ni)
        te[b] = pairs_to_csr(u[is_test], i[is_test], nu, ni)
    return tr, va_, te


def load_builtin(name: str, *, seed: int = 0, **options: Any) -> MultiBehaviorData:
    """A built-in synthetic dataset; ``options`` override :class:`SyntheticConfig` fields."""
    base = BUILTINS[name]
    allowed = [f.name for f in fields(SyntheticConfig)]
    check_options(options, allowed, f"the built-in dataset {name!r}")
    typed: dict[str, Any] = {}
    for f in fields(SyntheticConfig):
        if f.name in options:
            try:
                typed[f.name] = type(getattr(base, f.name))(options[f.name])
            except (TypeError, ValueError):
                raise DataError(f"option {f.name!r} must be a number", value=options[f.name]) from None
    return generate(replace(base, **typed), seed=seed, name=name)
