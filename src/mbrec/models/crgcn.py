"""CRGCN: cascading residual graph convolution over behaviors.

Paper: Yan et al., "Cascading Residual Graph Convolutional Network for Multi-Behavior
Recommendation", ACM TOIS 2023. Official code: github MingshiYan/CRGCN (PyTorch + PyG),
read at ``86fbe26`` (``model_cascade.py``, ``data_set.py``, ``trainer.py``, ``utils.py``).

What it does:
  1. one shared embedding table ``E`` (Xavier-uniform); behaviors in chain order;
  2. per behavior one GCN layer (symmetric norm, no self-loops, no weight, learnable zero-init
     bias); ``out = rownorm(GCN_b(E_b))`` and ``E_{b+1} = out + E_b`` (residual cascade);
  3. BPR per behavior on that behavior's stage ``E_b``, summed, plus a norm regulariser.

Official-code behaviour kept as the default (and the switches):
  * Sampler: every user once per epoch (batches of ``batch_size`` users); per behavior one
    ``(u, i+, j-)`` with ``j-`` outside the union of the user's training items over all behaviors
    (:class:`mbrec.sampling.UserTripletSampler`).
  * Users lacking a behavior: the 1-based official code emits a padding triplet ``(0, 0, 0)``.
    Its score difference is exactly 0, so it adds the constant ``log 2`` with **zero gradient**
    but still counts in the batch mean. Here such rows are masked; ``padding="batch"``
    (default) divides the masked sum by the number of rows, which reproduces the official
    gradients exactly (the reported loss omits the constant). ``padding="valid"`` averages over
    valid rows only.
  * BPR form ``-log(1e-10 + sigmoid(pos - neg))``.
  * Regulariser ``reg_weight * (‖E_u‖_F + ‖E_i‖_F) / (n_items + 1)``: Frobenius **norms**, not
    squares, over the whole tables; ``n_items + 1`` is the official item table with its padding row.
  * Adam lr 0.01, no weight decay; selection on validation HR@20 with patience 20.
  * Scores: ``<E_b(u), E_b(i)>`` from the stage of the requested behavior. The official code
    ranks the target stage only; because CRGCN holds one embedding per stage it can also rank
    every other behavior, so ``scored_behaviors`` is **every behavior** (used by the ``mmr``
    protocol). Target scores are the official ones.

Training computes the last stage only at the rows its BPR reads (every earlier stage feeds the
next one over all nodes). More: ``docs/models/crgcn.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.dense import matmul
from mbrec.graph import SparseGraph, bipartite, node_rows, normalize_sym, propagate, split_nodes, to_device
from mbrec.losses import bpr
from mbrec.models.base import Model, ModelConfig, register
from mbrec.options import option
from mbrec.sampling import UserTripletSampler


@dataclass
class CRGCNConfig(ModelConfig):
    """CRGCN hyperparameters (defaults: the official argparse / ``main.py``)."""

    layers: int = option(1, min=1, doc="GCN layers per behavior (official: 1 for every dataset)")
    reg_weight: float = option(1e-3, min=0, doc="weight of the norm regulariser")
    batch_size: int = option(1024, min=1, doc="users per batch")
    bpr_form: str = option("log_eps", choices=("log_eps", "softplus"), doc="-log(1e-10 + sigmoid(x)) (official) or softplus")
    padding: str = option("batch", choices=("batch", "valid"),
                          doc="denominator of the per-behavior BPR mean: every row (official) or the valid rows")


def residual_gcn_stage(graph: SparseGraph, x: torch.Tensor, biases: list[torch.Tensor],
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """``x + rownorm(GCN(x))`` with GCN = ``len(biases)`` layers of ``Âh + bias``; with ``rows``
    only those output rows (the last layer computed only there)."""
    h = x
    for n, bias in enumerate(biases):
        h = propagate(graph, h, rows if n == len(biases) - 1 else None) + bias
    if rows is not None:
        x = x[rows]
        if not biases:
            h = h[rows]
    return F.normalize(h, dim=-1) + x


@register("crgcn")
class CRGCN(Model):
    """Cascading residual single-layer GCNs with per-behavior BPR (CRGCN, TOIS'23)."""

    config_class = CRGCNConfig
    train_defaults: dict[str, Any] = {
        "lr": 0.01,
        "weight_decay": 0.0,
        "epochs": 200,
        "patience": 20,
        "min_epochs": 50,  # no-config runs only: the paper configs set 0
    }
    summary = "CRGCN: cascading residual GCNs with learnable bias, per-behavior BPR summed"

    def __init__(self, data: MultiBehaviorData, config: CRGCNConfig) -> None:
        super().__init__(data, config)
        self.config: CRGCNConfig = config
        d = config.embedding_dim
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(d)) for _ in range(len(self.behaviors) * config.layers)]
        )

    def _biases(self, k: int) -> list[torch.Tensor]:
        n = self.config.layers
        return list(self.bias[k * n : (k + 1) * n])

    # -- graphs, sampling, loss -------------------------------------------------
    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> list[SparseGraph]:
        """One ``D^{-1/2} A D^{-1/2}`` (no self-loops) per behavior, in behavior order."""
        return [to_device(normalize_sym(bipartite(data.train[b])), device, symmetric=True) for b in self.behaviors]

    def make_sampler(self, data: MultiBehaviorData) -> UserTripletSampler:
        return UserTripletSampler([data.train[b] for b in self.behaviors], data.train_union(), self.config.batch_size)

    def loss(self, graphs: list[SparseGraph], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trip = batch["triplets"].long()
        valid = batch["valid"].bool()
        K, U = len(self.behaviors), self.n_users
        # node rows each behavior's BPR reads; the last stage is computed only at its own
        last_rows, last_at = node_rows(trip[:, K - 1, 0], U + trip[:, K - 1, 1], U + trip[:, K - 1, 2])
        stages = self.stages(graphs, last_rows)
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=trip.device)
        for k, b in enumerate(self.behaviors):
            e = stages[k]
            if k == K - 1:
                u, i, j = (e[at] for at in last_at)
            else:
                u, i, j = e[trip[:, k, 0]], e[U + trip[:, k, 1]], e[U + trip[:, k, 2]]
            diff_pos = (u * i).sum(-1)
            diff_neg = (u * j).sum(-1)
            term = bpr(diff_pos, diff_neg, form=self.config.bpr_form, mask=valid[:, k],
                       over="all" if self.config.padding == "batch" else "valid")
            terms[f"bpr_{b}"] = term
            total = total + term
        reg = self.config.reg_weight * (self.user_emb.norm() + self.item_emb.norm()) / (self.n_items + 1)
        terms["reg"] = reg
        terms["loss"] = total + reg
        return terms

    # -- inference --------------------------------------------------------------
    def stages(self, graphs: list[SparseGraph], last_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[E_b]`` in behavior order, each ``[n_users + n_items, d]``; with ``last_rows`` the
        last stage holds only those node rows."""
        x = torch.cat([self.user_emb, self.item_emb], 0)
        out: list[torch.Tensor] = []
        for k in range(len(self.behaviors)):
            x = residual_gcn_stage(graphs[k], x, self._biases(k), last_rows if k == len(self.behaviors) - 1 else None)
            out.append(x)
        return out

    def forward(self, graphs: list[SparseGraph]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{behavior: E_b}``, each ``[n_users + n_items, d]`` (users first)."""
        return dict(zip(self.behaviors, self.stages(graphs)))

    # -- floor (mbrec bench) ----------------------------------------------------------
    def floor_products(self, graphs: list[SparseGraph], batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """Every GCN layer of every stage over all nodes (each stage feeds the next), with a
        gradient (the embedding table trains through all of them), except the last stage's last
        layer: only at the distinct nodes of the last behavior's triplets, the rows its BPR reads."""
        from mbrec.bench import SparseProduct

        trip, K, U, d = batch["triplets"].long(), len(self.behaviors), self.n_users, self.config.embedding_dim
        rows = node_rows(trip[:, K - 1, 0], U + trip[:, K - 1, 1], U + trip[:, K - 1, 2])[0]
        L = self.config.layers
        return [SparseProduct(f"stage {b} layer {n + 1}", graphs[k], d, rows=rows if (k == K - 1 and n == L - 1) else None)
                for k, b in enumerate(self.behaviors) for n in range(L)]

    def score(self, emb: dict[str, torch.Tensor], users: torch.Tensor, behavior: str) -> torch.Tensor:
        self.check_behavior(behavior)
        u, i = split_nodes(emb[behavior], self.n_users)
        return matmul(u[users], i.T)

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        """Every behavior: each stage ``E_b`` ranks behavior ``b`` (the target is the official one)."""
        return self.behaviors
