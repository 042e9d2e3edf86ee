"""Options whose allowed values are declared next to them, and the one place that checks them.

A config dataclass declares each constrained field with :func:`option`::

    @dataclass
    class MyConfig(ModelConfig):
        mode: str = option("target", choices=("target", "merged"), doc="which graph BPR runs on")
        tau: float = option(0.2, gt=0, doc="InfoNCE temperature")
        layers: list[int] = option([1, 2], min=1, doc="layers per behavior")

:func:`check_options` reads those declarations and raises one :class:`ConfigError` line naming
the key, the value and what is allowed. The config loader calls it for every section it fills,
and :class:`~mbrec.models.base.Model` calls it for configs built in Python, so a bad value never
reaches a model's arithmetic. Bounds on a list apply to each of its elements.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

from mbrec.errors import ConfigError

_UNSET = object()


def option(
    default: Any,
    *,
    choices: Iterable[Any] | None = None,
    min: float | None = None,  # noqa: A002 - the natural name for a bound
    max: float | None = None,  # noqa: A002
    gt: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with its allowed values: ``choices`` (a closed set), or bounds
    ``min <= v <= max`` / ``gt < v < lt``. Lists and dicts get a fresh copy per instance."""
    meta = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "gt": gt, "lt": lt, "doc": doc}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def allowed_text(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    """What a field allows, in words (``''`` when unconstrained)."""
    m = f.metadata
    if m.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    parts = []
    if m.get("gt") is not None:
        parts.append(f"> {m['gt']:g}")
    if m.get("min") is not None:
        parts.append(f">= {m['min']:g}")
    if m.get("lt") is not None:
        parts.append(f"< {m['lt']:g}")
    if m.get("max") is not None:
        parts.append(f"<= {m['max']:g}")
    return " and ".join(parts)


def _in_bounds(value: Any, m: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not (
        (m.get("min") is not None and value < m["min"])
        or (m.get("max") is not None and value > m["max"])
        or (m.get("gt") is not None and value <= m["gt"])
        or (m.get("lt") is not None and value >= m["lt"])
    )


def check_value(f: dataclasses.Field, value: Any, where: str) -> None:  # type: ignore[type-arg]
    """Raise a :class:`ConfigError` if ``value`` breaks ``f``'s declaration."""
    m = f.metadata
    if value is None:
        return
    if m.get("choices") is not None:
        if value not in m["choices"]:
            raise ConfigError(f"{where}.{f.name} = {value!r}; allowed: {allowed_text(f)}")
        return
    if not any(m.get(k) is not None for k in ("min", "max", "gt", "lt")):
        return
    values = list(value.values()) if isinstance(value, dict) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    for v in values:
        if not _in_bounds(v, m):
            shown = f" (element {v!r})" if len(values) > 1 or isinstance(value, (list, tuple, dict)) else ""
            raise ConfigError(f"{where}.{f.name} = {value!r}{shown}; allowed: {allowed_text(f)}")


def check_options(obj: Any, where: str) -> None:
    """Check every declared option of dataclass instance ``obj``; ``where`` prefixes the key."""
    for f in dataclasses.fields(obj):
        check_value(f, getattr(obj, f.name), where)


def describe_options(cls: type) -> list[tuple[str, Any, str, str]]:
    """``(name, default, allowed, doc)`` for every field of config dataclass ``cls`` (for help)."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((f.name, default, allowed_text(f), str(f.metadata.get("doc", ""))))
    return rows
