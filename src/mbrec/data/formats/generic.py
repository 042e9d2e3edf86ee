"""The generic format: ``interactions.csv|.tsv|.parquet`` + ``dataset.yaml`` (design.md contract).

Columns: ``user``, ``item``, ``behavior`` (required), ``timestamp``, ``split`` (optional; values
``train``/``valid``/``test``). Ids are arbitrary strings. ``dataset.yaml`` keys:

* ``behaviors`` (required): upstream -> downstream; ``target`` (default the last; moved last);
* ``name``, ``description`` (optional);
* ``n_users`` / ``n_items`` (optional): must equal the number of distinct ids;
* ``users`` / ``items`` (optional): files with one id per line giving the id universe in index
  order (written by ``mbrec convert``, so users/items without interactions survive a round trip).

Without a ``split`` column the target gets a per-user leave-one-out split (latest by timestamp,
else seeded random; see :func:`mbrec.data.split.leave_one_out`). Duplicate (user, item,
behavior, split) rows collapse to the earliest. Index order without ``users``/``items`` files:
sorted ids (numerically when all ids are integers).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mbrec.data.container import MultiBehaviorData, pairs_to_csr
from mbrec.data.io import check_options, nth_data_line, suggest
from mbrec.data.split import leave_one_out
from mbrec.errors import DataError

FILES = ("interactions.csv", "interactions.tsv", "interactions.parquet")
REQUIRED = ("user", "item", "behavior")
OPTIONAL = ("timestamp", "split")
YAML_KEYS = ("behaviors", "target", "name", "description", "n_users", "n_items", "users", "items")
OPTIONS: tuple[str, ...] = ()
SPLITS = ("train", "valid", "test")


def matches(files: set[str]) -> bool:
    return any(f in files for f in FILES)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError("dataset.yaml is missing (it must list the behaviors, upstream first)",
                        path=path)
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"invalid YAML ({getattr(e, 'problem', e)})", path=path,
                        line=None if mark is None else mark.line + 1) from None
    if not isinstance(meta, dict):
        raise DataError("dataset.yaml must be a mapping with a 'behaviors' list", path=path)
    for key in meta:
        if key not in YAML_KEYS:
            raise DataError(f"unknown key {key!r}{suggest(key, YAML_KEYS)}; known: {list(YAML_KEYS)}",
                            path=path)
    bs = meta.get("behaviors")
    if not isinstance(bs, list) or not bs or not all(isinstance(b, (str, int)) for b in bs):
        raise DataError("'behaviors' must be a non-empty list of names", path=path,
                        value=bs)
    meta["behaviors"] = [str(b) for b in bs]
    if len(set(meta["behaviors"])) != len(bs):
        raise DataError("'behaviors' lists a name twice", path=path, value=bs)
    return meta


def _read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """The table as strings (ids stay exactly as written) and the row -> line offset."""
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install 'mbrec[parquet]'",
                            path=path) from None
        except Exception as e:  # noqa: BLE001
            raise DataError(f"unreadable parquet file ({e})", path=path) from None
        return df, 1
    sep = "\t" if path.suffix == ".tsv" else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, engine="c")
    except pd.errors.EmptyDataError:
        raise DataError("empty file (expected a header line user,item,behavior,...)",
                        path=path) from None
    except pd.errors.ParserError as e:
        raise DataError(f"malformed table ({e})", path=path) from None
    return df, 2


def _line(path: Path, offset: int, row: int) -> int:
    if path.suffix == ".parquet":
        return row + 1
    return nth_data_line(path, row + 1)


def _check_columns(df: pd.DataFrame, path: Path) -> None:
    cols = [str(c) for c in df.columns]
    known = REQUIRED + OPTIONAL
    for c in REQUIRED:
        if c not in cols:
            close = difflib.get_close_matches(c, [x for x in cols if x not in known], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"missing column {c!r}{hint}; found columns {cols}", path=path, line=1)
    for c in cols:
        if c not in known:
            close = difflib.get_close_matches(c, list(known), n=1, cutoff=0.75)
            if close:
                raise DataError(f"unknown column {c!r} (did you mean {close[0]!r}?)", path=path,
                                line=1, value=c)


def _index(values: np.ndarray, universe: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(index of each value, ids in index order)."""
    if universe is None:
        uniq = pd.unique(values)
        s = pd.Series(uniq, dtype=str)
        if len(s) and s.str.fullmatch(r"-?\d{1,18}").all():
            uniq = uniq[np.argsort(s.astype(np.int64).to_numpy(), kind="stable")]
        else:
            uniq = np.sort(uniq.astype(str))
        universe = uniq.astype(str)
    codes = pd.Index(universe).get_indexer(values)
    return codes, universe


