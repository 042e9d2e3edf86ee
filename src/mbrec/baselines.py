"""Most-popular: the trivial baseline every trained run is compared with.

A model that ranks every user's items by how often the item occurs in the *training* pairs of
the behavior being scored (ties broken by the item's count over all behaviors, then by item id)
learns nothing about users; a run that does not beat it on the same split and protocol has not
learned to recommend. :func:`popular_metrics` evaluates it exactly as ``mbrec.evaluate``
evaluates a trained model (same candidates, masks, metrics), so the two sets of figures compare
directly. The trainer logs it next to every run's final metrics, stores it in ``metrics.json``
(``most_popular``), and ``mbrec train`` prints its rows under the run's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.data.stats import item_counts
from mbrec.evaluate import Metrics, evaluate, has_valid, task_behaviors
from mbrec.protocol import Protocol


def popularity_scores(data: MultiBehaviorData, behavior: str) -> np.ndarray:
    """``count_b(i) + count_all(i) / (max count_all + 1)``: the behavior's training count, ties
    broken by the count over every behavior (the fraction stays below 1, so it never reorders
    different counts of ``behavior``)."""
    total = sum((item_counts(data, b) for b in data.behaviors), np.zeros(data.n_items))
    return item_counts(data, behavior).astype(np.float64) + total / (total.max() + 1.0)


class MostPopular(nn.Module):
    """The baseline as something :func:`mbrec.evaluate.evaluate` scores: every user gets the
    same score row per behavior (:func:`popularity_scores`)."""

    def __init__(self, data: MultiBehaviorData, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.behaviors = tuple(data.behaviors)
        self.target = data.target
        self._device = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)  # where scores live
        self.rows = {b: torch.as_tensor(popularity_scores(data, b), dtype=torch.float32, device=device)
                     for b in self.behaviors}

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        return self.behaviors

    def embed(self, graphs: Any, behaviors: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        return self.rows

    def score(self, emb: dict[str, torch.Tensor], users: torch.Tensor, behavior: str) -> torch.Tensor:
        return emb[behavior].unsqueeze(0).expand(len(users), -1).clone()


def popular_metrics(data: MultiBehaviorData, protocol: Protocol, *, behaviors: tuple[str, ...] | None = None,
                    device: torch.device | str = "cpu", memory_mb: float = 512.0) -> dict[str, Metrics]:
    """Most-popular's metrics ``{"valid": ..., "test": ...}`` (``valid`` only when the data has a
    validation split) under ``protocol``, for ``behaviors`` (default: the protocol's tasks)."""
    model = MostPopular(data, device)
    if behaviors is None:
        behaviors = task_behaviors(model, data, protocol)  # type: ignore[arg-type]
    splits = ("valid", "test") if has_valid(data) else ("test",)
    return {s: evaluate(model, None, data, protocol, s, behaviors=behaviors, memory_mb=memory_mb)  # type: ignore[arg-type]
            for s in splits}


__all__ = ["MostPopular", "item_counts", "popular_metrics", "popularity_scores"]
