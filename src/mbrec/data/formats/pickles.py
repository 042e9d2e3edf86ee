"""HKUDS/PKEF/COPF pickled-CSR layout: ``trn_{behavior}`` pickles + ``tst_int``.

* ``trn_pv``, ``trn_cart``, ``trn_buy`` (Tmall: ``trn_click``, ``trn_collect``...): pickled scipy
  sparse matrices ``[n_users, n_items]``, 0-based, binarised as value != 0. A file named
  ``trn_<b>_DERIVED`` (``mule-taobao/pkef_pickles/trn_pv_DERIVED``) is read as ``trn_<b>``.
* ``tst_int``: a pickled list, one entry per user: an item id, a list of item ids, or ``None``
  (no test item). Option ``test_file`` picks another list (e.g. ``tst_int_mbgmn10k``).
* The id universe is the matrix shape; external ids are ``"0".."n-1"``. No validation split
  (COPF/PKEF select on test); load with option ``carve_valid=True`` to carve one.

Only load pickles you trust: unpickling can run code.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData, pairs_to_csr
from mbrec.data.formats.common import TARGET_NAMES, numeric_ids, order_behaviors, stage_of
from mbrec.data.io import check_options
from mbrec.errors import DataError

OPTIONS = ("test_file",)
SUFFIX = "_DERIVED"


def matches(files: set[str]) -> bool:
    return any(f.startswith("trn_") for f in files) and any(f.startswith("tst_") for f in files)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pickle.load(fh)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise DataError(f"unreadable pickle ({type(e).__name__}: {e})", path=path) from None


def _behavior_files(files: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in sorted(files):
        if not f.startswith("trn_"):
            continue
        b = f[4:]
        if b.endswith(SUFFIX):
            b = b[: -len(SUFFIX)]
            if f"trn_{b}" in files:
                continue  # the original wins over a derived copy
        out[b] = f
    return out


def _test_pairs(obj: Any, path: Path, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)):
        raise DataError("test list must be a list with one entry per user", path=path,
                        value=type(obj).__name__)
    if len(obj) != n_users:
        raise DataError(f"test list has {len(obj)} entries but the matrices have {n_users} users",
                        path=path, value=len(obj))
    users: list[int] = []
    items: list[int] = []
    for u, e in enumerate(obj):
        if e is None:
            continue
        if isinstance(e, (list, tuple, np.ndarray)):
            vals = list(e)
        else:
            vals = [e]
        for v in vals:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise DataError(f"test entry of user {u} is not an item id", path=path,
                                line=u + 1, value=v)
            users.append(u)
            items.append(int(v))
    ua = np.asarray(users, dtype=np.int64)
    ia = np.asarray(items, dtype=np.int64)
    bad = (ia < 0) | (ia >= n_items)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataError(f"test item of user {int(ua[k])} is outside 0..{n_items - 1}",
                        path=path, line=int(ua[k]) + 1, value=int(ia[k]))
    return ua, ia


def load(path: Path, *, name: str, seed: int = 0, **options: Any) -> MultiBehaviorData:
    check_options(options, OPTIONS, "the HKUDS/PKEF pickle layout")
    files = {p.name for p in path.iterdir() if p.is_file()}
    bfiles = _behavior_files(files)
    unknown = [b for b in bfiles if stage_of(b) < 0]
    if unknown:
        raise DataError(
            f"unknown behavior name(s) {unknown} in trn_* files; known: "
            "pv/view/click, collect/fav, cart, buy", path=path,
        )
    targets = [b for b in bfiles if b in TARGET_NAMES]
    if len(targets) != 1:
        raise DataError(f"expected exactly one target file trn_buy, found {targets}", path=path)
    behaviors = order_behaviors([b for b in bfiles if b not in TARGET_NAMES]) + targets
    mats: dict[str, sp.csr_matrix] = {}
    shape: tuple[int, int] | None = None
    for b in behaviors:
        f = path / bfiles[b]
        m = _unpickle(f)
        if isinstance(m, np.ndarray) and m.ndim == 2:
            m = sp.csr_matrix(m)
        if not sp.issparse(m) or m.ndim != 2:
            raise DataError("expected a pickled scipy sparse matrix", path=f,
                            value=type(m).__name__)
        m = sp.csr_matrix(m)
        if shape is None:
            shape = m.shape
        elif m.shape != shape:
            raise DataError(f"matrix shape {m.shape} differs from the other behaviors' {shape}",
                            path=f, value=m.shape)
        m.eliminate_zeros()
        mats[b] = m
    assert shape is not None
    if mats[targets[0]].nnz == 0:
        raise DataError("the target behavior has no training pairs", path=path / bfiles[targets[0]])
    n_users, n_items = int(shape[0]), int(shape[1])
    tname = str(options.get("test_file", "tst_int"))
    if tname not in files:
        raise DataError(f"test list {tname!r} not found; files: {sorted(files)}", path=path)
    tu, ti = _test_pairs(_unpickle(path / tname), path / tname, n_users, n_items)
    derived = [f for f in bfiles.values() if f.endswith(SUFFIX)]
    desc = (
        f"HKUDS/PKEF pickle layout, 0-based ids; behaviors {behaviors} from "
        f"{[bfiles[b] for b in behaviors]}; test from {tname} ({len(tu):,} pairs over "
        f"{len(np.unique(tu)):,} users); no validation split."
        + (f" {derived} read as trn_<behavior>." if derived else "")
    )
    return MultiBehaviorData(
        name=name,
        behaviors=tuple(behaviors),
        train=mats,
        valid={},
        test={targets[0]: pairs_to_csr(tu, ti, n_users, n_items)},
        user_ids=numeric_ids(n_users, 0),
        item_ids=numeric_ids(n_items, 0),
        description=desc,
        source=str(path),
    )
