"""BPR-MF: matrix factorisation trained with BPR on the target behavior (an example model).

Scores are inner products of a user and an item embedding. One epoch is one ``(u, i+, j-)``
triplet per training pair of the target (``j-`` outside the user's target items), with BPR and
the L2 term ``reg * 1/2 (|e_u|^2 + |e_i|^2 + |e_j|^2) / batch`` on the rows of the batch.
See docs/adding-a-model.md for the contract this file follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.losses import bpr
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import InteractionSampler


@dataclass
class BPRMFConfig(ModelConfig):  # embedding_dim (>= 1) comes from ModelConfig
    batch_size: int = option(2048, min=1, doc="triplets per step")
    reg: float = option(1e-4, min=0, doc="weight of the L2 term on the batch's embeddings")
    init_std: float = option(0.1, gt=0, doc="std of the normal initialisation")
    bpr_form: str = option("softplus", choices=("softplus", "log_eps"),
                           doc="softplus(neg - pos), or -log(1e-10 + sigmoid(pos - neg))")


@register("bprmf")
class BPRMF(Model):
    config_class = BPRMFConfig
    train_defaults = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 200, "patience": 20}
    summary = "example: matrix factorisation with BPR on the target (examples/bprmf.py)"

    def __init__(self, data: MultiBehaviorData, config: BPRMFConfig) -> None:
        super().__init__(data, config)  # checks the option(...) declarations
        self.cfg = config
        self.user = nn.Parameter(torch.randn(self.n_users, config.embedding_dim) * config.init_std)
        self.item = nn.Parameter(torch.randn(self.n_items, config.embedding_dim) * config.init_std)

    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> None:
        return None  # matrix factorisation propagates nothing

    def make_sampler(self, data: MultiBehaviorData) -> InteractionSampler:
        # every training pair of the target once per epoch, shuffled, one negative each;
        # batches are {"users", "pos", "neg", "b"} (b: which matrix, here always 0)
        return InteractionSampler([data.train[data.target]], self.cfg.batch_size)

    def forward(self, graphs: None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.user, self.item

    def loss(self, graphs: None, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, items = self(graphs)
        eu, ei, ej = users[batch["users"]], items[batch["pos"]], items[batch["neg"]]
        main = bpr((eu * ei).sum(1), (eu * ej).sum(1), form=self.cfg.bpr_form)
        reg = 0.5 * (eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum()) / len(eu)
        return {"loss": main + self.cfg.reg * reg, "bpr": main, "reg": reg}

    def score(self, emb: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)  # a target-only model: scored_behaviors is (target,)
        user, item = emb
        return user[users] @ item.T
