"""RMBRec (Cai et al., "Robust Multi-Behavior Recommendation", WWW'26), as in the
official PyTorch code (miaomiao-cai2/RMBRec@5e7827c), with the paper's forms as options.

One graph encoder per behavior propagates the *shared* user/item tables on that behavior's own
graph (no cascade); the fused embeddings (equal-weight mean over behaviors) are trained with a
target BPR loss, plus a target-anchored user contrastive loss (RRM) and the variance of the
per-behavior BPR risks (ORM, REx). One propagation per behavior per step feeds every term.

Options (official-code behavior is the default; paper forms are opt-in):

* ``encoder``: ``official`` (each layer's output L2-normalised per row, layers 0..L *summed*)
  or ``lightgcn`` (plain mean of layers, as the paper says).
* ``rrm``: ``official`` (cross-view: target-view anchor vs the auxiliary views of the batch
  users, both directions averaged, *summed* over auxiliary behaviors) or ``paper`` (Eqs. 3-4:
  auxiliary anchor, target positive, other users' auxiliary views as negatives, *mean* over
  auxiliary behaviors).
* ``orm``: ``rex`` (variance of the per-behavior BPR risks, all behaviors; ``rex_variance``
  ``unbiased`` as coded or ``population`` as in Eq. 7); ``irm_v1_code`` (the code's "v1": a
  dummy scalar multiplies each behavior's *loss*, so its penalty is ``sum_b L_b^2``; the dummy
  never receives a gradient, so it is not materialised); ``irm_v2_code`` (the code's "v2":
  unbiased variance over behaviors of ``dL_b/dE_user``, averaged over the table's entries);
  ``irm_v1_paper`` (Eq. 13: a learnable scalar classifier ``w`` scales every behavior's logits,
  penalty ``sum_b (dL_b/dw)^2`` at the current ``w``); ``irm_v2_paper`` (Eq. 14: ``w`` fixed
  to 1, the textbook IRMv1 penalty). Only the penalty enters the loss (``lambda_irm``), as for
  REx: per-behavior BPR risks are never added to the objective directly.
* ``padding``: ``faithful`` (default; the code's 1-based tables with a padding row: a user
  without behavior ``b`` contributes the row (pad, pad, pad) to ``b``'s BPR mean, i.e. log 2
  with zero gradient, and to the regulariser; the pad user joins the RRM users when a target
  row is padding) or ``masked`` (such rows are left out of every term).
  With ``faithful`` the tables get one extra (isolated) user row and item row, stored *last*;
  ``score`` returns exactly ``n_items`` columns, so, unlike the official evaluator, the pad
  item is not a ranking candidate (a documented deviation; it can only push real items down).
* Ablations: ``lambda_cl=0`` (w/o RRM), ``lambda_irm=0`` (w/o ORM), ``drop_behaviors``
  (w/o view, w/o cart: the behavior's graph, triplets and negative-exclusion set are removed).
* Adaptive alignment (not in the paper; :mod:`mbrec.models.alignment`): ``align`` sets each
  auxiliary behavior's RRM weight, ``RRM = sum_b w_b L_b``: ``uniform`` (default; no weights, the
  code's sum, bit for bit), ``bar`` (fixed, from the behavior's training BAR: ``align_floor``,
  ``align_min_weight``) or ``learned`` (``n * softmax`` of learned logits with the entropy
  regulariser ``align_temperature``; ``align_lr_mult``); ``align_drop_below`` drops auxiliary
  behaviors whose training BAR is below a threshold (``align_drop_scope``: the whole behavior, or
  only its RRM term). The weights are logged at start and, unless uniform, as the loss terms
  ``align_<behavior>`` every epoch. Fusion and ORM are not weighted.

Regularisation as coded: ``reg * sum_b 1/2(|p_u|^2 + |q_i|^2 + |q_j|^2) / batch`` on the
*propagated* per-behavior rows, plus the trainer's Adam weight decay (1e-3) on every parameter.

Data-parallel training (``docs/distributed.md``): RRM, ORM and the BPR means are whole-batch
terms, so under ``torchrun``/``--nproc`` every rank computes them over the *global* batch with
:mod:`mbrec.collectives` (the distinct users of every rank's part; all-reduced per-behavior sums
and counts), which scales the gradient of the rank's own rows so that the ranks' summed gradient
is one process's. Exact for every option but ``orm: irm_v2_code``. One process never calls them.

Speed (same values as the plain path, tested): the official layer ``rownorm(A x)`` is one
autograd function with a fused backward, and the last layer is computed only for the rows the
batch reads (``A[S] x`` forward, ``A[S]^T g`` backward). ``cpu_kernel: auto`` (the default)
follows the rule of :func:`mbrec.graph.propagate`: full layers on the kernel
:func:`mbrec.graph.full_kernel` measures faster, SciPy row slices for the last layer; ``scipy`` uses SciPy everywhere and ``torch`` torch everywhere (every
row, as on GPU). ``benchmarks/rmbrec.md`` has measurements of each.

More: ``docs/models/rmbrec.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mbrec import collectives
from mbrec.data.container import MultiBehaviorData
from mbrec.data.stats import training_bar
from mbrec.dense import matmul
from mbrec.errors import ConfigError
from mbrec.graph import SparseGraph, bipartite, full_product, host_kernels, normalize_sym, scipy_view, spmm, to_device
from mbrec.losses import BPR_EPS, bpr, info_nce, masked_mean, variance
from mbrec.models.alignment import (ALIGN_MODES, DROP_SCOPES, bar_weights, below_threshold, describe,
                                    learned_weights, weight_entropy_penalty)
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import UserTripletSampler


@dataclass
class RMBRecConfig(ModelConfig):
    """Defaults are the official argparse defaults (Beibei's README uses ``lambda_cl=0.8``)."""

    n_layers: int = option(3, min=0, doc="encoder layers L per behavior")
    encoder: str = option("official", choices=("official", "lightgcn"),
                          doc="row-normalised layers summed (code) or plain LightGCN mean (paper)")
    rrm: str = option("official", choices=("official", "paper"), doc="contrastive form: cross-view (code) or Eqs. 3-4")
    orm: str = option("rex", choices=("rex", "irm_v1_code", "irm_v2_code", "irm_v1_paper", "irm_v2_paper"),
                      doc="invariance penalty (module docstring)")
    rex_variance: str = option("unbiased", choices=("unbiased", "population"), doc="REx variance: as coded or Eq. 7")
    padding: str = option("faithful", choices=("faithful", "masked"),
                          doc="rows of users without a behavior: the code's padding row, or left out")
    lambda_cl: float = option(1.0, min=0, doc="weight of the RRM contrastive loss (0: w/o RRM)")
    tau: float = option(0.07, gt=0, doc="InfoNCE temperature")
    lambda_irm: float = option(1.0, min=0, doc="weight of the ORM penalty (0: w/o ORM)")
    reg: float = option(1e-3, min=0, doc="L2 weight on the batch's propagated rows")
    batch_size: int = option(1024, min=1, doc="users per batch")
    init_std: float = option(0.1, gt=0, doc="standard deviation of the normal initialisation")
    degree_eps: float = option(1e-7, min=0, doc="added to node degrees before D^-1/2 (code: 1e-7)")
    drop_behaviors: list[str] = option([], doc="behaviors removed entirely (ablations w/o view, w/o cart)")
    align: str = option("uniform", choices=ALIGN_MODES,
                        doc="RRM weight of each auxiliary behavior: uniform (1 each, RMBRec), bar (from its "
                            "training BAR: (1-x)*align_min_weight + x, x = clip((BAR-align_floor)/(1-align_floor))), "
                            "learned (n*softmax of learned logits, regularised by align_temperature)")
    align_floor: float = option(0.0, min=0, lt=1, doc="align=bar: training BAR at or below which the weight is align_min_weight")
    align_min_weight: float = option(0.0, min=0, max=1, doc="align=bar: weight at BAR <= align_floor (BAR 1 gets 1)")
    align_temperature: float = option(1.0, min=0, doc="align=learned: weight of sum_b w_b log w_b (n*KL to uniform); "
                                                      "optimum w = n*softmax(-L_rrm/temperature); 0 lets the weights collapse")
    align_lr_mult: float = option(10.0, gt=0, doc="align=learned: logits are mult*theta, so Adam moves them ~mult x lr per step")
    align_drop_below: float = option(0.0, min=0, max=1, doc="drop auxiliary behaviors whose training BAR is below this (0: none)")
    align_drop_scope: str = option("behavior", choices=DROP_SCOPES,
                                   doc="what align_drop_below removes: the whole behavior (graph, triplets, fusion, ORM, as "
                                       "drop_behaviors) or only its RRM term (encoder kept)")
    #: SciPy's single-threaded CSR kernel plus a last layer on the batch rows only, or torch's CSR
    #: kernel (multi-threaded); same values. Which is faster depends on the machine
    #: (``benchmarks/rmbrec.md``); GPUs always use torch.
    cpu_kernel: str = option("auto", choices=("auto", "scipy", "torch"),
                             doc="CPU products of the fused layers: auto = mbrec.graph's rule (full layers on the "
                                 "kernel it measures faster, SciPy row slices for the last layer's rows); scipy or torch everywhere")


def bpr_dw(x: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """``d/dw [-log(1e-10 + sigmoid(w x))]`` per row, differentiable in ``x`` and ``w``."""
    s = torch.sigmoid(w * x)
    return -s * (1.0 - s) * x / (BPR_EPS + s)


@dataclass(frozen=True)
class BehaviorGraph:
    """One behavior's normalised adjacency ``[N, N]`` (symmetric): ``sparse`` for
    :func:`mbrec.graph.spmm` on any device and, with ``cpu_kernel: scipy`` (default) on CPU,
    ``csr`` (SciPy) for the fused layers, whose row slices and transposed products need no
    conversion (``A[S].T @ g`` is cheap there, which torch's CSC path is not)."""

    sparse: SparseGraph
    csr: sp.csr_matrix | None


def _matmul(A: sp.spmatrix | torch.Tensor, x: torch.Tensor, torch_only: bool = False) -> torch.Tensor:
    """``A @ x``: SciPy for a SciPy matrix; for a torch tensor torch's CSR kernel (``torch_only``)
    or the kernel graph.py's rule picks (bit-identical either way)."""
    if isinstance(A, torch.Tensor):
        return torch.sparse.mm(A, x) if torch_only else full_product(A, x)
    return torch.from_numpy(np.ascontiguousarray(A @ x.detach().contiguous().numpy()))


class _NormalizedPropagation(torch.autograd.Function):
    """One official encoder layer, ``y = rownorm(A x)``, with a fused backward
    ``dx = A^T [(dy - y (y . dy)) / |A x|]``. ``A`` may be a row slice ``A[S]`` (then ``y`` holds
    only rows ``S``) and is a torch sparse tensor or a SciPy matrix. Not twice differentiable;
    ``irm_v2_code`` uses the plain :func:`spmm` + ``F.normalize`` path."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: object, A_t: object, torch_only: bool = False) -> torch.Tensor:  # type: ignore[override]
        h = _matmul(A, x, torch_only)  # type: ignore[arg-type]
        n = torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min_(1e-12)
        y = h.div_(n)
        ctx.save_for_backward(y, n)
        ctx.A_t, ctx.torch_only = A_t, torch_only
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        y, n = ctx.saved_tensors
        gh = gy - y * (y * gy).sum(1, keepdim=True)
        gh.div_(n)
        return _matmul(ctx.A_t, gh, ctx.torch_only), None, None, None


@register("rmbrec")
class RMBRec(Model):
    config_class = RMBRecConfig
    train_defaults = {"lr": 1e-3, "weight_decay": 1e-3, "epochs": 200, "patience": 20, "min_epochs": 50}
    summary = "RMBRec (WWW'26): per-behavior encoders, target-anchored contrast (RRM), risk variance (ORM)"
    #: the loss calls :mod:`mbrec.collectives` in data-parallel training (the contrast, the BPR
    #: means and ORM's variance over the global batch), so every rank computes it in every step,
    #: even one whose part of a small batch is empty (:func:`mbrec.train.parallel_step`)
    collective_loss = True

    def __init__(self, data: MultiBehaviorData, config: RMBRecConfig) -> None:
        super().__init__(data, config)
        drop = list(config.drop_behaviors or [])
        for b in drop:
            data.behavior_index(b)  # raises a clear error for unknown names
        if data.target in drop:
            raise ConfigError(f"model_args.drop_behaviors cannot drop the target {data.target!r}")
        self.cfg = config
        drop = drop + self._plan_alignment(data, drop)
        self.behaviors = tuple(b for b in data.behaviors if b not in drop)
        # auxiliary behaviors with an RRM term (the target is last in self.behaviors)
        aux = self.behaviors[:-1]
        self.aligned = tuple(b for b in aux if b not in self.align_dropped)
        self.register_buffer("_aligned_idx", None if len(self.aligned) == len(aux) else torch.tensor(
            [aux.index(b) for b in self.aligned], dtype=torch.long), persistent=False)
        self.pad = 1 if config.padding == "faithful" else 0
        # padding rows (faithful) are the last user row and the last item row
        self.n_u = self.n_users + self.pad
        self.n_i = self.n_items + self.pad
        d = config.embedding_dim
        self.user_emb = nn.Parameter(torch.randn(self.n_u, d) * config.init_std)
        self.item_emb = nn.Parameter(torch.randn(self.n_i, d) * config.init_std)
        self.irm_w = nn.Parameter(torch.ones(())) if config.orm == "irm_v1_paper" else None
        self._init_alignment()
        #: fused normalise-and-propagate layers (same values and gradients; not twice
        #: differentiable, so off for ``irm_v2_code``, which differentiates gradients)
        self.fused_layers = config.orm != "irm_v2_code"

    # -- alignment weights (model_args.align*) -------------------------------------------------
    def _plan_alignment(self, data: MultiBehaviorData, drop: list[str]) -> list[str]:
        """Set ``align_bar`` (the training BAR of the auxiliary behaviors left after
        ``drop_behaviors``, when a weight or a drop uses it; recomputed from ``data.train``, never
        state) and ``align_dropped`` (those below ``align_drop_below``); return the behaviors to
        remove entirely (``align_drop_scope: behavior``)."""
        cfg = self.cfg
        kept = [b for b in data.auxiliary if b not in drop]
        uses_bar = cfg.align == "bar" or cfg.align_drop_below > 0
        self.align_bar: dict[str, float] | None = training_bar(data, kept) if uses_bar else None
        bar = self.align_bar or {}
        self.align_dropped = {b: bar[b] for b in below_threshold(bar, cfg.align_drop_below)}
        return list(self.align_dropped) if cfg.align_drop_scope == "behavior" else []

    def _init_alignment(self) -> None:
        """The fixed BAR weights (a non-persistent buffer: recomputed from the data, never saved)
        or the learned logits (a parameter, zeros: every weight starts at 1)."""
        cfg = self.cfg
        self.align_logits = None
        if cfg.align == "bar":
            assert self.align_bar is not None
            w = bar_weights({b: self.align_bar[b] for b in self.aligned}, cfg.align_floor, cfg.align_min_weight)
            self.register_buffer("align_fixed", torch.tensor([w[b] for b in self.aligned], dtype=torch.float32),
                                 persistent=False)
        elif cfg.align == "learned" and self.aligned:
            self.align_logits = nn.Parameter(torch.zeros(len(self.aligned)))

    def align_weights(self) -> torch.Tensor | None:
        """``w_b`` per aligned auxiliary behavior (``self.aligned`` order); ``None`` for
        ``align: uniform`` (every weight 1, RMBRec's plain sum)."""
        if self.cfg.align == "bar":
            return self.align_fixed
        if self.align_logits is not None:
            return learned_weights(self.align_logits, self.cfg.align_lr_mult)
        return None

    def on_train_start(self, data: MultiBehaviorData, graphs: Any, device: torch.device,
                       log: Callable[[str], None] | None = None) -> None:
        """Log each auxiliary behavior's training BAR next to its starting alignment weight."""
        if log is None:
            return
        cfg = self.cfg
        bar = self.align_bar if self.align_bar is not None else training_bar(data, self.aligned)
        w = self.align_weights()
        weights = {b: (1.0 if w is None else float(w[k].detach())) for k, b in enumerate(self.aligned)}
        extra = {"uniform": "weight 1 each",
                 "bar": f"floor {cfg.align_floor:g}, min weight {cfg.align_min_weight:g}",
                 "learned": f"start 1 each, temperature {cfg.align_temperature:g}, lr mult {cfg.align_lr_mult:g}; "
                            "per-epoch means are the align_<behavior> loss terms"}[cfg.align]
        log(describe(cfg.align, bar, weights, self.align_dropped, cfg.align_drop_scope, cfg.align_drop_below, extra))

    # -- graphs and sampling ----------------------------------------------------------------
    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> list[BehaviorGraph]:
        graphs = []
        for b in self.behaviors:
            R = sp.csr_matrix(data.train[b])
            if self.pad:  # one more (empty) user row and item column
                R = sp.csr_matrix((R.data, R.indices, np.append(R.indptr, R.indptr[-1])), shape=(self.n_u, self.n_i))
            A = normalize_sym(bipartite(R), degree_eps=self.cfg.degree_eps)
            A.sort_indices()
            scipy_path = host_kernels(device) and self.cfg.cpu_kernel == "scipy"
            graphs.append(BehaviorGraph(to_device(A, device, symmetric=True), A if scipy_path else None))
        return graphs

    def make_sampler(self, data: MultiBehaviorData) -> UserTripletSampler:
        mats = [data.train[b] for b in self.behaviors]
        return UserTripletSampler(mats, data.train_union(self.behaviors), self.cfg.batch_size)

    # -- encoder ----------------------------------------------------------------------------
    def propagate(self, graphs: list[BehaviorGraph], rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-behavior node embeddings from the shared tables, one tensor per graph: all
        ``n_u + n_i`` rows, or only ``rows`` (then the last layer is computed for those rows
        only: same values, less work)."""
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        L = self.cfg.n_layers
        if self.cfg.encoder == "lightgcn" or not self.fused_layers:  # plain autograd path
            outs = []
            for g in graphs:
                x, acc = ego, ego
                for _ in range(L):
                    x = spmm(g.sparse, x)
                    if self.cfg.encoder == "official":
                        x = F.normalize(x, dim=1)
                    acc = acc + x
                out = acc if self.cfg.encoder == "official" else acc / (L + 1)
                outs.append(out if rows is None else out[rows])
            return outs
        outs = []
        cpu = host_kernels(ego.device)
        for g in graphs:
            A = g.csr if g.csr is not None and cpu else None
            mats = (A, A) if A is not None else (g.sparse.mat, g.sparse.mat_t)
            x, acc = ego, (ego if rows is None else ego[rows])
            row_path = rows is not None and cpu and self.cfg.cpu_kernel != "torch"
            for layer in range(L):
                if row_path and layer == L - 1:
                    As = (A if A is not None else scipy_view(g.sparse.mat))[rows.numpy()]  # only the rows read
                    acc = acc + _NormalizedPropagation.apply(x, As, As.T.tocsr())  # CSR: faster than CSC
                    break
                x = _NormalizedPropagation.apply(x, *mats, self.cfg.cpu_kernel == "torch")
                acc = acc + (x if rows is None else x[rows])
            outs.append(acc)
        return outs

    def forward(self, graphs: list[BehaviorGraph]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Fused ``(z_users [n_u, d], z_items [n_i, d])`` (padding rows included, last)."""
        z = torch.stack(self.propagate(graphs)).mean(0)
        return z[: self.n_u], z[self.n_u :]

    def score(self, emb: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        zu, zi = emb
        return matmul(zu[users], zi[: self.n_items].T)

    # -- loss -------------------------------------------------------------------------------
    def _index(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(users, pos, neg)`` as ``[n_b, B]`` node indices, and the row mask (masked mode)."""
        trip = torch.as_tensor(batch["triplets"]).long()
        valid = torch.as_tensor(batch["valid"]).bool()
        u, i, j = trip[..., 0].T, trip[..., 1].T, trip[..., 2].T
        mask = valid.T
        if self.pad:  # official padding row (0, 0, 0) -> this model's (pad user, pad item, pad item)
            u = torch.where(mask, u, self.n_users)
            i = torch.where(mask, i, self.n_items)
            j = torch.where(mask, j, self.n_items)
            return u, i + self.n_u, j + self.n_u, None
        return u, i + self.n_u, j + self.n_u, mask

    def loss(self, graphs: list[BehaviorGraph], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        u, i, j, mask = self._index(batch)
        n_b, bsz = u.shape
        # one propagation per behavior, shared by every term, computed for the rows read below
        rows, pos_in_rows = torch.unique(torch.stack([u, i, j]), return_inverse=True)
        H = self.propagate(graphs, rows)
        u, i, j = pos_in_rows.unbind(0)
        # data-parallel training: the BPR means over the global batch (mbrec.collectives), below
        shared = collectives.active() is not None
        risks, diffs, scores, reg = [], [], [], torch.zeros((), device=H[0].device)
        for k, h in enumerate(H):  # per-behavior BPR risks (they enter through ORM only) and reg
            pu, qi, qj = h[u[k]], h[i[k]], h[j[k]]
            pos, neg = (pu * qi).sum(-1), (pu * qj).sum(-1)
            mk = None if mask is None else mask[k]
            if shared:
                scores.append((pos, neg))
            else:
                risks.append(bpr(pos, neg, form="log_eps", mask=mk))
            diffs.append(pos - neg)
            sq = pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1)
            reg = reg + 0.5 * (sq if mk is None else sq * mk).sum() / max(bsz, 1)  # 0 rows: a rank's empty part

        # fused target BPR on the target-behavior triplets
        ut, it, jt = u[-1], i[-1], j[-1]
        zu, zi, zj = (sum(h[r] for h in H) / n_b for r in (ut, it, jt))  # fused rows only
        mt = None if mask is None else mask[-1]
        if shared:
            *risks, main = self._global_bpr_means(scores + [((zu * zi).sum(-1), (zu * zj).sum(-1))], mask)
        else:
            main = bpr((zu * zi).sum(-1), (zu * zj).sum(-1), form="log_eps", mask=mt)

        terms = {"main": main, "reg": reg}
        total = main + cfg.reg * reg
        w = self.align_weights()
        if cfg.lambda_cl != 0 and self.aligned:
            terms["rrm"] = self._rrm(H, ut if mt is None else ut[mt], w, node_ids=rows)
            total = total + cfg.lambda_cl * terms["rrm"]
            if self.align_logits is not None and cfg.align_temperature != 0:
                assert w is not None
                terms["align_reg"] = weight_entropy_penalty(w)
                total = total + cfg.lambda_cl * cfg.align_temperature * terms["align_reg"]
        if cfg.lambda_irm != 0 and n_b > 1:
            terms["orm"] = self._orm(risks, diffs, mask)
            total = total + cfg.lambda_irm * terms["orm"]
        for k, b in enumerate(self.behaviors):
            terms[f"bpr_{b}"] = risks[k].detach()
        if w is not None:  # the alignment weights, logged per epoch next to the BARs
            for k, b in enumerate(self.aligned):
                terms[f"align_{b}"] = w[k].detach()
        terms["loss"] = total
        return terms

    def floor_products(self, graphs: list[BehaviorGraph], batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """Per behavior, ``n_layers`` products on its graph: every layer but the last over all
        nodes (the next layer reads them), the last only at the batch's user and item rows (the
        only rows any loss term reads). The contrastive and variance terms work on those rows;
        no product on the whole user or item table is needed."""
        from mbrec.bench import SparseProduct

        u, i, j, _ = self._index(batch)
        rows = torch.unique(torch.stack([u, i, j]))
        d, L = self.cfg.embedding_dim, self.cfg.n_layers
        return [SparseProduct(f"{b} layer {n + 1}", g.sparse, d, rows=rows if n == L - 1 else None)
                for b, g in zip(self.behaviors, graphs) for n in range(L)]

    @staticmethod
    def _global_bpr_means(scores: list[tuple[torch.Tensor, torch.Tensor]],
                          mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Data-parallel training: the BPR mean of each ``(pos, neg)`` over the rows of the
        *global* batch (``mask``: valid rows only; the last pair, the fused target BPR, takes the
        target's), the same value on every rank (:func:`mbrec.collectives.global_mean`): ORM's
        variance must see the batch's risks, not a rank's."""
        rows = torch.stack([bpr(p, q, form="log_eps", reduction="none") for p, q in scores])
        masks = None if mask is None else torch.cat([mask, mask[-1:]])
        return list(collectives.global_mean(rows, masks).unbind(0))

    def _mean(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """:func:`masked_mean` along the batch's rows (last dimension); over the global batch in
        data-parallel training."""
        return masked_mean(x, mask) if collectives.active() is None else collectives.global_mean(x, mask)

    def _rrm(self, H: list[torch.Tensor], users: torch.Tensor, w: torch.Tensor | None = None,
             node_ids: torch.Tensor | None = None) -> torch.Tensor:
        """RRM over the aligned auxiliary views; ``w`` (one weight per view) weights each view's
        term, ``None`` is RMBRec's unweighted sum (official) or mean (paper). ``users`` index the
        rows of ``H``, whose node ids are ``node_ids`` (needed in data-parallel training only:
        there the contrast runs over the distinct users of the global batch, every rank's, each
        once, in node order as in one process; :func:`mbrec.collectives.gather_unique`)."""
        users = torch.unique(users)
        P = F.normalize(torch.stack([h[users] for h in H]), dim=-1)  # [n_b, n, d] unique batch users
        if collectives.active() is not None:
            if node_ids is None:
                raise ValueError("RMBRec._rrm needs the rows' node ids in data-parallel training")
            P = collectives.gather_unique(node_ids[users], P, dim=1)[1]
        anchor, views = P[-1], P[:-1]
        if self._aligned_idx is not None:  # align_drop_scope: rrm removed some views
            views = views[self._aligned_idx]
        if self.cfg.rrm == "official":
            # per auxiliary view: S = a c^T / tau, 1/2 [CE(S) + CE(S^T)], summed over views
            per_view = info_nce(anchor, views, self.cfg.tau, symmetric=True, normalize=False)
            return per_view.sum() if w is None else (w * per_view).sum()
        # Eq. 3 per auxiliary view: anchor c_u (auxiliary), positive a_u (target), negatives c_u'
        # (same auxiliary view, other users), positive in the denominator; mean over views
        per_view = info_nce(views, anchor, self.cfg.tau, negatives="query", normalize=False)
        return per_view.mean() if w is None else (w * per_view).sum() / per_view.numel()

    def _orm(self, risks: list[torch.Tensor], diffs: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        orm = self.cfg.orm
        r = torch.stack(risks)
        if orm == "rex":
            return variance(r, unbiased=self.cfg.rex_variance == "unbiased")
        if orm == "irm_v1_code":
            return r.pow(2).sum()
        if orm == "irm_v2_code":
            grads = [
                torch.autograd.grad(x, self.user_emb, create_graph=True, retain_graph=True)[0].flatten()
                for x in risks
            ]
            return variance(torch.stack(grads)).mean()
        w = self.irm_w if orm == "irm_v1_paper" else 1.0
        g = torch.stack(diffs)
        return self._mean(bpr_dw(g, w), mask).pow(2).sum()

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return (self.target,)
