"""Evaluation protocols: every knob that changes a number, named and printed.

Papers in this field disagree on masking, the HR and NDCG definitions, and model selection.
A :class:`Protocol` makes each choice explicit; presets reproduce the lineages:

==========  ==========================================================================
preset      meaning
==========  ==========================================================================
default     full ranking, mask the target's training items, HR = share of users with a
            hit, NDCG / IDCG, K = 10, 20, selection on validation NDCG@10
rmbrec      CRGCN/RMBRec lineage: as default, selection on validation HR@10
copf        HKUDS/PKEF/COPF code: HR = hits per user, NDCG without IDCG, K = 10,
            **best-on-test selection** (paper parity only; optimistic)
mmr         BVAE/BiGEL multi-task: every behavior is a task, mask that behavior's training
            items, K = 5, 10, 20, selection on validation NDCG@5 of the target
==========  ==========================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from mbrec.errors import ConfigError, UnknownNameError
from mbrec.options import check_options, option

METRICS = ("HR", "NDCG", "Recall", "Precision", "MRR")


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol. ``describe()`` prints every field."""

    name: str = "default"
    #: rank all items, or the held-out items against ``n_negatives`` sampled unobserved items
    candidates: str = option("all", choices=("all", "sampled"))
    n_negatives: int = option(100, min=1)
    #: training items removed from the ranking: of the target, of the evaluated behavior, of all
    #: behaviors, or none
    mask: str = option("target", choices=("target", "behavior", "all", "none"))
    #: ``hit_rate``: share of users with >= 1 held-out item in the top K;
    #: ``hits_per_user``: number of held-out items in the top K per user (COPF/PKEF code)
    hr: str = option("hit_rate", choices=("hit_rate", "hits_per_user"))
    #: ``normalized``: DCG / IDCG with IDCG over min(#held-out, K); ``dcg``: DCG alone (COPF/PKEF)
    ndcg: str = option("normalized", choices=("normalized", "dcg"))
    #: cut-offs; the selection metric's K is added when missing
    ks: tuple[int, ...] = option((10, 20), min=1)
    #: which behaviors are evaluated: the target only, or every behavior the model scores
    tasks: str = option("target", choices=("target", "all"))
    #: ``validation``: pick the epoch by a validation metric; ``test``: best-on-test (paper parity)
    selection: str = option("validation", choices=("validation", "test"))
    select_metric: str = "NDCG@10"
    #: the selection metric of the target, or summed over all evaluated behaviors (one epoch for
    #: every task), or ``each``: every behavior at its own best epoch (a checkpoint per task)
    select_behavior: str = option("target", choices=("target", "sum", "each"))
    metrics: tuple[str, ...] = METRICS

    def __post_init__(self) -> None:
        if isinstance(self.ks, (int, float)) and not isinstance(self.ks, bool):
            object.__setattr__(self, "ks", (self.ks,))
        check_options(self, "protocol")
        whole = [k for k in self.ks if isinstance(k, int) or (isinstance(k, float) and k.is_integer())]
        if not self.ks or len(whole) != len(self.ks):
            raise ConfigError(f"protocol.ks = {list(self.ks)!r}; allowed: a non-empty list of whole numbers >= 1")
        ks = tuple(int(k) for k in self.ks)
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ConfigError(f"protocol.metrics: unknown {bad}; allowed: {list(METRICS)}")
        name, _, k = self.select_metric.partition("@")
        if name not in METRICS or not k.isdigit() or int(k) < 1 or name not in self.metrics:
            raise ConfigError(
                f"protocol.select_metric = {self.select_metric!r}: must be METRIC@K with METRIC in "
                f"{list(self.metrics)}"
            )
        if int(k) not in self.ks:  # the selection cut-off is always computed
            object.__setattr__(self, "ks", tuple(sorted(set(self.ks) | {int(k)})))

    @property
    def paper_parity(self) -> bool:
        return self.selection == "test"

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        d["metrics"] = list(self.metrics)
        d["selection_note"] = (
            "best-on-test: the reported epoch was chosen on the test set (paper parity, optimistic)"
            if self.paper_parity
            else "epoch chosen on the validation split; test reported at that epoch"
        )
        if self.select_behavior == "each":
            d["selection_note"] += " (each behavior at its own selected epoch)"
        return d

    def describe(self) -> str:
        sel = "best-on-TEST (paper parity)" if self.paper_parity else "validation"
        return (
            f"protocol {self.name}: candidates={self.candidates}"
            + (f"({self.n_negatives} negatives)" if self.candidates == "sampled" else "")
            + f", mask={self.mask}-train, HR={self.hr}, NDCG={self.ndcg}, K={list(self.ks)}, "
            f"tasks={self.tasks}, selection={sel} on {self.select_metric} ({self.select_behavior})"
        )


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "rmbrec": {"select_metric": "HR@10"},
    "copf": {
        "hr": "hits_per_user",
        "ndcg": "dcg",
        "ks": (10,),
        "selection": "test",
        "select_metric": "HR@10",
    },
    "mmr": {
        "mask": "behavior",
        "ks": (5, 10, 20),
        "tasks": "all",
        "select_metric": "NDCG@5",
        "select_behavior": "target",
    },
}


def get_protocol(spec: str | Mapping[str, Any] | Protocol | None = None, **overrides: Any) -> Protocol:
    """A preset by name, or a mapping ``{"preset": name, ...field overrides}``."""
    known = {f.name for f in dataclasses.fields(Protocol)}
    if isinstance(spec, Protocol):
        _check_fields(overrides, known)
        return dataclasses.replace(spec, **overrides) if overrides else spec
    fields: dict[str, Any] = {}
    if spec is None:
        preset = "default"
    elif isinstance(spec, str):
        preset = spec
    else:
        fields = dict(spec)
        preset = str(fields.pop("preset", fields.get("name", "default")))
    if preset not in PRESETS:
        raise UnknownNameError(f"unknown protocol preset {preset!r}; choose from {list(PRESETS)}")
    fields.update(overrides)
    _check_fields(fields, known)
    merged = {"name": preset, **PRESETS[preset], **fields}
    if "ks" in merged:
        merged["ks"] = tuple(merged["ks"]) if not isinstance(merged["ks"], int) else (merged["ks"],)
    if "metrics" in merged:
        merged["metrics"] = tuple(merged["metrics"])
    return Protocol(**merged)


def _check_fields(fields: Mapping[str, Any], known: set[str]) -> None:
    import difflib

    unknown = sorted(set(fields) - known, key=str)
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(str(k), sorted(known), n=1)) else "")
                 for k in unknown]
        raise ConfigError(f"unknown protocol field(s) {', '.join(hints)}; known: {sorted(known)}")


__all__ = ["METRICS", "PRESETS", "Protocol", "get_protocol"]
