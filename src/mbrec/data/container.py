"""The one dataset container every loader produces and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import scipy.sparse as sp

from mbrec.errors import DataError, UnknownNameError

SPLITS = ("train", "valid", "test")


def _as_binary_csr(m: sp.spmatrix, shape: tuple[int, int], what: str) -> sp.csr_matrix:
    if m.shape != shape:
        raise DataError(f"{what}: matrix has shape {m.shape}, expected {shape}")
    out = sp.csr_matrix(m, dtype=np.float32, copy=True)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.data[:] = 1.0
    out.sort_indices()
    out.data.setflags(write=False)
    out.indices.setflags(write=False)
    out.indptr.setflags(write=False)
    return out


def pairs_to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR (duplicates collapse) from index arrays."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    m = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items)
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


@dataclass(frozen=True)
class MultiBehaviorData:
    """Immutable multi-behavior dataset.

    * ``behaviors``: ordered upstream -> downstream; the **target is last**.
    * ``train[b]``, ``valid[b]``, ``test[b]``: binary CSR ``[n_users, n_items]`` per behavior.
      Held-out matrices exist for every behavior (empty when a behavior has no held-out pairs).
    * ``user_ids[k]`` / ``item_ids[k]``: the dataset's own id of index ``k`` (as strings).
    * ``description``: how the files were read (which split choices were made).

    Validated on construction: shapes, behavior names, a non-empty target, held-out pairs
    inside the id range. Matrices are copied and made read-only.
    """

    name: str
    behaviors: tuple[str, ...]
    train: Mapping[str, sp.csr_matrix]
    valid: Mapping[str, sp.csr_matrix]
    test: Mapping[str, sp.csr_matrix]
    user_ids: np.ndarray
    item_ids: np.ndarray
    description: str = ""
    source: str = ""
    _user_index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _item_index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        behaviors = tuple(str(b) for b in self.behaviors)
        if not behaviors:
            raise DataError(f"dataset {self.name!r}: no behaviors")
        if len(set(behaviors)) != len(behaviors):
            raise DataError(f"dataset {self.name!r}: repeated behavior names", value=behaviors)
        object.__setattr__(self, "behaviors", behaviors)
        user_ids = np.asarray(self.user_ids).astype(str)
        item_ids = np.asarray(self.item_ids).astype(str)
        user_ids.setflags(write=False)
        item_ids.setflags(write=False)
        object.__setattr__(self, "user_ids", user_ids)
        object.__setattr__(self, "item_ids", item_ids)
        shape = (len(user_ids), len(item_ids))
        if shape[0] == 0 or shape[1] == 0:
            raise DataError(f"dataset {self.name!r}: no users or no items", value=shape)
        for split in SPLITS:
            given = dict(getattr(self, split))
            unknown = sorted(set(given) - set(behaviors))
            if unknown:
                raise DataError(
                    f"dataset {self.name!r}: {split} split names unknown behaviors {unknown}; "
                    f"known: {list(behaviors)}"
                )
            mats = {}
            for b in behaviors:
                m = given.get(b)
                if m is None:
                    if split == "train":
                        raise DataError(f"dataset {self.name!r}: no training matrix for {b!r}")
                    m = sp.csr_matrix(shape, dtype=np.float32)
                mats[b] = _as_binary_csr(m, shape, f"dataset {self.name!r} {split}[{b}]")
            object.__setattr__(self, split, _FrozenDict(mats))
        if self.train[self.target].nnz == 0:
            raise DataError(
                f"dataset {self.name!r}: the target behavior {self.target!r} has no training pairs"
            )
        if len(set(user_ids.tolist())) != len(user_ids):
            raise DataError(f"dataset {self.name!r}: duplicate user ids")
        if len(set(item_ids.tolist())) != len(item_ids):
            raise DataError(f"dataset {self.name!r}: duplicate item ids")

    # ------------------------------------------------------------------ basics
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def target(self) -> str:
        return self.behaviors[-1]

    @property
    def auxiliary(self) -> tuple[str, ...]:
        return self.behaviors[:-1]

    def behavior_index(self, behavior: str) -> int:
        try:
            return self.behaviors.index(behavior)
        except ValueError:
            raise UnknownNameError(
                f"unknown behavior {behavior!r}; this dataset has {list(self.behaviors)}"
            ) from None

    def split(self, name: str) -> Mapping[str, sp.csr_matrix]:
        if name not in SPLITS:
            raise UnknownNameError(f"unknown split {name!r}; choose from {list(SPLITS)}")
        return getattr(self, name)

    def train_union(self, behaviors: tuple[str, ...] | None = None) -> sp.csr_matrix:
        """Binary union of the training matrices of ``behaviors`` (default: all)."""
        bs = self.behaviors if behaviors is None else behaviors
        m = sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        for b in bs:
            m = m + self.train[b]
        m.data[:] = 1.0
        return m.tocsr()

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {behavior: nnz}}``."""
        return {s: {b: int(self.split(s)[b].nnz) for b in self.behaviors} for s in SPLITS}

    # ------------------------------------------------------------------ ids
    def user_index(self, external: object) -> int:
        if not self._user_index:
            self._user_index.update({u: k for k, u in enumerate(self.user_ids.tolist())})
        key = str(external)
        if key not in self._user_index:
            raise UnknownNameError(f"unknown user {external!r} in dataset {self.name!r}")
        return self._user_index[key]

    def item_index(self, external: object) -> int:
        if not self._item_index:
            self._item_index.update({i: k for k, i in enumerate(self.item_ids.tolist())})
        key = str(external)
        if key not in self._item_index:
            raise UnknownNameError(f"unknown item {external!r} in dataset {self.name!r}")
        return self._item_index[key]

    # ------------------------------------------------------------------ derived copies
    def replace(self, **changes: object) -> "MultiBehaviorData":
        """A new validated container with some fields replaced (this one is unchanged)."""
        fields = {
            "name": self.name,
            "behaviors": self.behaviors,
            "train": dict(self.train),
            "valid": dict(self.valid),
            "test": dict(self.test),
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
            "description": self.description,
            "source": self.source,
        }
        fields.update(changes)
        return MultiBehaviorData(**fields)  # type: ignore[arg-type]

    def select_behaviors(self, behaviors: tuple[str, ...] | list[str]) -> "MultiBehaviorData":
        """Keep only ``behaviors`` (in the given order; the target must stay last)."""
        behaviors = tuple(behaviors)
        for b in behaviors:
            self.behavior_index(b)
        if behaviors[-1] != self.target:
            raise DataError(
                f"the target {self.target!r} must remain the last behavior, got {list(behaviors)}"
            )
        keep = lambda d: {b: d[b] for b in behaviors}  # noqa: E731
        return self.replace(
            behaviors=behaviors,
            train=keep(self.train),
            valid=keep(self.valid),
            test=keep(self.test),
            description=self.description + f" Behaviors restricted to {list(behaviors)}.",
        )

    def summary(self) -> str:
        c = self.counts()
        parts = ", ".join(f"{b} {c['train'][b]:,}" for b in self.behaviors)
        return (
            f"{self.name}: {self.n_users:,} users x {self.n_items:,} items; train {parts}; "
            f"valid {c['valid'][self.target]:,}, test {c['test'][self.target]:,} ({self.target})"
        )


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses mutation (the container is immutable)."""

    def _ro(self, *a: object, **k: object) -> None:
        raise TypeError("MultiBehaviorData is immutable; use .replace(...)")

    def __reduce__(self) -> tuple[object, ...]:
        return (_FrozenDict, (dict(self),))

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]
