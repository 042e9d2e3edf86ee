"""Loss terms shared by several models. Model-specific variants live in the model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr(pos: torch.Tensor, neg: torch.Tensor, *, form: str = "softplus", reduction: str = "mean") -> torch.Tensor:
    """Bayesian personalized ranking on score tensors.

    ``form="softplus"``: ``softplus(neg - pos)`` = ``-log sigmoid(pos - neg)`` (LightGCN code).
    ``form="log_eps"``: ``-log(1e-10 + sigmoid(pos - neg))`` (CRGCN/RMBRec code).
    """
    diff = pos - neg
    if form == "softplus":
        loss = F.softplus(-diff)
    elif form == "log_eps":
        loss = -torch.log(1e-10 + torch.sigmoid(diff))
    else:
        raise ValueError(f"unknown BPR form {form!r}; use 'softplus' or 'log_eps'")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def info_nce(anchor: torch.Tensor, other: torch.Tensor, tau: float, *, symmetric: bool = False) -> torch.Tensor:
    """In-batch InfoNCE with cosine similarity: row ``k`` of ``anchor`` and ``other`` are the
    positive pair, every other row of ``other`` a negative. ``symmetric`` averages both directions."""
    a = F.normalize(anchor, dim=1)
    b = F.normalize(other, dim=1)
    logits = a @ b.T / tau
    labels = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss


def variance(losses: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Risk variance (REx) of a vector of per-environment losses."""
    return losses.var(unbiased=unbiased) if len(losses) > 1 else losses.sum() * 0.0


def l2(*tensors: torch.Tensor) -> torch.Tensor:
    """``sum ||t||^2`` over the given tensors."""
    return sum((t.pow(2).sum() for t in tensors), torch.zeros((), device=tensors[0].device))
