"""LightGCN (He et al., SIGIR'20), as in the official PyTorch code (gusye1234/LightGCN-PyTorch).

Propagates ego embeddings on a symmetric-normalised bipartite graph without self-loops,
``E^{l+1} = D^{-1/2} A D^{-1/2} E^l``, and averages layers ``0..L``; scores are inner
products. BPR (softplus form) on one triplet per training interaction per epoch, with L2
``reg * 1/2 (|e_u|^2 + |e_i|^2 + |e_j|^2) / batch`` on the ego embeddings of the batch.

Options (``mode``):

* ``target`` (default; the papers' LightGCN rows): the target behavior's graph only.
* ``merged``: one graph of all behaviors' training pairs (COPF's "LightGCN_M"); BPR on the
  target's pairs (``bpr_on: target``, default) or on all merged pairs (``bpr_on: graph``).
  It ranks every behavior with the same embeddings (the masks differ per behavior).
* ``per_behavior``: an independent LightGCN per behavior (separate tables, one block-diagonal
  graph so all behaviors propagate in one sparse product); each ranks its own behavior.

Sampler: :class:`mbrec.sampling.InteractionSampler`. More: ``docs/models/lightgcn.md``.

Training computes the last layer only at the rows the batch reads, and sums the layers only at
those rows (:func:`mbrec.graph.lightgcn_rows`); :func:`lightgcn_stack` and :func:`node_rows` are
the LightGCN layer loop and the batch row set that MB-CGCN and BiGEL use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import scipy.sparse as sp
import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.dense import matmul
from mbrec.graph import SparseGraph, bipartite, lightgcn_rows, lightgcn_stack, node_rows, normalize_sym, to_device
from mbrec.losses import bpr, l2
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import InteractionSampler


@dataclass
class LightGCNConfig(ModelConfig):
    n_layers: int = option(3, min=0, doc="propagation layers L (0: matrix factorisation)")
    mode: str = option("target", choices=("target", "merged", "per_behavior"),
                       doc="graph: the target's, all behaviors merged, or one LightGCN per behavior")
    bpr_on: str = option("target", choices=("target", "graph"), doc="merged mode: BPR on the target's pairs or on all merged pairs")
    batch_size: int = option(2048, min=1, doc="triplets per batch")
    reg: float = option(1e-4, min=0, doc="L2 weight on the batch's ego embeddings")
    init_std: float = option(0.1, gt=0, doc="standard deviation of the normal initialisation")


@register("lightgcn")
class LightGCN(Model):
    config_class = LightGCNConfig
    train_defaults = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 400, "patience": 20, "min_epochs": 50}
    summary = "LightGCN on the target graph (mode=target), all behaviors merged, or per behavior"

    def __init__(self, data: MultiBehaviorData, config: LightGCNConfig) -> None:
        super().__init__(data, config)
        self.cfg = config
        n_tables = len(self.behaviors) if config.mode == "per_behavior" else 1
        self.n_tables = n_tables
        self.embedding = nn.Parameter(
            torch.randn(n_tables * (self.n_users + self.n_items), config.embedding_dim) * config.init_std
        )

    # -- graph and sampling -----------------------------------------------------------------
    def _matrices(self, data: MultiBehaviorData) -> list[sp.csr_matrix]:
        if self.cfg.mode == "target":
            return [data.train[data.target]]
        if self.cfg.mode == "merged":
            return [data.train_union()]
        return [data.train[b] for b in self.behaviors]

    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> SparseGraph:
        blocks = [normalize_sym(bipartite(m)) for m in self._matrices(data)]
        return to_device(sp.block_diag(blocks, format="csr"), device, symmetric=True)

    def make_sampler(self, data: MultiBehaviorData) -> InteractionSampler:
        if self.cfg.mode == "merged" and self.cfg.bpr_on == "target":
            return InteractionSampler([data.train[data.target]], self.cfg.batch_size)
        return InteractionSampler(self._matrices(data), self.cfg.batch_size)

    # -- model ------------------------------------------------------------------------------
    def forward(self, graphs: SparseGraph) -> torch.Tensor:  # type: ignore[override]
        out = lightgcn_stack(graphs, self.embedding, self.cfg.n_layers)
        return out.view(self.n_tables, self.n_users + self.n_items, -1)

    def _nodes(self, b: torch.Tensor, idx: torch.Tensor, items: bool) -> torch.Tensor:
        """Row of (table ``b``, user or item ``idx``) in the stacked ``[tables * (U+I), d]`` layout."""
        return b * (self.n_users + self.n_items) + idx + (self.n_users if items else 0)

    def loss(self, graphs: SparseGraph, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = batch["b"].long() if self.n_tables > 1 else torch.zeros_like(batch["users"]).long()
        u, i, j = batch["users"].long(), batch["pos"].long(), batch["neg"].long()
        nodes = (self._nodes(b, u, False), self._nodes(b, i, True), self._nodes(b, j, True))
        rows, (pu, pi, pj) = node_rows(*nodes)
        # only the batch's rows; the ego rows come from the same gather (L2 reads them too)
        emb, ego = lightgcn_rows(graphs, self.embedding, self.cfg.n_layers, rows)
        eu, ei, ej = (emb.index_select(0, p) for p in (pu, pi, pj))  # index_select: a cheaper gather than x[p]
        main = bpr((eu * ei).sum(1), (eu * ej).sum(1))
        reg = 0.5 * l2(*(ego.index_select(0, p) for p in (pu, pi, pj))) / len(u)
        return {"loss": main + self.cfg.reg * reg, "bpr": main, "reg": reg}

    # ------------------------------------------------------------------ floor (mbrec bench)
    def floor_products(self, graphs: SparseGraph, batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """``n_layers`` products on the (block-diagonal) graph, all with a gradient to the ego
        table; the last one only at the batch's distinct node rows (users, positive and
        negative items of each table), the only rows the loss reads."""
        from mbrec.bench import SparseProduct

        L, d = self.cfg.n_layers, self.cfg.embedding_dim
        b = batch["b"].long() if self.n_tables > 1 else torch.zeros_like(batch["users"]).long()
        rows, _ = node_rows(self._nodes(b, batch["users"].long(), False), self._nodes(b, batch["pos"].long(), True),
                            self._nodes(b, batch["neg"].long(), True))
        return [SparseProduct(f"layer {n + 1}", graphs, d, rows=rows if n == L - 1 else None) for n in range(L)]

    def score(self, emb: torch.Tensor, users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        t = self.behaviors.index(behavior) if self.n_tables > 1 else 0
        table = emb[t]
        return matmul(table[users], table[self.n_users :].T)

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return (self.target,) if self.cfg.mode == "target" else self.behaviors
