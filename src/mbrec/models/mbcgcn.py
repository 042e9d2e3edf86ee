"""MB-CGCN: cascading graph convolution over behaviors.

Paper: Cheng et al., "Multi-Behavior Recommendation with Cascading Graph Convolution Networks",
WWW 2023. Official code: github SS-00-SS/MBCGCN (TensorFlow 1.14), read at ``931f9c1``.

What it does:
  1. one LightGCN block per behavior, chained upstream -> downstream (view -> cart -> buy);
     each block propagates over that behavior's graph and outputs the mean of layers 0..L_b;
  2. the next block starts from the previous output times a linear transfer matrix (no bias,
     no activation; separate d x d matrices for users and items);
  3. the final embedding is the **sum** of the block outputs; only the target BPR is trained.

Official-code behaviour kept as the default (and the switches):
  * ``layers``: per-behavior depths. The README's Taobao-15k ("Tmall") command uses view 2,
    cart 4, buy 3 (the default here); its Beibei command uses view 3, cart 4, buy 3.
  * ``sampler="random_users"`` (default): the NGCF/LightGCN-TF sampler, ``n_train // batch + 1``
    batches per epoch, each of ``batch_size`` distinct random users (with at least one target
    item) with one positive and one uniform negative outside the user's target items.
    ``sampler="interactions"``: every target interaction once per epoch (PyTorch LightGCN).
  * Regulariser: ``reg_weight * (1/2 sum of squares of the batch's ego embeddings and of the
    transfer matrices) / batch``, as coded (the paper states plain L2 on all parameters).
  * ``pretrain_epochs > 0``: pretrain on the first behavior's graph (``pretrain_layers`` layers,
    same BPR + ego-L2 loss, Adam) and start the first block from the pretrained ego embeddings,
    as the README does (it pretrains up to 1000 epochs on view; default here 0 = random init).
    ``pretrain_model`` picks the pretraining network:
      - ``lightgcn`` (default): mean of ``E, ÂE, ..., Â^L E``: the first ``_create_gcn_embed`` of
        ``GCN.py``, and the pretraining ``docs/models/mbcgcn.md`` specifies;
      - ``gcn``: what the official ``GCN.py`` runs as Python executes it. The file defines
        ``_create_gcn_embed`` twice and the second definition wins: ``E_{k+1} =
        leaky_relu(Â E_k W_k + b_k)`` (slope 0.2, TF's default; ``W_k``, ``b_k`` ~ N(0, 0.01²),
        not regularised) and the **concatenation** ``[E_0 | E_1 | ... | E_L]`` is scored. Only
        the ego table ``E_0`` is handed to MB-CGCN.
    Either way mbrec runs exactly ``pretrain_epochs`` and hands over the last table. ``GCN.py``
    instead tests recall@20 on the view test file every 10 epochs, stops after 10 checks without
    a gain and saves the best; and it saves under ``weights/view/GCN/...`` while ``MBCGCN.py``
    loads from ``weights/<behavior>/MBCGCN/...`` (and fails on a missing one), so the released
    scripts only connect after moving the checkpoint by hand.
    Measured cost and effect: ``results/baselines.md``, ``benchmarks/baselines.md``.
  * Scores only the target behavior.

Training computes only what the BPR reads: the last block's last layer (and the pretraining
network's last layer) at the batch's distinct user and item rows; every other layer runs over all
nodes (it feeds the next layer or block). ``MBCGCN.floor_products`` states one training step's
floor for ``mbrec bench``; ``_PretrainObjective.floor_products`` one pretraining step's.

Samplers: :class:`mbrec.sampling.RandomUserSampler`, :class:`mbrec.sampling.InteractionSampler`.
More: ``docs/models/mbcgcn.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.dense import matmul
from mbrec.errors import ConfigError
from mbrec.graph import SparseGraph, bipartite, lightgcn_stack, node_rows, normalize_sym, propagate, split_nodes, to_device
from mbrec.losses import bpr, l2
from mbrec.models.base import Model, ModelConfig, register
from mbrec.optim import adam
from mbrec.options import option
from mbrec.sampling import InteractionSampler, RandomUserSampler


@dataclass
class MBCGCNConfig(ModelConfig):
    """MB-CGCN hyperparameters (defaults: the official README / argparse)."""

    layers: Sequence[int] | int = option((2, 4, 3), min=0,
                                         doc="LightGCN layers per behavior, upstream -> downstream (one int: every block)")
    reg_weight: float = option(1e-4, min=0, doc="L2 weight on the batch's ego embeddings and the transfer matrices (regs)")
    batch_size: int = option(2048, min=1, doc="triplets (users) per batch")
    init_std: float = option(0.01, gt=0, doc="standard deviation of the normal init of embeddings and transfer matrices")
    sampler: str = option("random_users", choices=("random_users", "interactions"),
                          doc="official TF sampler (random users) or one pass over the target pairs")
    pretrain_epochs: int = option(0, min=0, doc="epochs of pretraining of the first block on the first behavior (0: none)")
    pretrain_layers: int = option(3, min=0, doc="layers of the pretraining network")
    pretrain_lr: float = option(1e-3, gt=0, doc="Adam learning rate of the pretraining")
    pretrain_model: str = option("lightgcn", choices=("lightgcn", "gcn"),
                                 doc="pretraining network: LightGCN, or GCN.py as Python executes it (module docstring)")


def lightgcn_block(graph: SparseGraph, x: torch.Tensor, n_layers: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """LightGCN propagation: mean of ``x, Âx, ..., Â^L x`` (only at ``rows`` when given; the last
    layer is then computed for those rows only): :func:`mbrec.models.lightgcn.lightgcn_stack`."""
    return lightgcn_stack(graph, x, n_layers, rows=rows)


class BatchRows:
    """The node rows a triplet batch ``{users, pos, neg}`` reads: ``rows`` (sorted distinct node
    indices, items offset by ``n_users``) and where each of the batch's users, positives and
    negatives sits in it."""

    def __init__(self, batch: Mapping[str, torch.Tensor], n_users: int) -> None:
        self.users, self.pos, self.neg = batch["users"].long(), batch["pos"].long(), batch["neg"].long()
        self.rows, (self.at_users, self.at_pos, self.at_neg) = node_rows(
            self.users, n_users + self.pos, n_users + self.neg)


class PretrainLightGCN(nn.Module):
    """LightGCN pretraining network: the mean of ``E, ÂE, ..., Â^L E``; ``E`` is the ego table."""

    label = "LightGCN"

    def __init__(self, ego: torch.Tensor, n_layers: int, init_std: float) -> None:
        super().__init__()
        self.ego = nn.Parameter(ego)
        self.n_layers = n_layers

    def forward(self, graph: SparseGraph, rows: torch.Tensor | None = None) -> torch.Tensor:
        return lightgcn_block(graph, self.ego, self.n_layers, rows)

    def floor_products(self, graph: SparseGraph, rows: torch.Tensor) -> list[Any]:
        """``n_layers`` products with a gradient to the ego table, the last at the batch's rows."""
        from mbrec.bench import SparseProduct

        d, L = self.ego.shape[1], self.n_layers
        return [SparseProduct(f"pretrain layer {n + 1}", graph, d, rows=rows if n == L - 1 else None)
                for n in range(L)]


