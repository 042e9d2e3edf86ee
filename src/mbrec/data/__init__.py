"""Data layer: the :class:`MultiBehaviorData` container, loaders, statistics, synthetic data.

``load_dataset``, ``builtin_names``, ``datasets_root`` (registry) and ``compute_stats`` are
importable from here; they load lazily so that importing the container stays cheap.
"""

from typing import Any

from mbrec.data.container import MultiBehaviorData, pairs_to_csr

__all__ = [
    "MultiBehaviorData", "pairs_to_csr", "load_dataset", "builtin_names", "datasets_root",
    "compute_stats",
]


def __getattr__(name: str) -> Any:
    if name in ("load_dataset", "builtin_names", "datasets_root"):
        from mbrec.data import registry

        return getattr(registry, name)
    if name == "compute_stats":
        from mbrec.data.stats import compute_stats

        return compute_stats
    raise AttributeError(f"module 'mbrec.data' has no attribute {name!r}")
