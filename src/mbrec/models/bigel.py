"""BiGEL: behavior-informed graph embedding learning for multi-behavior multi-task recommendation.

Paper: W. Lai, W. Pan, Z. Ming, "Towards Multi-Behavior Multi-Task Recommendation via
Behavior-informed Graph Embedding Learning", arXiv 2601.07294 (2026). No official code exists;
this is a reconstruction from the paper (``docs/models/bigel.md``), every open choice an option.

What it does: (CGL) a cascade of LightGCNs, one per behavior in order, each starting from the
previous behavior's output (residual hand-over); (CGF) the target embedding is fed back into each
auxiliary behavior through a learned gate; (GCE) a LightGCN on the all-behavior graph, projected
per auxiliary behavior and added through a second gate; (CPA) InfoNCE aligns target and global
embeddings (users and items). Loss: one BPR per behavior, summed, + lambda*CPA + beta*L2. It ranks
items for **every** behavior (multi-task model).

Options for the paper's ambiguities (default first):

* ``gate_input`` "aux" | "aux_target": gate = sigmoid(W LeakyReLU(x) + c) with x = the auxiliary
  embedding alone, or [auxiliary; target].
* ``enhance_items`` True | False: CGF and GCE also enhance item embeddings (else users only).
* ``cgf_detach`` False | True: the target embedding fed back by CGF keeps its gradient (auxiliary
  BPRs train the target path: the "feedback") or is detached.
* ``cgf_source`` "target" | "chain": every auxiliary gets the CGL target embedding e^(K) (which has
  no enhancement of its own: GCE is auxiliary-only), or the feedback cascades backwards
  (b_{K-1} gets e^(K), b_{K-2} gets the enhanced b_{K-1}, ...).
* ``layer_agg`` "mean" | "sum": aggregation of a LightGCN's layers. A CGL block aggregates layers
  1..L_k (layer 0 comes back through the residual); the global LightGCN aggregates layers 0..L_g.
* ``residual`` "output" | "handover" | "none": e^(k) = LGCN_k(X_k) + X_k and X_{k+1} = e^(k)
  (CRGCN-style), or e^(k) = LGCN_k(X_k) with X_{k+1} = e^(k) + X_k, or no residual.
* ``layers``: LightGCN depth per behavior in ``order``; default (1, 2, ..., K), i.e. JD (1, 2, 3).
  ``configs/bigel/bvae-jd.yaml`` uses (3, 3, 3), which won a validation screen on JD
  (``experiments/bigel-jd-tune.yaml``; ``results/bigel.md``).
* ``global_graph`` "binary" | "multiplicity": union of all training edges, or edges weighted by how
  many behaviors hold the pair; ``global_layers`` L_g = 2.
* ``cpa_negatives`` "in_batch" | "full": InfoNCE negatives are the other batch users (items) or
  all users (items). ``cpa_batch`` "target" | "all" | "target_rows": the batch is the distinct
  users and positive items of the target triplets, or the distinct users and items (positives and
  negatives) of every behavior's triplets (~4x the rows, ~16x the cost of in-batch logits), or the
  target triplets' users and positive items with duplicates kept.
* ``task_weights`` None (all 1) | {behavior: w}; ``cpa_weight`` lambda = 0.01; ``tau`` = 0.2;
  ``reg`` beta = 1e-4 with ``reg_scope`` "batch" (LightGCN form: beta/2 * squared norms of the
  batch's ego embeddings / batch, per behavior) | "all" (beta * ||Theta||^2, Eq. 14 literally);
  ``embedding_dim`` d = 64; ``init_std`` 0.1 (normal init of P, Q).
* Sampling (:class:`mbrec.sampling.PerBehaviorTripletSampler`): per behavior, triplets (u, i+ in train_b(u), j- not in train_b(u)) (``negatives``
  "behavior" | "union"); a batch holds ``batch_size`` triplets of every behavior; ``epoch_size``
  "target": one epoch = one shuffled pass over the target's training pairs, each auxiliary
  behavior contributing as many pairs, drawn without replacement from a fresh permutation
  (cycling when it has fewer pairs) | "largest": a pass over the largest behavior | "each": one
  pass over **every** behavior's own pairs, in as many batches as the target needs, so a batch holds
  each behavior's triplets in proportion to its size (JD: ~7,300 click, ~250 favourite, ~2,050
  purchase); no behavior is cycled (with "target", JD's 7,380 favourite pairs are seen ~8x per
  epoch) and none is under-sampled (click: 28% of its pairs per "target" epoch).
* ``order``: behaviors upstream -> downstream, target last; default the dataset's order minus
  behaviors without training pairs (JD cart).

Training (:meth:`BiGEL.loss`) computes only what the loss reads: the auxiliary CGL blocks over
all nodes (each feeds the next block), the target block's and the global LightGCN's last layer
only at the batch's rows that read them, and CGF/GCE only at the auxiliary triplets' rows
(:meth:`BiGEL.encode_rows`); :meth:`BiGEL.encode` is the same computation over all nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.dense import matmul
from mbrec.errors import ConfigError
from mbrec.graph import SparseGraph, bipartite, lightgcn_block, lightgcn_rows, lightgcn_stack, normalize_sym, to_device
from mbrec.losses import bpr, info_nce, l2
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import PerBehaviorTripletSampler, PositiveSet


@dataclass
class BiGELConfig(ModelConfig):
    order: list[str] | None = option(None, doc="behaviors upstream -> downstream, target last (null: dataset order)")
    layers: list[int] | None = option(None, min=1, doc="LightGCN depth per behavior in order (null: 1, 2, ..., K)")
    layer_agg: str = option("mean", choices=("mean", "sum"), doc="aggregation of a LightGCN's layers")
    residual: str = option("output", choices=("output", "handover", "none"), doc="where the CGL residual enters")
    use_cgf: bool = option(True, doc="cascading gated feedback (CGF) of the target into the auxiliaries")
    use_gce: bool = option(True, doc="global context enhancement (GCE) from the all-behavior graph")
    use_cpa: bool = option(True, doc="contrastive preference alignment (CPA) of target and global embeddings")
    gate_input: str = option("aux", choices=("aux", "aux_target"), doc="gate input: auxiliary alone or [auxiliary; target]")
    enhance_items: bool = option(True, doc="CGF and GCE also enhance item embeddings (else users only)")
    cgf_detach: bool = option(False, doc="detach the target embedding CGF feeds back")
    cgf_source: str = option("target", choices=("target", "chain"), doc="CGF feeds every auxiliary e^(K), or cascades backwards")
    global_graph: str = option("binary", choices=("binary", "multiplicity"), doc="global graph edges: union, or weighted by count")
    global_layers: int = option(2, min=0, doc="layers L_g of the global LightGCN")
    cpa_negatives: str = option("in_batch", choices=("in_batch", "full"), doc="InfoNCE negatives: batch rows or the whole table")
    cpa_batch: str = option("target", choices=("target", "all", "target_rows"), doc="rows CPA aligns (module docstring)")
    cpa_weight: float = option(0.01, min=0, doc="lambda: weight of the CPA loss")
    tau: float = option(0.2, gt=0, doc="InfoNCE temperature")
    reg: float = option(1e-4, min=0, doc="beta: L2 weight")
    reg_scope: str = option("batch", choices=("batch", "all"), doc="L2 on the batch's ego rows (LightGCN form) or all parameters (Eq. 14)")
    task_weights: dict[str, float] | None = option(None, min=0, doc="BPR weight per behavior (null: all 1)")
    init_std: float = option(0.1, gt=0, doc="standard deviation of the normal init of P, Q")
    bpr_form: str = option("softplus", choices=("softplus", "log_eps"), doc="BPR form (mbrec.losses.bpr)")
    batch_size: int = option(2048, min=1, doc="triplets of every behavior per batch")
    epoch_size: str = option("target", choices=("target", "largest", "each"), doc="triplets per epoch (module docstring)")
    negatives: str = option("behavior", choices=("behavior", "union"), doc="negatives outside the behavior's pairs or all behaviors'")


def resolve_order(data: MultiBehaviorData, order: list[str] | None) -> tuple[str, ...]:
    """The cascade order: given, or the dataset's behaviors that have training pairs."""
    if order is None:
        return tuple(b for b in data.behaviors if data.train[b].nnz > 0)
    out = tuple(order)
    for b in out:
        data.behavior_index(b)  # raises on unknown names
        if data.train[b].nnz == 0:
            raise ConfigError(f"bigel.order: behavior {b!r} has no training pairs")
    if len(set(out)) != len(out) or out[-1] != data.target:
        raise ConfigError(f"bigel.order must list distinct behaviors ending with the target {data.target!r}, got {list(out)}")
    return out


