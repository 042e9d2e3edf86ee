"""Per-behavior alignment strength for RMBRec's RRM (issue 23; ``docs/models/rmbrec.md``,
"Adaptive alignment").

RMBRec ties each auxiliary behavior ``b`` to the target through one contrastive term ``L_b``
(RRM), all with the same strength. These helpers turn the data into one weight ``w_b`` per
auxiliary behavior, so that ``RRM = sum_b w_b L_b``:

* :func:`bar_weights`: from the training BAR of each behavior,
  ``w_b = (1 - x_b) * min_weight + x_b``, ``x_b = clip((BAR_b - floor) / (1 - floor), 0, 1)``:
  a behavior that covers every training target pair gets 1 (RMBRec's weight), one at or below
  ``floor`` gets ``min_weight``; linear in between. With the defaults (floor 0, min weight 0)
  ``w_b = BAR_b``.
* :func:`learned_weights` / :func:`weight_entropy_penalty`: ``w = n * softmax(k * theta)`` over
  the ``n`` aligned behaviors (mean weight 1, so the total strength stays RMBRec's and only its
  split across behaviors is learned), regularised by ``sum_b w_b log w_b = n * KL(w/n || 1/n)``
  (zero at uniform). With the RRM losses ``L_b`` held fixed, ``sum_b w_b L_b + gamma * that``
  is minimised at ``w = n * softmax(-L / gamma)``: ``gamma`` (``align_temperature``) keeps the
  weights from collapsing onto the behavior with the lowest contrastive loss.
* :func:`below_threshold`: the behaviors an automatic drop removes (training BAR below a
  threshold).

Only training matrices are read (:func:`mbrec.data.stats.training_bar`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from mbrec.errors import ConfigError

#: ``model_args.align`` values: one weight for all (RMBRec), from the training BAR, or learned
ALIGN_MODES = ("uniform", "bar", "learned")
#: ``model_args.align_drop_scope`` values: remove the whole behavior, or only its RRM term
DROP_SCOPES = ("behavior", "rrm")


def bar_weights(bar: Mapping[str, float], floor: float = 0.0, min_weight: float = 0.0) -> dict[str, float]:
    """``{b: w_b}`` with ``w_b = (1 - x_b) * min_weight + x_b`` and
    ``x_b = clip((BAR_b - floor) / (1 - floor), 0, 1)`` (exactly ``min_weight`` at ``x = 0`` and
    exactly 1 at ``x = 1``)."""
    if not 0.0 <= floor < 1.0:
        raise ConfigError(f"model_args.align_floor = {floor!r}; allowed: >= 0 and < 1")
    if not 0.0 <= min_weight <= 1.0:
        raise ConfigError(f"model_args.align_min_weight = {min_weight!r}; allowed: >= 0 and <= 1")
    names = list(bar)
    values = np.array([bar[b] for b in names], dtype=np.float64)
    if np.any(~np.isfinite(values)) or np.any((values < 0) | (values > 1)):
        raise ConfigError(f"BAR values must lie in [0, 1], got {dict(bar)!r}")
    x = np.clip((values - floor) / (1.0 - floor), 0.0, 1.0)
    w = (1.0 - x) * min_weight + x
    return {b: float(v) for b, v in zip(names, w)}


def below_threshold(bar: Mapping[str, float], threshold: float) -> list[str]:
    """The behaviors of ``bar`` whose BAR is strictly below ``threshold``, in ``bar``'s order."""
    return [b for b, v in bar.items() if v < threshold]


def learned_weights(logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``n * softmax(scale * logits)``: positive weights with mean 1 (all 1 at ``logits = 0``)."""
    return torch.softmax(logits * scale, dim=0) * logits.numel()


def weight_entropy_penalty(w: torch.Tensor) -> torch.Tensor:
    """``sum_b w_b log w_b`` for weights with mean 1: ``n`` times the KL divergence of ``w / n``
    from the uniform distribution; 0 exactly when every weight is 1, ``n log n`` at collapse."""
    return torch.special.xlogy(w, w).sum()


def describe(mode: str, bar: Mapping[str, float], weights: Mapping[str, float], dropped: Mapping[str, float],
             scope: str, threshold: float, extra: str = "") -> str:
    """One log line: the mode, each aligned behavior's training BAR and weight, and the drops."""
    parts = [f"{b} BAR {bar[b]:.4f} weight {weights[b]:.4f}" for b in weights]
    line = f"alignment ({mode}{', ' + extra if extra else ''}): " + ("; ".join(parts) or "no auxiliary behavior aligned")
    if dropped:
        what = "behavior removed" if scope == "behavior" else "RRM term removed, encoder kept"
        line += (f"; dropped (training BAR < {threshold:g}, {what}): "
                 + ", ".join(f"{b} BAR {v:.4f}" for b, v in dropped.items()))
    return line


__all__ = ["ALIGN_MODES", "DROP_SCOPES", "bar_weights", "below_threshold", "describe", "learned_weights",
           "weight_entropy_penalty"]
