"""COPF: Combinatorial Optimization Perspective based Framework (Zhai et al., KDD'25).

COGCN propagates each behavior k on the left-normalised cumulative multigraph of behaviors 1..k
(identity residual), handing ``In_{k+1} = H^{L_k} + In_k`` downstream (Eq. 6); DFME scores each
task with a shared softmax gate over the task's own expert and "behavior-fitting" experts (a
scaled mix of two behaviors propagated on the task's graph), plus a cosine InfoNCE between the
target and each auxiliary behavior. Loss: ``sum_k 3 lambda_k BPR_k + sum_k L_cl + mu ||E, W||^2``.

Paper vs official code (TF 1.15, github 1918190/COPF@44e2c45), as options (default first):

* ``fit_scale``: 0.1 (code: every fitting expert x 0.1) | 1.0 (paper Eq. 11).
* ``gate``: ``shared`` (code: one ``W_g`` for all tasks) | ``per_task`` (paper Eq. 13).
* ``tower``: ``sum300`` (code: sum over dims x 300) | ``mean`` (paper: "average").
* ``stop_gradient``: ``intended`` (default: Eq. 14, the fitting expert built from the target
  behavior is detached inside every auxiliary task; the project's decision, see
  ``docs/models/copf.md``) |
  ``released`` (what the released code runs: a loop-variable bug disables the detach; this
  equals Table 3's "w/o back.").
* ``alpha`` (``--index``, 0.1) scales the *other* behavior, ``beta`` (``--src``, 0.001) the task's
  own, in ``F0 = (alpha e^j + beta e^k) / 2``; ``F^{l+1} = A_k (F^l * r_k^l) + F^l`` on task k's
  own left-normalised graph (the code adds the unscaled ``F^l``; the paper scales it).

``variant`` selects a Table 3 row (paper definitions; where vague, our reading is stated):

* ``full``: COPF.
* ``P`` (no pre-behavior constraint): every behavior starts from ``E0`` (no hand-over).
* ``A`` (no in-behavior constraint): every behavior propagates on the multigraph of *all*
  behaviors (downstream ones included) instead of behaviors 1..k.
* ``D`` (no post-behavior constraint, no DFME): no decoupled outputs; every task scores the
  last behavior's COGCN output with the bilinear head; no contrastive loss (it would compare a
  representation with itself).
* ``F``: ``P`` and ``A`` together (every behavior is the same all-behavior GCN from ``E0``).
* ``C`` (strict cascade): ``B`` and ``H`` together.
* ``B`` (strict pre-behavior): ``In_{k+1} = H^{L_k}``, the last layer of behavior k only.
* ``H`` (strict in-behavior): behavior k propagates on its own graph only.
* ``wo_cogcn``: one LightGCN per behavior (own graph, symmetric normalisation, no residual,
  mean over layers), all from ``E0``.
* ``wo_dfme``: bilinear head ``s_k = scale * sum_d e_u^k * h_k * e_v^k`` (``h_k`` learnable, init 1);
  the contrastive loss is kept (Table 3's .0821 vs Table 5's COGCN+Bilinear .0629 on Beibei
  suggests it is; set ``gamma: 0`` for the Table 5 row).
* ``wo_con``: ``gamma = 0``.  ``wo_for``: other behaviors enter as their own experts
  ``e_u^j * e_v^j`` (no fitting), stop-gradient intended.  ``wo_back``: stop-gradient released.
  ``all_sg``: every fitting expert detached in every task (what the code does when the MTL
  layer count equals K).  ``wo_fit``: ``wo_for`` and ``wo_back`` together.

More: ``docs/models/copf.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.dense import matmul
from mbrec.errors import ConfigError
from mbrec.graph import SparseGraph, bipartite, normalize_sym, propagate, propagate_with_rows, to_device
from mbrec.losses import bpr, info_nce, l2
from mbrec.models._experts import GatedTower, left_graphs, xavier_table
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import PairSampler

#: variant -> overrides of (pre, graph, encoder, head, fitting, stop_gradient, contrastive)
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "P": {"pre": "none"},
    "A": {"graph": "all"},
    "D": {"head": "shared", "contrastive": False},
    "F": {"pre": "none", "graph": "all"},
    "C": {"pre": "strict", "graph": "own"},
    "B": {"pre": "strict"},
    "H": {"graph": "own"},
    "wo_cogcn": {"encoder": "lightgcn", "graph": "own", "pre": "none"},
    "wo_dfme": {"head": "bilinear"},
    "wo_con": {"contrastive": False},
    "wo_for": {"fitting": False},
    "wo_back": {"stop_gradient": "released"},
    "all_sg": {"stop_gradient": "all"},
    "wo_fit": {"fitting": False, "stop_gradient": "released"},
}


@dataclass
class COPFConfig(ModelConfig):
    layers: list[int] = option([1, 1, 1], min=0, doc="COGCN layers per behavior (one entry per behavior, or one for all)")
    mtl_layers: list[int] = option([1, 1, 1], min=0, doc="fitting-expert propagation layers per task (one per behavior, or one)")
    alpha: float = option(0.1, min=0, doc="--index: weight of the other behavior in F0")
    beta: float = option(0.001, min=0, doc="--src: weight of the task's own behavior in F0")
    fit_scale: float = option(0.1, min=0, doc="scale of every fitting expert: 0.1 (code) or 1.0 (paper Eq. 11)")
    gate: str = option("shared", choices=("shared", "per_task"), doc="one gate W_g for all tasks (code) or one per task (Eq. 13)")
    tower: str = option("sum300", choices=("sum300", "mean"), doc="tower: sum over dims x tower_scale (code) or mean (paper)")
    tower_scale: float = option(300.0, gt=0, doc="factor of the sum300 tower")
    stop_gradient: str = option("intended", choices=("intended", "released", "all"),
                                doc="target fitting expert detached in auxiliary tasks (Eq. 14), not (released code), or all")
    tau: float = option(0.1, gt=0, doc="InfoNCE temperature")
    gamma: float = option(1.0, min=0, doc="weight of the contrastive loss (0: none)")
    reg: float = option(0.01, min=0, doc="mu: L2 on the full embedding tables, W_g and W^l")
    loss_weights: list[float] | None = option(None, min=0, doc="lambda_k per behavior (null: 1/K each); Beibei (0, 2/6, 4/6)")
    batch_users: int = option(256, min=1, doc="users per batch")
    max_pairs: int = option(40, min=1, doc="at most this many (positive, negative) pairs per user and behavior")
    users_per_epoch: int | None = option(None, min=1, doc="random users per epoch (null: all)")
    variant: str = option("full", choices=tuple(VARIANTS), doc="Table 3 row (module docstring)")


def _mix(e_j: torch.Tensor, e_k: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``(alpha e_j + beta e_k) / 2`` in two passes (an add with a factor, an in-place scale)."""
    if alpha == 0:
        return (0.5 * beta) * e_k
    return torch.add(e_j, e_k, alpha=beta / alpha).mul_(0.5 * alpha)