class Gate(nn.Module):
    """g = sigmoid(W LeakyReLU(x) + c), x = [inputs...] concatenated; output [n, d]."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        return torch.sigmoid(self.linear(F.leaky_relu(x)))


@register("bigel")
class BiGEL(Model):
    config_class = BiGELConfig
    train_defaults = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 300, "patience": 20, "min_epochs": 50}
    summary = "BiGEL (2026): cascading GCN + gated target feedback + global context + contrastive alignment; ranks every behavior"

    def __init__(self, data: MultiBehaviorData, config: BiGELConfig) -> None:
        super().__init__(data, config)
        c = config
        self.order = resolve_order(data, c.order)
        K, d = len(self.order), c.embedding_dim
        self.layers = tuple(c.layers) if c.layers is not None else tuple(range(1, K + 1))
        if len(self.layers) != K:
            raise ConfigError(f"bigel.layers has {len(self.layers)} entries for {K} behaviors {list(self.order)}")
        tw = dict(c.task_weights or {})
        unknown = sorted(set(tw) - set(self.order))
        if unknown:
            raise ConfigError(f"bigel.task_weights names unknown behaviors {unknown}; cascade: {list(self.order)}")
        self.task_weights = {b: float(tw.get(b, 1.0)) for b in self.order}
        self.user_emb = nn.Parameter(torch.randn(self.n_users, d) * c.init_std)
        self.item_emb = nn.Parameter(torch.randn(self.n_items, d) * c.init_std)
        d_gate = 2 * d if c.gate_input == "aux_target" else d
        aux = self.order[:-1]
        self.cgf_gates = nn.ModuleDict({b: Gate(d_gate, d) for b in aux}) if c.use_cgf else None
        self.gce_proj = nn.ModuleDict({b: nn.Linear(d, d) for b in aux}) if c.use_gce else None
        self.gce_gates = nn.ModuleDict({b: Gate(d_gate, d) for b in aux}) if c.use_gce else None

    @property
    def needs_global(self) -> bool:
        return self.config.use_gce or self.config.use_cpa

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return self.order

    # ------------------------------------------------------------------ graphs and sampling
    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> dict[str, Any]:
        graphs: dict[str, Any] = {
            "behavior": [to_device(normalize_sym(bipartite(data.train[b])), device, symmetric=True) for b in self.order]
        }
        if self.needs_global:
            if self.config.global_graph == "binary":
                R = data.train_union(self.order)
            else:
                R = sum((data.train[b] for b in self.order), sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32))
            graphs["global"] = to_device(normalize_sym(bipartite(R, binary=self.config.global_graph == "binary")), device, symmetric=True)
        return graphs

    def make_sampler(self, data: MultiBehaviorData) -> PerBehaviorTripletSampler:
        mats = [data.train[b] for b in self.order]
        if self.config.negatives == "union":
            union = PositiveSet(data.train_union(self.order))
            excludes = [union] * len(mats)
        else:
            excludes = [PositiveSet(m) for m in mats]
        ref = max(m.nnz for m in mats) if self.config.epoch_size == "largest" else mats[-1].nnz
        return PerBehaviorTripletSampler(mats, excludes, self.config.batch_size, ref,
                                         proportional=self.config.epoch_size == "each")

    # ------------------------------------------------------------------ encoder
    def _lightgcn(self, g: SparseGraph, x: torch.Tensor, n_layers: int, include_ego: bool,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        return lightgcn_stack(g, x, n_layers, rows=rows, include_ego=include_ego, agg=self.config.layer_agg)

    def _ego(self) -> torch.Tensor:
        return torch.cat([self.user_emb, self.item_emb], dim=0)

    def _global(self, graphs: Mapping[str, Any], rows: torch.Tensor | None = None,
                ego: torch.Tensor | None = None) -> torch.Tensor:
        """The global LightGCN (layers 0..L_g), over all nodes or at ``rows``."""
        ego = self._ego() if ego is None else ego
        return self._lightgcn(graphs["global"], ego, self.config.global_layers, include_ego=True, rows=rows)

    def cascade(self, graphs: Mapping[str, Any], ego: torch.Tensor | None = None) -> list[torch.Tensor]:
        """CGL: the per-behavior node embeddings e^(k), ``[U+I, d]`` each, in cascade order
        (training reads them at its rows through :meth:`_cascade_rows`). ``ego``: the stacked
        ``[P; Q]`` when the caller has it already."""
        x = self._ego() if ego is None else ego
        outs = []
        for g, n_layers in zip(graphs["behavior"], self.layers):
            prop = self._lightgcn(g, x, n_layers, include_ego=False)
            if self.config.residual == "output":
                e = prop + x
                x = e
            elif self.config.residual == "handover":
                e, x = prop, prop + x
            else:
                e = x = prop
            outs.append(e)
        return outs

    def _cascade_rows(self, graphs: Mapping[str, Any], sets: Mapping[str, Any], ego: torch.Tensor
                      ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """:meth:`cascade` as training reads it: ``(aux, target, ego_rows)`` with ``aux[k]`` the
        auxiliary block ``k``'s ``e^(k)`` at ``sets["aux"][k]``, ``target`` the target's at
        ``sets["target"]`` and ``ego_rows[k]`` ``ego`` at ``sets["reg"][k]``. The auxiliary blocks
        gather their rows inside :func:`lightgcn_block` (a backward without ``[N, d]`` scatters;
        the first also gathers the ego rows for L2), the target block runs at its rows only."""
        c, K = self.config, len(self.layers)
        x, aux = ego, []
        ego_rows: list[torch.Tensor] = [ego.index_select(0, r) for r in sets["reg"]] if K == 1 else []
        for k, (g, n_layers) in enumerate(zip(graphs["behavior"][:-1], self.layers[:-1])):
            out, (e_rows,), got = lightgcn_block(g, x, n_layers, include_ego=False, agg=c.layer_agg,
                                                 residual=c.residual == "output", out_rows=(sets["aux"][k],),
                                                 in_rows=tuple(sets["reg"]) if k == 0 else ())
            ego_rows = got if k == 0 else ego_rows
            aux.append(e_rows)
            x = out + x if c.residual == "handover" else out
        T = sets["target"]
        prop, x_rows = lightgcn_rows(graphs["behavior"][-1], x, self.layers[-1], T, include_ego=False, agg=c.layer_agg)
        return aux, (prop + x_rows if c.residual == "output" else prop), ego_rows

    def _enhance(self, gate: Gate, base: torch.Tensor, add: torch.Tensor, target: torch.Tensor,
                 is_user: torch.Tensor | None = None) -> torch.Tensor:
        """base + gate(base[, target]) * add, on users (and items when ``enhance_items``).
        ``is_user``: which rows are users when ``base`` holds a subset of the nodes."""
        g = gate(base, target) if self.config.gate_input == "aux_target" else gate(base)
        out = base + g * add
        if not self.config.enhance_items:
            if is_user is None:
                out = torch.cat([out[: self.n_users], base[self.n_users :]], dim=0)
            else:
                out = torch.where(is_user[:, None], out, base)
        return out

    def encode(self, graphs: Mapping[str, Any]) -> dict[str, Any]:
        """All intermediate embeddings: ``cgl`` (list), ``target``, ``glob`` (or None), ``final``
        ({behavior: [U+I, d]}: the enhanced auxiliaries and the CGL target)."""
        c = self.config
        ego = self._ego()
        cgl = self.cascade(graphs, ego=ego)
        target = cgl[-1]
        fb_target = target.detach() if c.cgf_detach else target
        glob = self._global(graphs, ego=ego) if self.needs_global else None
        final: dict[str, torch.Tensor] = {self.order[-1]: target}
        source = fb_target
        for k in range(len(self.order) - 2, -1, -1):  # auxiliaries, downstream first (for "chain")
            b, e = self.order[k], cgl[k]
            if c.use_cgf:
                e = self._enhance(self.cgf_gates[b], e, source, fb_target)
            if c.use_gce:
                e = self._enhance(self.gce_gates[b], e, self.gce_proj[b](glob), fb_target)
            final[b] = e
            if c.cgf_source == "chain":
                source = e
        return {"cgl": cgl, "target": target, "glob": glob, "final": final}

    def row_sets(self, trip: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 cpa: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        """The node rows (sorted, distinct) each part of :meth:`encode_rows` produces for a batch:
        ``aux``: per auxiliary behavior (cascade order), its triplets' nodes, where its CGF and GCE
        run (with ``cgf_source="chain"`` every auxiliary uses the union: each feeds the next);
        ``target``: the target triplets' nodes, the CPA rows and, when CGF or a target-reading
        gate reads it, the auxiliary rows that read it; ``glob``: the auxiliary rows GCE reads
        and the CPA rows, or ``None`` (every node: CPA with whole-table negatives reads all)."""
        c, n = self.config, self.n_users
        empty = torch.zeros(0, dtype=torch.long, device=self.user_emb.device)
        aux = [torch.unique(torch.cat([t[0], n + t[1], n + t[2]])) for t in trip[:-1]]
        union = torch.unique(torch.cat(aux + [empty]))
        if c.cgf_source == "chain":
            aux = [union] * len(aux)
        reads = union if c.enhance_items else union[union < n]  # auxiliary rows that read target / glob
        cpa_rows = empty if cpa is None else torch.cat([cpa[0], n + cpa[1]])
        t = trip[-1]
        target_parts = [t[0], n + t[1], n + t[2], cpa_rows]
        if c.use_cgf or (c.use_gce and c.gate_input == "aux_target"):
            target_parts.append(reads)
        glob: torch.Tensor | None = None
        if self.needs_global and not (c.use_cpa and c.cpa_negatives == "full"):
            glob = torch.unique(torch.cat([reads if c.use_gce else empty, cpa_rows]))
        reg = [torch.cat([u, n + i, n + j]) for u, i, j in trip] if c.reg_scope == "batch" else []
        return {"aux": aux, "target": torch.unique(torch.cat(target_parts)), "glob": glob, "reg": reg}

    def encode_rows(self, graphs: Mapping[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`encode` at the rows of :meth:`row_sets` only: ``aux`` ({behavior: its enhanced
        embedding at ``sets["aux"][k]``}), ``target`` (at ``sets["target"]``), ``glob`` (at
        ``sets["glob"]``, or all nodes when that is ``None``; ``None`` without a global graph) and
        ``ego`` (the stacked ``[P; Q]`` they start from)."""
        c, n = self.config, self.n_users
        T, G = sets["target"], sets["glob"]
        ego = self._ego()
        cgl_rows, target, ego_rows = self._cascade_rows(graphs, sets, ego)
        glob = self._global(graphs, G, ego=ego) if self.needs_global else None

        def at(x: torch.Tensor, have: torch.Tensor | None, want: torch.Tensor) -> torch.Tensor:
            """Rows ``want`` of ``x``, which holds the rows ``have`` (``None``: all). Rows absent
            from ``have`` are only ever read where they are discarded (``enhance_items=False``)."""
            if have is None:
                return x[want]
            if len(have) == 0:
                return x.new_zeros(len(want), x.shape[1])
            return x.index_select(0, torch.searchsorted(have, want).clamp_max(len(have) - 1))

        aux: dict[str, torch.Tensor] = {}
        source: torch.Tensor | None = None
        for k in range(len(self.order) - 2, -1, -1):  # auxiliaries, downstream first (for "chain")
            b, R = self.order[k], sets["aux"][k]
            e = cgl_rows[k]
            fb = at(target, T, R)
            if c.cgf_detach:
                fb = fb.detach()
            is_user = R < n
            if c.use_cgf:
                e = self._enhance(self.cgf_gates[b], e, fb if source is None else source, fb, is_user)
            if c.use_gce:
                e = self._enhance(self.gce_gates[b], e, self.gce_proj[b](at(glob, G, R)), fb, is_user)
            aux[b] = e
            if c.cgf_source == "chain":
                source = e  # the same rows: every auxiliary uses the union with "chain"
        return {"aux": aux, "target": target, "glob": glob, "ego_rows": ego_rows}

    def forward(self, graphs: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        final = self.encode(graphs)["final"]
        return {b: (final[b][: self.n_users], final[b][self.n_users :]) for b in self.order}

    def score(self, emb: Mapping[str, tuple[torch.Tensor, torch.Tensor]], users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        u, i = emb[behavior]
        return matmul(u[users], i.T)

    # ------------------------------------------------------------------ loss
    def cpa_loss(self, target: torch.Tensor, glob: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """L_cpa = InfoNCE(users) + InfoNCE(items) between target and global embeddings."""
        n = self.n_users
        return self._cpa(target[users], target[n + items], glob[users], glob[n + items], glob, users, items)

    def _cpa(self, t_users: torch.Tensor, t_items: torch.Tensor, g_users: torch.Tensor | None, g_items: torch.Tensor | None,
             glob: torch.Tensor | None, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """CPA from gathered rows: target and (in-batch) global rows of the batch's users and
        items; whole-table negatives read the full ``glob`` instead."""
        n, tau = self.n_users, self.config.tau
        if self.config.cpa_negatives == "in_batch":
            return info_nce(t_users, g_users, tau) + info_nce(t_items, g_items, tau)
        assert glob is not None
        return (info_nce(t_users, None, tau, negatives="table", candidates=glob[:n], targets=users)
                + info_nce(t_items, None, tau, negatives="table", candidates=glob[n:], targets=items))

    def _cpa_ids(self, trip: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The users and items CPA aligns (``cpa_batch``), or ``None`` without CPA."""
        c = self.config
        if not c.use_cpa:
            return None
        Ut, Pt, _ = trip[-1]
        if c.cpa_batch == "target":
            return torch.unique(Ut), torch.unique(Pt)
        if c.cpa_batch == "all":
            return (torch.unique(torch.cat([x[0] for x in trip])),
                    torch.unique(torch.cat([x[1] for x in trip] + [x[2] for x in trip])))
        return Ut, Pt

    def _triplets(self, batch: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(users, pos, neg)]`` per behavior in cascade order, from either batch layout."""
        dev = self.user_emb.device

        def t(x: Any) -> torch.Tensor:
            return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).to(dev).long()

        if "users" in batch:
            U, P, N = (t(batch[k]) for k in ("users", "pos", "neg"))
            return [(U[k], P[k], N[k]) for k in range(len(self.order))]
        return [(t(batch[f"users_{k}"]), t(batch[f"pos_{k}"]), t(batch[f"neg_{k}"])) for k in range(len(self.order))]

    def loss(self, graphs: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        c = self.config
        dev = self.user_emb.device
        trip = self._triplets(batch)
        cpa_ids = self._cpa_ids(trip)
        sets = self.row_sets(trip, cpa_ids)
        enc = self.encode_rows(graphs, sets)  # only the rows the loss reads
        n, K = self.n_users, len(self.order)
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=dev)
        reg = torch.zeros((), device=dev)
        for k, b in enumerate(self.order):
            e, rows = (enc["target"], sets["target"]) if k == K - 1 else (enc["aux"][b], sets["aux"][k])
            Uk, Pk, Nk = trip[k]
            if len(Uk) == 0:  # "each": a behavior with fewer pairs than batches has empty batches
                terms[f"bpr_{b}"] = torch.zeros((), device=dev)
                continue
            u, i, j = (e.index_select(0, torch.searchsorted(rows, ids)) for ids in (Uk, n + Pk, n + Nk))
            terms[f"bpr_{b}"] = bpr((u * i).sum(-1), (u * j).sum(-1), form=c.bpr_form)
            total = total + self.task_weights[b] * terms[f"bpr_{b}"]
            if c.reg_scope == "batch":  # the ego rows, gathered in the cascade (sets["reg"])
                reg = reg + 0.5 * l2(*enc["ego_rows"][k].tensor_split(3)) / len(Uk)
        if c.reg_scope == "all":
            reg = l2(*self.parameters())
        terms["reg"] = c.reg * reg
        total = total + terms["reg"]
        if cpa_ids is not None:
            users, items = cpa_ids
            T, G, glob = sets["target"], sets["glob"], enc["glob"]
            t_u, t_i = (enc["target"].index_select(0, torch.searchsorted(T, ids)) for ids in (users, n + items))
            g_u = g_i = None
            if c.cpa_negatives == "in_batch":
                g_u, g_i = ((glob[ids] if G is None else glob[torch.searchsorted(G, ids)]) for ids in (users, n + items))
            terms["cpa"] = self._cpa(t_u, t_i, g_u, g_i, glob, users, items)
            total = total + c.cpa_weight * terms["cpa"]
        terms["loss"] = total
        return terms

    # ------------------------------------------------------------------ floor (mbrec bench)
    def floor_products(self, graphs: Any, batch: Mapping[str, Any]) -> list[Any]:
        """CGL: every layer of every auxiliary block over all nodes (each feeds the next block);
        the target block's layers too, but its last layer only at the rows read from the target
        (its triplets, the CPA rows, and the auxiliary rows CGF feeds it to). Global LightGCN:
        its last layer only at the rows GCE and CPA read (all nodes with whole-table CPA
        negatives). Every product carries a gradient (everything trains). Dense: the CGF and GCE
        gates and the GCE projections, each at its auxiliary behavior's batch rows, and the CPA
        logits of users and of items (batch x batch, or batch x table)."""
        from mbrec.bench import DenseProduct, SparseProduct

        c, d, K = self.config, self.config.embedding_dim, len(self.order)
        trip = self._triplets(batch)
        cpa_ids = self._cpa_ids(trip)
        sets = self.row_sets(trip, cpa_ids)
        out: list[Any] = []
        for k, (b, g, L) in enumerate(zip(self.order, graphs["behavior"], self.layers)):
            last = sets["target"] if k == K - 1 else None
            out += [SparseProduct(f"CGL {b} layer {m + 1}", g, d, rows=last if m == L - 1 else None) for m in range(L)]
        if self.needs_global:
            G, Lg = sets["glob"], c.global_layers
            out += [SparseProduct(f"global layer {m + 1}", graphs["global"], d,
                                  rows=G if (G is not None and m == Lg - 1) else None) for m in range(Lg)]
        d_gate = 2 * d if c.gate_input == "aux_target" else d
        for k, b in enumerate(self.order[:-1]):
            r = len(sets["aux"][k])
            if c.use_cgf:
                out.append(DenseProduct(f"CGF gate {b}", r, d_gate, d))
            if c.use_gce:
                out += [DenseProduct(f"GCE gate {b}", r, d_gate, d), DenseProduct(f"GCE projection {b}", r, d, d)]
        if cpa_ids is not None:
            nu, ni = len(cpa_ids[0]), len(cpa_ids[1])
            full = c.cpa_negatives == "full"
            out += [DenseProduct("CPA users", nu, d, self.n_users if full else nu),
                    DenseProduct("CPA items", ni, d, self.n_items if full else ni)]
        return out


__all__ = ["BiGEL", "BiGELConfig", "Gate", "resolve_order"]