def _read_ids(dir_: Path, fname: Any, yaml_path: Path) -> np.ndarray:
    p = dir_ / str(fname)
    if not p.is_file():
        raise DataError(f"id file {fname!r} named in dataset.yaml not found", path=yaml_path)
    ids = np.array([ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()])
    if len(ids) == 0:
        raise DataError("empty id file", path=p)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError("duplicate id", path=p, value=str(uniq[counts > 1][0]))
    return ids


def load(path: Path, *, name: str, seed: int = 0, **options: Any) -> MultiBehaviorData:
    check_options(options, OPTIONS, "the generic format")
    table = next(path / f for f in FILES if (path / f).is_file())
    ypath = path / "dataset.yaml"
    meta = _read_yaml(ypath)
    behaviors: list[str] = meta["behaviors"]
    notes: list[str] = []
    target = str(meta.get("target", behaviors[-1]))
    if target not in behaviors:
        raise DataError(f"target {target!r} is not in behaviors {behaviors}", path=ypath,
                        value=target)
    if behaviors[-1] != target:
        behaviors = [b for b in behaviors if b != target] + [target]
        notes.append(f"Target {target!r} moved last.")

    df, offset = _read_table(table)
    _check_columns(df, table)
    n_rows = len(df)
    if n_rows == 0:
        raise DataError("no interaction rows", path=table)
    user = df["user"].astype(str).str.strip().to_numpy()
    item = df["item"].astype(str).str.strip().to_numpy()
    beh = df["behavior"].astype(str).str.strip().to_numpy()
    for col, vals in (("user", user), ("item", item)):
        empty = vals == ""
        if empty.any():
            k = int(np.flatnonzero(empty)[0])
            raise DataError(f"empty {col} id", path=table, line=_line(table, offset, k), value="")
    bcodes = pd.Index(behaviors).get_indexer(beh)
    if (bcodes < 0).any():
        k = int(np.flatnonzero(bcodes < 0)[0])
        bad = sorted(set(beh[bcodes < 0].tolist()))
        raise DataError(
            f"behavior(s) {bad} not declared in dataset.yaml {behaviors}{suggest(beh[k], behaviors)}",
            path=table, line=_line(table, offset, k), value=str(beh[k]),
        )
    has_split = "split" in df.columns
    if has_split:
        split = df["split"].astype(str).str.strip().to_numpy()
        scodes = pd.Index(list(SPLITS)).get_indexer(split)
        if (scodes < 0).any():
            k = int(np.flatnonzero(scodes < 0)[0])
            raise DataError(f"split must be one of {list(SPLITS)}{suggest(split[k], SPLITS)}",
                            path=table, line=_line(table, offset, k), value=str(split[k]))
    else:
        scodes = np.zeros(n_rows, dtype=np.int64)
    ts = None
    if "timestamp" in df.columns:
        raw_ts = df["timestamp"]
        num = pd.to_numeric(raw_ts, errors="coerce")
        if num.isna().any():
            dt = pd.to_datetime(raw_ts, errors="coerce", utc=True)
            if dt.isna().any():
                k = int(np.flatnonzero(dt.isna().to_numpy())[0])
                raise DataError("timestamp is neither a number nor a date", path=table,
                                line=_line(table, offset, k), value=str(raw_ts.iloc[k]))
            num = pd.Series(dt.astype("int64"), index=raw_ts.index)
        ts = num.to_numpy(dtype=np.float64)

    counts = np.bincount(bcodes, minlength=len(behaviors))
    for b, c in zip(behaviors, counts):
        if c == 0:
            raise DataError(f"dataset.yaml lists behavior {b!r} but the file has no rows for it",
                            path=table, value=b)

    universes = {}
    for key in ("users", "items"):
        universes[key] = _read_ids(path, meta[key], ypath) if key in meta else None
    ucodes, user_ids = _index(user, universes["users"])
    icodes, item_ids = _index(item, universes["items"])
    for col, codes, vals in (("user", ucodes, user), ("item", icodes, item)):
        if (codes < 0).any():
            k = int(np.flatnonzero(codes < 0)[0])
            raise DataError(f"{col} id not in the {col}s file named in dataset.yaml",
                            path=table, line=_line(table, offset, k), value=str(vals[k]))
    for key, n in (("n_users", len(user_ids)), ("n_items", len(item_ids))):
        if key in meta and int(meta[key]) != n:
            raise DataError(f"dataset.yaml declares {key}: {meta[key]} but the file has {n:,}",
                            path=ypath, value=meta[key])
    if has_split and universes["users"] is None:
        _check_heldout_known(table, offset, scodes, ucodes, "user", user)
    if has_split and universes["items"] is None:
        _check_heldout_known(table, offset, scodes, icodes, "item", item)

    # Duplicates collapse to the earliest row of each (user, item, behavior, split).
    frame = pd.DataFrame({"u": ucodes, "i": icodes, "b": bcodes, "s": scodes})
    if ts is not None:
        frame["t"] = ts
        frame = frame.sort_values("t", kind="stable")
    frame = frame.drop_duplicates(["u", "i", "b", "s"], keep="first")
    n_users, n_items = len(user_ids), len(item_ids)
    tcode = len(behaviors) - 1
    if not has_split:
        tgt = frame[frame.b == tcode]
        rng = np.random.default_rng(seed)
        is_valid, is_test = leave_one_out(
            tgt.u.to_numpy(), rng, None if ts is None else tgt.t.to_numpy()
        )
        s = np.zeros(len(tgt), dtype=np.int64)
        s[is_valid] = 1
        s[is_test] = 2
        frame.loc[tgt.index, "s"] = s
        how = "latest by timestamp" if ts is not None else f"random (seed {seed})"
        notes.append(
            f"No split column: leave-one-out split of {target!r}, {how}: test for users with "
            f">= 2 {target} items ({int(is_test.sum()):,}), valid for users with >= 3 "
            f"({int(is_valid.sum()):,})."
        )
    mats: dict[str, dict[str, Any]] = {s: {} for s in SPLITS}
    fu, fi, fb, fs = (frame[c].to_numpy() for c in ("u", "i", "b", "s"))
    for k, b in enumerate(behaviors):
        for j, s in enumerate(SPLITS):
            sel = (fb == k) & (fs == j)
            mats[s][b] = pairs_to_csr(fu[sel], fi[sel], n_users, n_items)
    if mats["train"][target].nnz == 0:
        raise DataError(f"the target behavior {target!r} has no training rows", path=table)
    desc = meta.get("description") or ""
    desc = (str(desc) + " " if desc else "") + f"Generic format ({table.name}). " + " ".join(notes)
    return MultiBehaviorData(
        name=str(meta.get("name", name)),
        behaviors=tuple(behaviors),
        train=mats["train"], valid=mats["valid"], test=mats["test"],
        user_ids=user_ids, item_ids=item_ids, description=desc.strip(), source=str(path),
    )


def _check_heldout_known(
    table: Path, offset: int, scodes: np.ndarray, codes: np.ndarray, what: str, vals: np.ndarray
) -> None:
    """Held-out rows must name users/items that occur in some training row."""
    seen = np.zeros(int(codes.max()) + 1, dtype=bool)
    seen[codes[scodes == 0]] = True
    bad = (scodes > 0) & ~seen[codes]
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"held-out row for a {what} with no training rows (unknown {what}; list all ids in a "
            f"'{what}s' file in dataset.yaml to allow it)",
            path=table, line=_line(table, offset, k), value=str(vals[k]),
        )