@register("copf")
class COPF(Model):
    config_class = COPFConfig
    # no early stopping in the code (fixed 200 epochs); it tests every 3 epochs after epoch 90
    train_defaults = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 200, "patience": 0, "lr_decay": 0.96,
                      # the code uses n_users // 256 (Beibei 84, Taobao 60, others 39): set per config
                      "lr_decay_steps": 39}
    summary = "COPF (KDD'25): cumulative cascading GCN (COGCN) + distribution-fitting multi-expert head (DFME)"

    def __init__(self, data: MultiBehaviorData, config: COPFConfig) -> None:
        super().__init__(data, config)
        c = config
        K, d = len(self.behaviors), c.embedding_dim
        spec = {"pre": "cumulative", "graph": "cumulative", "encoder": "cogcn", "head": "dfme",
                "fitting": True, "stop_gradient": c.stop_gradient, "contrastive": c.gamma > 0}
        spec.update(VARIANTS[c.variant])
        self.spec = spec
        self.K = K
        self.layers = self._per_behavior(c.layers, "layers")
        self.mtl_layers = self._per_behavior(c.mtl_layers, "mtl_layers")
        w = c.loss_weights if c.loss_weights is not None else [1.0 / K] * K
        if len(w) != K:
            raise ConfigError(f"model_args.loss_weights has {len(w)} entries for {K} behaviors {list(self.behaviors)}")
        self.lam = [float(x) for x in w]
        self.user_emb = xavier_table(self.n_users, d)
        self.item_emb = xavier_table(self.n_items, d)
        self.beh_emb = xavier_table(K, d)  # modulation vectors r_k (not regularised)
        n_w = max(self.mtl_layers) - 1
        self.mtl_w = nn.ParameterList([xavier_table(d, d) for _ in range(n_w)])
        self.head = GatedTower(d, K, n_gates=1 if c.gate == "shared" else K, tower=c.tower, scale=c.tower_scale)
        self.bilinear = nn.Parameter(torch.ones(K, d)) if spec["head"] in ("bilinear", "shared") else None

    def _per_behavior(self, v: list[int], name: str) -> list[int]:
        v = [int(x) for x in v]
        if len(v) == 1:
            v = v * self.K
        if len(v) != self.K:
            raise ConfigError(f"model_args.{name} has {len(v)} entries for {self.K} behaviors {list(self.behaviors)}; "
                              "give one per behavior or a single value")
        return v

    # ------------------------------------------------------------------ graphs, sampler
    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> dict[str, list[SparseGraph]]:
        if self.spec["encoder"] == "lightgcn":
            enc = [normalize_sym(bipartite(data.train[b])) for b in data.behaviors]
        else:
            enc = left_graphs(data, self.spec["graph"])
        own = left_graphs(data, "own")
        return {"enc": [to_device(m, device) for m in enc], "own": [to_device(m, device) for m in own]}

    def make_sampler(self, data: MultiBehaviorData) -> PairSampler:
        c = self.config
        return PairSampler([data.train[b] for b in data.behaviors], batch_users=c.batch_users,
                           max_pairs=c.max_pairs, users_per_epoch=c.users_per_epoch)

    # ------------------------------------------------------------------ encoder + experts
    def encode(self, graphs: Mapping[str, list[SparseGraph]]) -> list[torch.Tensor]:
        """COGCN (or a variant's encoder): behavior outputs ``e^{k,*}`` as ``[U+I, d]``."""
        e0 = torch.cat([self.user_emb, self.item_emb], 0)
        outs, inp = [], e0
        for k, g in enumerate(graphs["enc"]):
            h = e0 if self.spec["pre"] == "none" else inp
            hs = [h]
            for _ in range(self.layers[k]):
                h = g @ h if self.spec["encoder"] == "lightgcn" else g @ h + h
                hs.append(h)
            total = hs[0]
            for x in hs[1:]:  # in layer order, without stacking the layers into one [L+1, N, d] copy
                total = total + x
            outs.append(total / len(hs) if self.spec["encoder"] == "lightgcn" else total)
            inp = h if self.spec["pre"] == "strict" else h + inp
        return outs

    def fitting_experts(
        self, graphs: Mapping[str, list[SparseGraph]], e: list[torch.Tensor], tasks: list[int] | None = None,
        rows: Mapping[int, torch.Tensor] | None = None,
    ) -> dict[tuple[int, int], torch.Tensor]:
        """``O^{k<-j}`` for each task k (default: all) and other behavior j. The K-1 experts of one
        task share task k's graph: one product per layer on ``[N, (K-1) d]``. Without ``rows``
        each expert is ``[U+I, d]`` (all nodes). With ``rows[k]`` (the sorted nodes task k's loss
        reads) the last layer is computed at those rows only and task k's experts are the
        compact ``[len(rows[k]), d]`` rows (gather them with :meth:`_row_map`), and the experts a
        training step detaches (:meth:`_detached`) come back detached."""
        c, K, d = self.config, self.K, self.config.embedding_dim
        out: dict[tuple[int, int], torch.Tensor] = {}
        for k in range(K) if tasks is None else tasks:
            others = [j for j in range(K) if j != k]
            # training path (rows given): the experts a step detaches go last and come back
            # detached; the last layer's backward then covers only the others' columns
            frozen = [j for j in others if rows is not None and self._detached(j)]
            order = [j for j in others if j not in frozen] + frozen
            live, fixed = self._first_inputs(e, k, order[: len(order) - len(frozen)], frozen)
            S = None if rows is None else rows.get(k)
            total = self._expert_layers(graphs["own"][k], k, live, fixed, S)
            for n, j in enumerate(order):
                x = c.fit_scale * total[:, n * d : (n + 1) * d]
                out[(k, j)] = x.detach() if j in frozen else x
        return out

    def _first_inputs(self, e: list[torch.Tensor], k: int, live: list[int], frozen: list[int],
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Task k's ``F0 = (alpha e^j + beta e^k) / 2`` for its experts j, side by side: those that
        train and those a step detaches (built without a graph); either may be None."""
        c = self.config

        def mixes(js: list[int]) -> torch.Tensor | None:
            parts = [_mix(e[j], e[k], c.alpha, c.beta) for j in js]
            return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        with torch.no_grad():
            fixed = mixes(frozen)
        return mixes(live), fixed

    def _expert_layers(self, g: SparseGraph, k: int, live: torch.Tensor | None, fixed: torch.Tensor | None,
                       S: torch.Tensor | None) -> torch.Tensor:
        """Task k's fitting layers ``F^{l+1} = A (F^l * r_l) + F^l``, summed over ``l = 0..L``, on
        ``[live, fixed]`` (all nodes, or at ``S`` only, with the last layer computed there alone).
        One layer at ``S`` (the configs' case): the product and the gather of ``F0`` at ``S`` come
        from one function whose backward has no ``[N, width]`` scatter buffer."""
        L, r = self.mtl_layers[k], self.beh_emb[k]
        n_other = self.K - 1
        if S is not None and L == 1 and live is not None:
            # A (F * r) = (A F) * r (r scales columns): the scale runs on the read rows only
            product, f_S = propagate_with_rows(g, live, S, frozen=fixed)
            if fixed is not None:
                f_S = torch.cat([f_S, fixed.index_select(0, S)], 1)
            return torch.addcmul(2.0 * f_S, product, r.repeat(n_other))
        f = live if fixed is None else fixed if live is None else torch.cat([live, fixed], 1)
        total = f
        for layer in range(L):
            if layer > 0:
                r = r @ self.mtl_w[layer - 1]
            rr = r.repeat(n_other)
            if S is not None and layer == L - 1:  # only the rows the loss reads
                f_S = f[S]
                base = 2.0 * f_S if total is f else total[S] + f_S
                return torch.addcmul(base, propagate(g, f, S), rr)
            f = propagate(g, f * rr) + f
            total = total + f
        return total if S is None else total[S]

    def _detached(self, j: int) -> bool:
        """Whether a training step detaches behavior j's fitting expert (the stop-gradient setting:
        ``intended`` the target's, ``all`` every one)."""
        sg = self.spec["stop_gradient"]
        return (sg == "intended" and j == self.K - 1) or (sg == "all" and self.spec["fitting"])

    def _row_map(self, rows: torch.Tensor) -> torch.Tensor:
        """``where[node]`` = the node's position in the sorted ``rows`` (-1 elsewhere)."""
        where = torch.full((self.n_users + self.n_items,), -1, dtype=torch.long, device=rows.device)
        where[rows] = torch.arange(len(rows), device=rows.device)
        return where

    def forward(self, graphs: Mapping[str, list[SparseGraph]], tasks: list[int] | None = None,  # type: ignore[override]
                rows: Mapping[int, torch.Tensor] | None = None) -> dict[str, Any]:
        """``e``: behavior outputs; ``fit``: fitting experts of ``tasks`` (default all; training
        asks only for tasks with lambda_k > 0, the others' experts reach no loss term), at
        ``rows`` (see :meth:`fitting_experts`)."""
        e = self.encode(graphs)
        fit = self.fitting_experts(graphs, e, tasks, rows) if self.spec["head"] == "dfme" and self.spec["fitting"] else {}
        return {"e": e, "fit": fit}

    def _experts(self, emb: dict[str, Any], k: int, train: bool) -> list[torch.Tensor]:
        """Expert node matrices of task k, ordered [own, other j ascending], detached per spec."""
        e, fit, K = emb["e"], emb["fit"], self.K
        ex = [e[k]]
        for j in range(K):
            if j == k:
                continue
            x = fit[(k, j)] if self.spec["fitting"] else e[j]
            if train and self._detached(j):
                x = x.detach()
            ex.append(x)
        return ex

    def _pair_scores(self, emb: dict[str, Any], k: int, users: torch.Tensor, items: torch.Tensor,
                     where: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of aligned (user, item) pairs for task k. ``where`` (:meth:`_row_map`) locates
        the nodes in task k's compact fitting experts (training); the own expert's rows are the
        gate's inputs, gathered once."""
        U = self.n_users
        if self.spec["head"] != "dfme":
            e = emb["e"][-1 if self.spec["head"] == "shared" else k]
            return self.head.tower_scale * (e[users] * self.bilinear[k] * e[U + items]).sum(-1)
        e = emb["e"][k]
        eu, ev = e[users], e[U + items]
        at_u, at_i = (users, U + items) if where is None else (where[users], where[U + items])
        pairs = [(eu, ev)]
        for x in self._experts(emb, k, train=True)[1:]:
            full = x.shape[0] == U + self.n_items  # a behavior output, or experts of all nodes
            pairs.append((x[users], x[U + items]) if full else (x[at_u], x[at_i]))
        return self.head.pairs(k, eu, ev, pairs)

    def embed(self, graphs: Any, behaviors: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Evaluation: the fitting experts of the evaluated behaviors' tasks only."""
        tasks = None if behaviors is None else [self.behaviors.index(b) for b in behaviors]
        return self(graphs, tasks)

    # ------------------------------------------------------------------ loss
    def contrastive(self, emb: dict[str, Any], users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Eq. 8 as coded, for every auxiliary k: rows = the target batch's positive pairs;
        anchor ``cos(e^K_u, e^k_u)/tau`` against ``e^k`` of all users (and items), summed over
        rows, x gamma / |U|. Repeated rows are computed once and weighted by their count."""
        c, U = self.config, self.n_users
        e = emb["e"]
        total = e[0].new_zeros(())
        for ids, offset, n in ((users, 0, U), (items, U, self.n_items)):
            uniq, counts = torch.unique(ids, return_counts=True)
            anchor = F.normalize(e[-1][uniq + offset], dim=1)
            for k in range(self.K - 1):
                allk = F.normalize(e[k][offset : offset + n], dim=1)
                rows = info_nce(anchor, None, c.tau, negatives="table", candidates=allk, targets=uniq,
                                normalize=False, reduction="none")
                total = total + (rows * counts).sum()
        return c.gamma * total / U

    def loss(self, graphs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tasks = [k for k in range(self.K) if self.lam[k] != 0.0]
        U = self.n_users
        rows = {k: torch.unique(torch.cat([batch[f"users_{k}"], U + batch[f"pos_{k}"], U + batch[f"neg_{k}"]]))
                for k in tasks}
        emb = self(graphs, tasks, rows)
        out: dict[str, torch.Tensor] = {}
        bpr_total = emb["e"][0].new_zeros(())
        for k, b in enumerate(self.behaviors):
            if self.lam[k] == 0.0:
                continue  # zero weight: no gradient (the code computes it and multiplies by 0)
            u, p, n = batch[f"users_{k}"], batch[f"pos_{k}"], batch[f"neg_{k}"]
            s = self._pair_scores(emb, k, torch.cat([u, u]), torch.cat([p, n]), self._row_map(rows[k]))
            term = 3.0 * self.lam[k] * bpr(*s.tensor_split(2))  # s = [positive scores; negative scores]
            out[f"bpr_{b}"] = term.detach()
            bpr_total = bpr_total + term
        K = self.K - 1
        cl = (self.contrastive(emb, batch[f"users_{K}"], batch[f"pos_{K}"])
              if self.spec["contrastive"] and self.config.gamma > 0 and self.K > 1 else bpr_total.new_zeros(()))
        reg = self.config.reg * l2(self.user_emb, self.item_emb, self.head.weight, *self.mtl_w)
        out.update({"loss": bpr_total + cl + reg, "bpr": bpr_total.detach(), "cl": cl.detach(), "reg": reg.detach()})
        return out

    # ------------------------------------------------------------------ floor (mbrec bench)
    def floor_products(self, graphs: Any, batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """Encoder: every layer of every behavior over all nodes (the contrastive loss reads the
        auxiliary outputs for all users and items, the fitting experts all of them). Fitting
        experts of the trained tasks: earlier layers over all nodes, the last only at the task's
        batch rows; a detached expert (stop-gradient) carries no gradient. Contrastive: the
        target batch's users and items against all users and all items of each auxiliary."""
        from mbrec.bench import DenseProduct, SparseProduct

        d, K, U = self.config.embedding_dim, self.K, self.n_users
        out: list[Any] = []
        for k, g in enumerate(graphs["enc"]):
            out += [SparseProduct(f"encoder {self.behaviors[k]} layer {n + 1}", g, d) for n in range(self.layers[k])]
        if self.spec["head"] == "dfme" and self.spec["fitting"]:
            for k in (k for k in range(K) if self.lam[k] != 0.0):
                others = [j for j in range(K) if j != k]
                live = [j for j in others if not self._detached(j)]
                rows = torch.unique(torch.cat([batch[f"users_{k}"], U + batch[f"pos_{k}"], U + batch[f"neg_{k}"]]))
                L = self.mtl_layers[k]
                for n in range(L):
                    out.append(SparseProduct(f"fitting experts {self.behaviors[k]} layer {n + 1}", graphs["own"][k],
                                             len(others) * d, rows=rows if n == L - 1 else None,
                                             backward=bool(live), backward_width=len(live) * d))
        if self.spec["contrastive"] and self.config.gamma > 0 and K > 1:
            nu = int(torch.unique(batch[f"users_{K - 1}"]).numel())
            ni = int(torch.unique(batch[f"pos_{K - 1}"]).numel())
            for k in range(K - 1):
                out.append(DenseProduct(f"contrastive users x all users ({self.behaviors[k]})", nu, d, U))
                out.append(DenseProduct(f"contrastive items x all items ({self.behaviors[k]})", ni, d, self.n_items))
        return out

    # ------------------------------------------------------------------ inference
    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return self.behaviors

    def score(self, emb: dict[str, Any], users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        k, U = self.behaviors.index(behavior), self.n_users
        if self.spec["head"] != "dfme":
            e = emb["e"][-1 if self.spec["head"] == "shared" else k]
            return self.head.tower_scale * matmul(e[users] * self.bilinear[k], e[U:].T)
        e = emb["e"][k]
        ex = self._experts(emb, k, train=False)
        return self.head.full(k, e[users], e[U:], [(x[users], x[U:]) for x in ex])
