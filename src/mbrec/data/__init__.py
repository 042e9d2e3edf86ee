"""Data layer: the :class:`MultiBehaviorData` container, loaders, statistics, synthetic data."""

from mbrec.data.container import MultiBehaviorData, pairs_to_csr

__all__ = ["MultiBehaviorData", "pairs_to_csr"]
