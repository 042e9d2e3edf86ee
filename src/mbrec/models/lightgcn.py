"""LightGCN (He et al., SIGIR'20), as in the reference PyTorch code (gusye1234/LightGCN-PyTorch).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import ConfigError
from mbrec.graph import SparseGraph, bipartite, normalize_sym, to_device
from mbrec.losses import bpr
from mbrec.models.base import Model, ModelConfig, register
from mbrec.sampling import PositiveSet, interaction_triplets, sample_negatives


@dataclass
class LightGCNConfig(ModelConfig):
    n_layers: int = 3
    mode: str = "target"
    bpr_on: str = "target"
    batch_size: int = 2048
    reg: float = 1e-4
    init_std: float = 0.1


class TripletSampler:
    """One triplet per training pair per epoch; ``b`` tags the behavior of each triplet."""

    def __init__(self, matrices: list[sp.csr_matrix], batch_size: int) -> None:
        self.matrices = matrices
        self.excludes = [PositiveSet(m) for m in matrices]
        self.batch_size = batch_size

    def epoch(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        if len(self.matrices) == 1:
            for u, i, j in interaction_triplets(self.matrices[0], self.excludes[0], self.batch_size, rng):
                yield {"users": u, "pos": i, "neg": j, "b": np.zeros_like(u)}
            return
        users, items, tags = [], [], []
        for k, m in enumerate(self.matrices):
            users.append(np.repeat(np.arange(m.shape[0]), np.diff(m.indptr)))
            items.append(m.indices.astype(np.int64))
            tags.append(np.full(m.nnz, k))
        u_all, i_all, b_all = (np.concatenate(x) for x in (users, items, tags))
        order = rng.permutation(len(u_all))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            u, b = u_all[idx], b_all[idx]
            neg = np.empty_like(u)
            for k, ex in enumerate(self.excludes):  # a handful of behaviors, not users
                sel = b == k
                neg[sel] = sample_negatives(u[sel], ex, rng)
            yield {"users": u, "pos": i_all[idx], "neg": neg, "b": b}


@register("lightgcn")
class LightGCN(Model):
    config_class = LightGCNConfig
    train_defaults = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 400, "patience": 20}
    summary = "LightGCN on the target graph (mode=target), all behaviors merged, or per behavior"

    def __init__(self, data: MultiBehaviorData, config: LightGCNConfig) -> None:
        super().__init__(data, config)
        if config.mode not in ("target", "merged", "per_behavior"):
            raise ConfigError(f"lightgcn mode {config.mode!r}; use target, merged or per_behavior")
        if config.bpr_on not in ("target", "graph"):
            raise ConfigError(f"lightgcn bpr_on {config.bpr_on!r}; use target or graph")
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

    def make_sampler(self, data: MultiBehaviorData) -> TripletSampler:
        if self.cfg.mode == "merged" and self.cfg.bpr_on == "target":
            return TripletSampler([data.train[data.target]], self.cfg.batch_size)
        return TripletSampler(self._matrices(data), self.cfg.batch_size)

    # -- model ------------------------------------------------------------------------------
    def forward(self, graphs: SparseGraph) -> torch.Tensor:  # type: ignore[override]
        x = self.embedding
        total = x
        for _ in range(self.cfg.n_layers):
            x = graphs @ x
            total = total + x
        out = total / (self.cfg.n_layers + 1)
        return out.view(self.n_tables, self.n_users + self.n_items, -1)

    def _rows(self, table: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, items: bool) -> torch.Tensor:
        return table[b, idx + (self.n_users if items else 0)]

    def loss(self, graphs: SparseGraph, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = self(graphs)
        b = batch["b"] if self.n_tables > 1 else torch.zeros_like(batch["users"])
        u, i, j = batch["users"], batch["pos"], batch["neg"]
        eu, ei, ej = self._rows(emb, b, u, False), self._rows(emb, b, i, True), self._rows(emb, b, j, True)
        main = bpr((eu * ei).sum(1), (eu * ej).sum(1))
        ego = self.embedding.view(self.n_tables, self.n_users + self.n_items, -1)
        reg = 0.5 * (
            self._rows(ego, b, u, False).pow(2).sum()
            + self._rows(ego, b, i, True).pow(2).sum()
            + self._rows(ego, b, j, True).pow(2).sum()
        ) / len(u)
        return {"loss": main + self.cfg.reg * reg, "bpr": main, "reg": reg}

    def score(self, emb: torch.Tensor, users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        t = self.behaviors.index(behavior) if self.n_tables > 1 else 0
        table = emb[t]
        return table[users] @ table[self.n_users :].T

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return (self.target,) if self.cfg.mode == "target" else self.behaviors