class PretrainGCN(nn.Module):
    """The official ``GCN.py`` pretraining network as Python runs it: ``E_{k+1} = leaky_relu(Â E_k
    W_k + b_k)`` and the concatenation of ``E_0..E_L``; ``E_0`` is the ego table it pretrains."""

    label = "GCN (official GCN.py as executed)"

    def __init__(self, ego: torch.Tensor, n_layers: int, init_std: float) -> None:
        super().__init__()
        d = ego.shape[1]
        self.ego = nn.Parameter(ego)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(d, d, device=ego.device) * init_std) for _ in range(n_layers)])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.randn(1, d, device=ego.device) * init_std) for _ in range(n_layers)])

    def forward(self, graph: SparseGraph, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[E_0 | ... | E_L]``, or only its ``rows`` (the last layer computed only there)."""
        h = self.ego
        outs = [h]
        L = len(self.weights)
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            at = rows if n == L - 1 else None
            h = torch.nn.functional.leaky_relu(propagate(graph, h, at) @ w + b, negative_slope=0.2)
            outs.append(h)
        if rows is not None:  # E_L is already at rows (unless there is no layer)
            outs = [o[rows] for o in outs[:L]] + outs[L:] if L > 0 else [outs[0][rows]]
        return torch.cat(outs, 1)

    def floor_products(self, graph: SparseGraph, rows: torch.Tensor) -> list[Any]:
        """Per layer ``Â E_k`` (gradient: ``E_0`` and every ``W_k`` train) and ``(Â E_k) W_k``; the
        last layer only at the batch's rows."""
        from mbrec.bench import DenseProduct, SparseProduct

        n_nodes, d, L = self.ego.shape[0], self.ego.shape[1], len(self.weights)
        out: list[Any] = []
        for n in range(L):
            r = rows if n == L - 1 else None
            out += [SparseProduct(f"pretrain layer {n + 1}", graph, d, rows=r),
                    DenseProduct(f"pretrain layer {n + 1} weight", n_nodes if r is None else len(r), d, d)]
        return out


_PRETRAIN_NETS = {"lightgcn": PretrainLightGCN, "gcn": PretrainGCN}


class _PretrainObjective(nn.Module):
    """The pretraining network with the loss the trainer's ``train_epoch`` calls: BPR + L2 on the
    first behavior's graph (``graphs[0]``)."""

    def __init__(self, net: nn.Module, n_users: int, reg_weight: float) -> None:
        super().__init__()
        self.net, self.n_users, self.reg_weight = net, n_users, reg_weight

    def loss(self, graphs: list[SparseGraph], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = BatchRows(batch, self.n_users)
        out = self.net(graphs[0], r.rows)  # only the rows the loss reads
        eu, ei = split_nodes(self.net.ego, self.n_users)
        return bpr_l2_rows(out[r.at_users], out[r.at_pos], out[r.at_neg],
                           [eu[r.users], ei[r.pos], ei[r.neg]], self.reg_weight)

    def floor_products(self, graphs: list[SparseGraph], batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """One pretraining step's floor (the network's own products on the first graph)."""
        return self.net.floor_products(graphs[0], batch_rows(batch, self.n_users))


def batch_rows(batch: Mapping[str, torch.Tensor], n_users: int) -> torch.Tensor:
    """Distinct node rows a triplet batch's loss reads: its users and its positive/negative items
    (items offset by ``n_users``)."""
    items = torch.cat([batch["pos"].long(), batch["neg"].long()])
    return torch.unique(torch.cat([batch["users"].long(), n_users + items]))


def make_triplet_sampler(kind: str, R: sp.csr_matrix, batch_size: int) -> RandomUserSampler | InteractionSampler:
    """The ``sampler`` option's sampler over the pairs of ``R``."""
    if kind == "interactions":
        return InteractionSampler([R], batch_size)
    return RandomUserSampler(R, batch_size)


def bpr_l2_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    ego_user: torch.Tensor,
    ego_item: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    reg_weight: float,
    extra: Sequence[torch.Tensor] = (),
) -> dict[str, torch.Tensor]:
    """Softplus BPR on final embeddings + ``reg_weight * ½(‖ego rows‖² + ‖extra‖²) / batch``."""
    users, pos, neg = batch["users"].long(), batch["pos"].long(), batch["neg"].long()
    return bpr_l2_rows(user_emb[users], item_emb[pos], item_emb[neg], [ego_user[users], ego_item[pos], ego_item[neg]],
                       reg_weight, extra)


def bpr_l2_rows(
    u: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    ego: Sequence[torch.Tensor],
    reg_weight: float,
    extra: Sequence[torch.Tensor] = (),
) -> dict[str, torch.Tensor]:
    """:func:`bpr_l2_loss` on gathered rows: final embeddings of the batch's users, positives and
    negatives, and their ego rows ``[users, pos, neg]``."""
    loss_bpr = bpr((u * i).sum(-1), (u * j).sum(-1), form="softplus")
    reg = reg_weight * 0.5 * l2(*ego, *extra) / len(u)
    return {"loss": loss_bpr + reg, "bpr": loss_bpr, "reg": reg}


@register("mbcgcn")
class MBCGCN(Model):
    """Cascading LightGCN blocks with linear transfer between behaviors (MB-CGCN, WWW'23)."""

    config_class = MBCGCNConfig
    train_defaults: dict[str, Any] = {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "epochs": 1000,
        # official: test every 5 epochs, stop after 5 checks without improvement
        "patience": 25,
        "eval_every": 5,
        "eval_start": 5,
        "min_epochs": 50,  # no-config runs only: the paper configs set 0
    }
    summary = "MB-CGCN: LightGCN blocks chained over behaviors with linear transfers, target BPR"

    def __init__(self, data: MultiBehaviorData, config: MBCGCNConfig) -> None:
        super().__init__(data, config)
        self.config: MBCGCNConfig = config
        n_b = len(self.behaviors)
        layers = (config.layers,) if isinstance(config.layers, (int, np.integer)) else tuple(config.layers)
        self.layers: tuple[int, ...] = tuple(int(x) for x in (layers * n_b if len(layers) == 1 else layers))
        if len(self.layers) != n_b:
            raise ConfigError(
                f"model_args.layers = {list(self.layers)} needs one non-negative depth per behavior "
                f"{list(self.behaviors)} (or a single int)"
            )
        d, std = config.embedding_dim, config.init_std
        self.user_emb = nn.Parameter(torch.randn(self.n_users, d) * std)
        self.item_emb = nn.Parameter(torch.randn(self.n_items, d) * std)
        self.w_user = nn.ParameterList([nn.Parameter(torch.randn(d, d) * std) for _ in range(n_b - 1)])
        self.w_item = nn.ParameterList([nn.Parameter(torch.randn(d, d) * std) for _ in range(n_b - 1)])

    # -- graphs, sampling, loss -------------------------------------------------
    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> list[SparseGraph]:
        """One ``D^{-1/2} A D^{-1/2}`` (no self-loops) per behavior, in behavior order."""
        return [to_device(normalize_sym(bipartite(data.train[b])), device, symmetric=True) for b in self.behaviors]

    def make_sampler(self, data: MultiBehaviorData) -> RandomUserSampler | InteractionSampler:
        return make_triplet_sampler(self.config.sampler, data.train[self.target], self.config.batch_size)

    def loss(self, graphs: list[SparseGraph], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = BatchRows(batch, self.n_users)
        final = self.cascade(graphs, r.rows)  # only the rows the loss reads
        return bpr_l2_rows(final[r.at_users], final[r.at_pos], final[r.at_neg],
                           [self.user_emb[r.users], self.item_emb[r.pos], self.item_emb[r.neg]],
                           self.config.reg_weight, extra=[*self.w_user, *self.w_item])

    # -- floor (mbrec bench) ----------------------------------------------------------
    def floor_products(self, graphs: list[SparseGraph], batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """Every layer of every block over all nodes (a block's output feeds the next block's
        propagation through the transfer), except the last block's last layer, read only at the
        batch's rows (distinct users, distinct positive and negative items: the final embedding
        is read nowhere else). Every product carries a gradient (the first block starts from the
        trained ego table). Dense: the user and item transfers of every block but the last."""
        from mbrec.bench import DenseProduct, SparseProduct

        d, K = self.config.embedding_dim, len(self.behaviors)
        rows = batch_rows(batch, self.n_users)
        out: list[Any] = []
        for k, g in enumerate(graphs):
            L = self.layers[k]
            out += [SparseProduct(f"block {self.behaviors[k]} layer {n + 1}", g, d,
                                  rows=rows if (k == K - 1 and n == L - 1) else None) for n in range(L)]
            if k < K - 1:
                out += [DenseProduct(f"transfer {self.behaviors[k]} users", self.n_users, d, d),
                        DenseProduct(f"transfer {self.behaviors[k]} items", self.n_items, d, d)]
        return out

    # -- inference --------------------------------------------------------------
    def cascade(self, graphs: list[SparseGraph], rows: torch.Tensor | None = None,
                blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The sum of the block outputs, ``[U+I, d]``, or only its ``rows``: every block but the
        last runs over all nodes (the next block propagates its transfer), the last block's
        last layer only at ``rows``. ``blocks`` (a list) receives each block's output."""
        x = torch.cat([self.user_emb, self.item_emb], 0)
        total: torch.Tensor | None = None
        last = len(self.behaviors) - 1
        for k, g in enumerate(graphs):
            out = lightgcn_block(g, x, self.layers[k], rows if k == last else None)
            if blocks is not None:
                blocks.append(out)
            part = out if (rows is None or k == last) else out[rows]
            total = part if total is None else total + part
            if k < last:
                u, i = split_nodes(out, self.n_users)
                x = torch.cat([u @ self.w_user[k], i @ self.w_item[k]], 0)
        assert total is not None
        return total

    def forward(self, graphs: list[SparseGraph]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"user", "item"}``: the sum of the block outputs; ``"blocks"``: each block's output."""
        outs: list[torch.Tensor] = []
        u, i = split_nodes(self.cascade(graphs, blocks=outs), self.n_users)
        return {"user": u, "item": i, "blocks": outs}

    def score(self, emb: dict[str, torch.Tensor], users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        return matmul(emb["user"][users], emb["item"].T)

    # -- pretraining ------------------------------------------------------------
    def pretraining(self, data: MultiBehaviorData, device: torch.device) -> tuple[
            "_PretrainObjective", RandomUserSampler | InteractionSampler, torch.optim.Optimizer]:
        """A fresh pretraining setup: the objective (network + loss, with ``loss`` and
        ``floor_products`` like a model's, over ``graphs[0]``), its sampler on the first
        behavior and its Adam. :meth:`on_train_start` runs it with the trainer's ``train_epoch``;
        ``mbrec bench`` can time its steps against ``objective.floor_products``."""
        cfg = self.config
        sampler = make_triplet_sampler(cfg.sampler, data.train[self.behaviors[0]], cfg.batch_size)
        ego = torch.cat([torch.randn(self.n_users, cfg.embedding_dim, device=device) * cfg.init_std,
                         torch.randn(self.n_items, cfg.embedding_dim, device=device) * cfg.init_std])
        net = _PRETRAIN_NETS[cfg.pretrain_model](ego, cfg.pretrain_layers, cfg.init_std)
        opt = adam(net.parameters(), cfg.pretrain_lr)
        return _PretrainObjective(net, self.n_users, cfg.reg_weight), sampler, opt

    def on_train_start(
        self,
        data: MultiBehaviorData,
        graphs: list[SparseGraph],
        device: torch.device,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """Pretraining of the first block's embeddings (``pretrain_epochs > 0``, network
        ``pretrain_model``); the mean BPR loss and time of every 10th pretraining epoch (and the
        first and last) go to ``log``."""
        cfg = self.config
        if cfg.pretrain_epochs <= 0:
            return
        log = log or (lambda _msg: None)
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # follows the trainer's torch seed
        rng = np.random.default_rng(seed)
        objective, sampler, opt = self.pretraining(data, device)
        net = objective.net
        log(f"pretraining a {cfg.pretrain_layers}-layer {net.label} on {self.behaviors[0]!r} for {cfg.pretrain_epochs} "
            f"epochs (lr {cfg.pretrain_lr}); the first block starts from its embeddings")
        from mbrec.train import train_epoch  # the trainer's own epoch loop

        t_all = time.perf_counter()
        for ep in range(1, cfg.pretrain_epochs + 1):
            t0 = time.perf_counter()
            means, _ = train_epoch(objective, graphs, sampler, opt, rng, device)  # type: ignore[arg-type]
            if ep == 1 or ep % 10 == 0 or ep == cfg.pretrain_epochs:
                log(f"pretrain epoch {ep:4d} | loss {means['loss']:.4f} | {time.perf_counter() - t0:.1f}s")
        log(f"pretraining done in {time.perf_counter() - t_all:.0f}s")
        with torch.no_grad():
            eu, ei = split_nodes(net.ego.detach(), self.n_users)
            self.user_emb.copy_(eu)
            self.item_emb.copy_(ei)
