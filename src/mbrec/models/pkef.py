"""PKEF: Parallel Knowledge Enhancement based Framework (Meng et al., CIKM'23; official TF code MC-CV/PKEF).

Two encoders share ``E0``: a parallel branch (one residual left-normalised GCN per behavior) and a
cascade branch (the same, with ``In_{k+1} = H^{L_k} + In_k``) whose every layer also adds 0.3 x
the row-wise projection of the parallel branch's layer output onto the cascade message. The PME
head gates (shared ``W_g``) the task's own expert with "projection experts": 0.01 x the
projection of behavior j's cascade output onto task k's; the orthogonal remainders score
"behavior k but not j" pairs as auxiliary losses. Loss per task k:
``3 lambda_k [BPR(parallel) + BPR(PME) + sum_j BPR(unique_j)] + 0.01 ||E, W_g||^2``.

Official-code behavior kept (options): ``users_per_epoch = 10000`` (only 10,000 random users per
epoch; ``null`` trains on all), ``lr_decay_steps = 39`` (10000 // 256, hard-coded in the code for
every dataset), ``layers = [4, 1, 1]``, tower sum x 300, and (set in ``configs/pkef/*.yaml``; the
model default is 1/K each) ``loss_weights = (0, 4/6, 2/6)``,
``unique_skip`` (behaviors left out of the unique pairs; Tmall's ``cart`` in the code).

More: ``docs/models/pkef.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError
from mbrec.graph import SparseGraph, propagate, to_device
from mbrec.losses import bpr, l2
from mbrec.models._experts import GatedTower, left_graphs, project, unique_matrices, xavier_table
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import PairSampler


class _Inject(torch.autograd.Function):
    """``msg + prev + inj * project(par, msg)`` (a cascade layer) in four row-wise passes
    forward and five backward instead of autograd's graph of the projection (the same values up
    to float rounding). With ``q = <par, m> / (|m|^2 + eps)``, ``G`` the incoming gradient and
    ``a = inj <G, m> / (|m|^2 + eps)``: ``d prev = G``, ``d m = G (1 + inj q) + a par - 2 a q m``,
    ``d par = a m``."""

    @staticmethod
    def forward(ctx, msg: torch.Tensor, prev: torch.Tensor, par: torch.Tensor, inj: float, eps: float) -> torch.Tensor:  # type: ignore[override]
        den = torch.linalg.vecdot(msg, msg).unsqueeze(-1) + eps
        q = torch.linalg.vecdot(par, msg).unsqueeze(-1) / den
        h = msg + prev
        h.addcmul_(inj * q, msg)
        ctx.save_for_backward(msg, par, q, den)
        ctx.inj = inj
        return h

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        msg, par, q, den = ctx.saved_tensors
        inj = ctx.inj
        a = torch.linalg.vecdot(g, msg).unsqueeze(-1).mul_(inj).div_(den)
        d_msg = g * (1.0 + inj * q)
        d_msg.addcmul_(a, par).addcmul_(a * q, msg, value=-2.0)
        d_par = a * msg if ctx.needs_input_grad[2] else None
        return d_msg, g, d_par, None, None


def inject(msg: torch.Tensor, prev: torch.Tensor, par: torch.Tensor, inj: float, eps: float = 1e-12) -> torch.Tensor:
    """``msg + prev + inj * project(par, msg)``: :class:`_Inject` when a gradient is needed,
    else the plain expression."""
    if torch.is_grad_enabled() and (msg.requires_grad or prev.requires_grad or par.requires_grad):
        return _Inject.apply(msg, prev, par, inj, eps)
    return msg + prev + inj * project(par, msg, eps)


@dataclass
class PKEFConfig(ModelConfig):
    layers: list[int] = option([4, 1, 1], min=0, doc="GCN layers per behavior (one entry per behavior, or one for all)")
    loss_weights: list[float] | None = option(None, min=0, doc="lambda_k per behavior (null: 1/K each); official (0, 4/6, 2/6)")
    injection: float = option(0.3, min=0, doc="cascade: + injection x proj(parallel layer output onto the message)")
    expert_scale: float = option(0.01, min=0, doc="factor of the PME projection experts and unique parts")
    tower: str = option("sum300", choices=("sum300", "mean"), doc="tower: sum over dims x tower_scale (code) or mean")
    tower_scale: float = option(300.0, gt=0, doc="factor of the sum300 tower")
    gate: str = option("shared", choices=("shared", "per_task"), doc="one gate W_g for all tasks (code) or one per task")
    reg: float = option(0.01, min=0, doc="L2 on the embedding tables and W_g")
    batch_users: int = option(256, min=1, doc="users per batch")
    max_pairs: int = option(40, min=1, doc="at most this many (positive, negative) pairs per user and behavior")
    users_per_epoch: int | None = option(10000, min=1, doc="random users per epoch (code: 10000; null: all)")
    unique_loss: bool = option(True, doc="auxiliary BPR on 'behavior k but not j' pairs with the orthogonal parts")
    unique_skip: list[str] = option([], doc="behaviors left out of the unique pairs (code: Tmall's cart)")


@register("pkef")
class PKEF(Model):
    config_class = PKEFConfig
    ln2_hint = ("with PKEF this is usually the shared gate's collapse onto the projection experts (docs/models/pkef.md), "
                "which recovers after about 4 (Taobao) to 8 (Beibei) epochs: keep train.patience at 0 or at least 12")
    train_defaults = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 100, "patience": 0, "lr_decay": 0.96,
                      "lr_decay_steps": 39}
    summary = "PKEF (CIKM'23): parallel + cascade GCN with projection injection, PME head with projection experts"

    def __init__(self, data: MultiBehaviorData, config: PKEFConfig) -> None:
        super().__init__(data, config)
        c, K, d = config, len(data.behaviors), config.embedding_dim
        self.K = K
        layers = [int(x) for x in c.layers]
        self.layers = layers * K if len(layers) == 1 else layers
        if len(self.layers) != K:
            raise ConfigError(f"model_args.layers has {len(layers)} entries for {K} behaviors {list(self.behaviors)}; "
                              "give one per behavior or a single value")
        w = c.loss_weights if c.loss_weights is not None else [1.0 / K] * K
        if len(w) != K:
            raise ConfigError(f"model_args.loss_weights has {len(w)} entries for {K} behaviors {list(self.behaviors)}")
        self.lam = [float(x) for x in w]
        self.user_emb = xavier_table(self.n_users, d)
        self.item_emb = xavier_table(self.n_items, d)
        self.head = GatedTower(d, K, n_gates=1 if c.gate == "shared" else K, tower=c.tower, scale=c.tower_scale)
        self.unique_pairs: list[tuple[int, int]] = (
            sorted(unique_matrices(data, c.unique_skip)) if c.unique_loss else []
        )

    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> list[SparseGraph]:
        return [to_device(m, device) for m in left_graphs(data, "own")]

    def make_sampler(self, data: MultiBehaviorData) -> PairSampler:
        c = self.config
        uniq = unique_matrices(data, c.unique_skip) if c.unique_loss else {}
        return PairSampler([data.train[b] for b in data.behaviors], batch_users=c.batch_users,
                           max_pairs=c.max_pairs, users_per_epoch=c.users_per_epoch, unique=uniq)

    # ------------------------------------------------------------------ encoder
    def forward(self, graphs: list[SparseGraph]) -> dict[str, list[torch.Tensor]]:  # type: ignore[override]
        """``p[k]`` (parallel) and ``c[k]`` (cascade) behavior outputs, ``[U+I, d]`` each."""
        return self._encode(graphs)

    def _encode(self, graphs: list[SparseGraph], rows: torch.Tensor | None = None, *,
                plain: bool = False) -> dict[str, list[torch.Tensor]]:
        """Both branches. ``rows=None``: ``p[k]``, ``c[k]`` at every node. ``rows`` (sorted unique
        node ids): ``p[k]`` (tasks with lambda_k > 0 only; others ``None``) and ``c[k]`` at those
        rows only, ``[len(rows), d]``; the last behavior's last layer (both branches) is then
        computed at those rows only (nothing downstream reads the rest), every other layer at all
        nodes (the cascade hands ``In_{k+1}`` over all nodes, the parallel layers inject into it).
        The cascade's first message ``A_1 E0`` equals the parallel branch's and is computed once.
        ``plain``: autograd through :func:`project` instead of :func:`inject`'s backward (tests)."""
        e0 = torch.cat([self.user_emb, self.item_emb], 0)
        last, inj = self.K - 1, self.config.injection

        def cut(k: int, n: int) -> bool:  # layer n of behavior k computed at `rows` only
            return rows is not None and k == last and n == self.layers[k] - 1

        par_layers, msg0 = [], None
        for k, g in enumerate(graphs):
            h, hs = e0, [e0]
            for n in range(self.layers[k]):
                if cut(k, n):
                    msg = propagate(g, h, rows)
                    h = msg + h[rows]
                else:
                    msg = propagate(g, h)
                    h = msg + h
                if k == 0 and n == 0:
                    msg0 = msg  # the cascade starts from E0 too: same product
                hs.append(h)
            par_layers.append(hs)
        cas_layers, inp = [], e0
        for k, g in enumerate(graphs):
            h, hs = inp, [inp]
            for n in range(self.layers[k]):
                if k == 0 and n == 0:
                    msg, prev = msg0, (h[rows] if cut(k, n) else h)
                elif cut(k, n):
                    msg, prev = propagate(g, h, rows), h[rows]
                else:
                    msg, prev = propagate(g, h), h
                par = par_layers[k][n + 1]
                h = msg + prev + inj * project(par, msg) if plain else inject(msg, prev, par, inj)
                hs.append(h)
            cas_layers.append(hs)
            if k < last:
                inp = h + inp
        if rows is None:
            return {"p": [torch.stack(hs).sum(0) for hs in par_layers],
                    "c": [torch.stack(hs).sum(0) for hs in cas_layers]}

        def at_rows(k: int, hs: list[torch.Tensor]) -> torch.Tensor:
            n_cut = 1 if k == last and self.layers[k] > 0 else 0
            return torch.stack([x[rows] for x in hs[: len(hs) - n_cut]] + hs[len(hs) - n_cut :]).sum(0)

        return {"p": [at_rows(k, hs) if self.lam[k] != 0.0 else None for k, hs in enumerate(par_layers)],
                "c": [at_rows(k, hs) for k, hs in enumerate(cas_layers)]}

    def projection_experts(self, c: list[torch.Tensor], k: int, rows: torch.Tensor | slice) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Task k at node ``rows``: PME experts [own, shared part of each j != k] and the unique
        (orthogonal) parts ``{j: 0.01 (c^j - proj)}``."""
        s = self.config.expert_scale
        ck = c[k][rows]
        experts, unique = [ck], {}
        for j in range(self.K):
            if j != k:
                cj = c[j][rows]
                proj = project(cj, ck)
                experts.append(s * proj)
                unique[j] = s * (cj - proj)
        return experts, unique

    # ------------------------------------------------------------------ loss
    def _reads(self, batch: Mapping[str, torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Node rows the loss reads of ``p[k]`` and of ``c[k]`` (lists of index tensors per k):
        task k (lambda_k > 0) reads ``p[k]`` and every ``c[j]`` (PME) at its users and items; its
        unique pair (k, j) reads ``c[k]`` and ``c[j]`` at that pair's users and items."""
        U = self.n_users
        p_reads: list[list[torch.Tensor]] = [[] for _ in range(self.K)]
        c_reads: list[list[torch.Tensor]] = [[] for _ in range(self.K)]
        for k in range(self.K):
            if self.lam[k] == 0.0:
                continue
            r = torch.cat([batch[f"users_{k}"], batch[f"pos_{k}"] + U, batch[f"neg_{k}"] + U])
            p_reads[k].append(r)
            for j in range(self.K):
                c_reads[j].append(r)
        for (k, j) in self.unique_pairs:
            if self.lam[k] == 0.0:
                continue
            r = torch.cat([batch[f"uusers_{k}_{j}"], batch[f"upos_{k}_{j}"] + U, batch[f"uneg_{k}_{j}"] + U])
            c_reads[k].append(r)
            c_reads[j].append(r)
        return p_reads, c_reads

    def loss(self, graphs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder runs at the node rows the loss reads (:meth:`_encode`); every term is
        computed on those compact rows and gathered per pair: the numbers of
        the plain full computation (``reference_loss`` in ``tests/test_pkef.py``) up to float rounding."""
        U, scale = self.n_users, self.head.tower_scale
        reg = self.config.reg * l2(self.user_emb, self.item_emb, self.head.weight)
        p_reads, c_reads = self._reads(batch)
        reads = [r for rs in p_reads + c_reads for r in rs]
        total = reg.new_zeros(())
        out: dict[str, torch.Tensor] = {}
        if reads:
            rows = torch.unique(torch.cat(reads))  # sorted
            emb = self._encode(graphs, rows)
            pos = torch.full((U + self.n_items,), -1, dtype=torch.long, device=rows.device)
            pos[rows] = torch.arange(len(rows), device=rows.device)
            p, c = emb["p"], emb["c"]
            for k, b in enumerate(self.behaviors):
                if self.lam[k] == 0.0:
                    continue
                u, pp, neg = batch[f"users_{k}"], batch[f"pos_{k}"], batch[f"neg_{k}"]
                uu, ii = pos[torch.cat([u, u])], pos[torch.cat([pp, neg]) + U]
                # scores are stacked [positives; negatives]
                par = bpr(*(scale * (p[k][uu] * p[k][ii]).sum(-1)).tensor_split(2))
                experts, unique = self.projection_experts(c, k, slice(None))  # at the compact rows
                exu, exi = [x[uu] for x in experts], [x[ii] for x in experts]
                scores, gate = self.head.pairs(k, exu[0], exi[0], list(zip(exu, exi)), return_gate=True)
                pme = bpr(*scores.tensor_split(2))
                # the gate's weight on the task's own expert: with the official defaults it falls to
                # ~0 for the target within the first ~100 steps and recovers later (results/pkef.md)
                out[f"gate_own_{b}"] = gate[:, 0].detach().mean() if len(gate) else gate.new_zeros(())
                uni = total.new_zeros(())
                for (kk, j) in self.unique_pairs:
                    if kk != k:
                        continue
                    u2, p2, n2 = batch[f"uusers_{k}_{j}"], batch[f"upos_{k}_{j}"], batch[f"uneg_{k}_{j}"]
                    uu2, ii2 = pos[torch.cat([u2, u2])], pos[torch.cat([p2, n2]) + U]
                    uni = uni + bpr(*(scale * (unique[j][uu2] * unique[j][ii2]).sum(-1)).tensor_split(2))
                w = 3.0 * self.lam[k]
                out[f"parallel_{b}"], out[f"pme_{b}"], out[f"unique_{b}"] = (w * par).detach(), (w * pme).detach(), (w * uni).detach()
                total = total + w * (par + pme + uni)
        out.update({"loss": total + reg, "bpr": total.detach(), "reg": reg.detach()})
        return out

    def floor_products(self, graphs: Any, batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """Every layer of both branches is one product on the behavior's own graph, width d, with
        a gradient (each reaches a trained task: the parallel layers through the injection into
        the cascade, the cascade through ``c[j]`` in every task's PME). All nodes, except the
        last behavior's last layer: its cascade output is read only at the loss's rows of
        ``c[K]`` and its parallel output there (injection) and at task K's rows of ``p[K]``.
        The cascade's first layer of the first behavior has the same input ``E0`` as the
        parallel one: one product. No task trained (all lambda 0): nothing."""
        from mbrec.bench import SparseProduct

        d, last = self.config.embedding_dim, self.K - 1
        p_reads, c_reads = self._reads(batch)
        if not c_reads[last]:
            return []
        n_c = int(torch.unique(torch.cat(c_reads[last])).numel())
        n_p = torch.unique(torch.cat(c_reads[last] + p_reads[last]))
        out: list[Any] = []
        for k, g in enumerate(graphs):
            b, L = self.behaviors[k], self.layers[k]
            for n in range(L):
                name = f"parallel {b} layer {n + 1}" + (" (= cascade layer 1: same input E0)" if k == 0 and n == 0 else "")
                out.append(SparseProduct(name, g, d, rows=n_p if k == last and n == L - 1 else None))
            for n in range(L):
                if not (k == 0 and n == 0):
                    out.append(SparseProduct(f"cascade {b} layer {n + 1}", g, d,
                                             rows=n_c if k == last and n == L - 1 else None))
        return out

    # ------------------------------------------------------------------ inference
    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return self.behaviors

    def score(self, emb: dict[str, list[torch.Tensor]], users: torch.Tensor, behavior: str) -> torch.Tensor:
        """PME score of ``behavior`` for ``users`` against every item."""
        self.check_behavior(behavior)
        k, U = self.behaviors.index(behavior), self.n_users
        exu, _ = self.projection_experts(emb["c"], k, users)
        exi, _ = self.projection_experts(emb["c"], k, slice(U, None))
        return self.head.full(k, exu[0], exi[0], list(zip(exu, exi)))
