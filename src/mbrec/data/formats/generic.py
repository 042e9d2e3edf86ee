"""The generic format: ``interactions.csv|.tsv|.parquet`` + ``dataset.yaml`` (documented in docs/data.md).

Columns: ``user``, ``item``, ``behavior`` (required), ``timestamp``, ``split`` (optional; values
``train``/``valid``/``test``). Ids are arbitrary strings. ``dataset.yaml`` keys:

* ``behaviors`` (required): upstream -> downstream; ``target`` (default the last; moved last);
* ``name``, ``description`` (optional);
* ``n_users`` / ``n_items`` (optional): must equal the number of distinct ids;
* ``users`` / ``items`` (optional): files with one id per line giving the id universe in index
  order (written by ``mbrec convert``, so users/items without interactions survive a round trip);
* ``heldout_unseen`` (optional, also a loader option): what to do with a held-out row whose
  user or item has no training row of any behavior: ``keep`` (default), ``drop`` or ``error``.

The id universe is every id in the file, all splits (or the ``users``/``items`` files).
Held-out rows of every behavior load as that behavior's ``valid``/``test`` matrices, never as
training pairs. Without a ``split`` column the target gets a per-user leave-one-out split
(latest by timestamp, else seeded random; see :func:`mbrec.data.split.leave_one_out`). Duplicate
(user, item, behavior, split) rows collapse to the earliest. Index order without
``users``/``items`` files: sorted ids (numerically when all ids are integers).

The table is streamed in bounded memory (:mod:`mbrec.data.formats.table`): integer codes per
row, one Python string per distinct value.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mbrec.data.container import MultiBehaviorData, pairs_to_csr
from mbrec.data.formats.table import EncodedTable, TableReader
from mbrec.data.io import check_options, suggest
from mbrec.data.split import leave_one_out
from mbrec.errors import DataError

FILES = ("interactions.csv", "interactions.tsv", "interactions.parquet")
REQUIRED = ("user", "item", "behavior")
OPTIONAL = ("timestamp", "split")
YAML_KEYS = ("behaviors", "target", "name", "description", "n_users", "n_items", "users", "items",
             "heldout_unseen")
OPTIONS: tuple[str, ...] = ("heldout_unseen",)
SPLITS = ("train", "valid", "test")
HELDOUT_UNSEEN = ("keep", "drop", "error")
#: ids longer than this are refused (most likely a broken quote swallowing the file; the id
#: arrays are fixed-width, so one huge id would cost memory for every id)
MAX_ID_CHARS = 1000
#: read CSV/TSV with pyarrow when it is installed (about 3x faster than pandas' C reader)
USE_PYARROW_CSV = True


def matches(files: set[str]) -> bool:
    """An interaction table, or a ``dataset.yaml`` that no other layout's files explain (so a
    missing or misplaced table gets the generic format's own error)."""
    if any(f in files for f in FILES):
        return True
    if "dataset.yaml" not in files:
        return False
    from mbrec.data.formats import crgcn_text, pickles, split_files

    return not any(m.matches(files) for m in (pickles, split_files, crgcn_text))


# ----------------------------------------------------------------------------- dataset.yaml
def _read_text(path: Path, what: str) -> str:
    """A small text file as UTF-8 (every failure a DataError naming the file)."""
    if path.is_dir():
        raise DataError("is a folder, not a file", path=path)
    if not path.exists():
        raise DataError(f"{what} is missing", path=path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror or e})", path=path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start:e.start + 1].hex()}); save it as UTF-8",
                        path=path, line=line) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path, "dataset.yaml (it must list the behaviors, upstream first)")
    try:
        meta = yaml.safe_load(text)
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
        twice = next(b for b in meta["behaviors"] if meta["behaviors"].count(b) > 1)
        raise DataError(f"'behaviors' lists {twice!r} twice", path=path, value=bs)
    return meta


def heldout_policy(options: dict[str, Any], meta: dict[str, Any], ypath: Path) -> str:
    """``heldout_unseen`` from the loader option, else dataset.yaml, else ``keep``."""
    from_option = "heldout_unseen" in options
    value = options["heldout_unseen"] if from_option else meta.get("heldout_unseen", "keep")
    if str(value) not in HELDOUT_UNSEEN:
        raise DataError(f"{'option ' if from_option else ''}'heldout_unseen' must be one of "
                        f"{list(HELDOUT_UNSEEN)}{suggest(str(value), HELDOUT_UNSEEN)}",
                        path=None if from_option else ypath, value=value)
    return str(value)


def _order_behaviors(meta: dict[str, Any], ypath: Path) -> tuple[list[str], str, list[str]]:
    """``(behaviors with the target last, target, notes)`` from dataset.yaml."""
    behaviors: list[str] = meta["behaviors"]
    notes: list[str] = []
    target = str(meta.get("target", behaviors[-1]))
    if target not in behaviors:
        raise DataError(f"target {target!r} is not in behaviors {behaviors}", path=ypath,
                        value=target)
    if behaviors[-1] != target:
        behaviors = [b for b in behaviors if b != target] + [target]
        notes.append(f"Target {target!r} moved last.")
    return behaviors, target, notes


# ----------------------------------------------------------------------------- the table
def _table_path(path: Path) -> Path:
    present = [path / f for f in FILES if (path / f).exists()]
    if len(present) > 1:
        raise DataError(f"several interaction tables ({', '.join(p.name for p in present)}); keep exactly one",
                        path=path)
    if not present:
        raise DataError(f"dataset.yaml is here but no interaction table ({' / '.join(FILES)})", path=path)
    if present[0].is_dir():
        raise DataError("is a folder, not a file", path=present[0])
    return present[0]


def _check_columns(cols: list[str], path: Path) -> None:
    known = REQUIRED + OPTIONAL
    if len(cols) == 1 and any(d in cols[0] for d in ("\t", ";", ",", "|")):
        found = next(d for d in ("\t", ";", ",", "|") if d in cols[0])
        want = "a tab" if path.suffix == ".tsv" else "a comma"
        fix = {"\t": "rename it to interactions.tsv", ",": "rename it to interactions.csv"}.get(
            found, f"replace {found!r} by {'tabs' if path.suffix == '.tsv' else 'commas'}")
        raise DataError(f"the header is one column {cols[0]!r}: this file is separated by {found!r}, but "
                        f"{path.name} must be separated by {want}: {fix}", path=path, line=1)
    for c in REQUIRED:
        if c not in cols:
            close = difflib.get_close_matches(c, [x for x in cols if x not in known], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"missing column {c!r}{hint}; found columns {cols}", path=path, line=1)
    for c in known:
        if cols.count(c) > 1:
            raise DataError(f"column {c!r} appears {cols.count(c)} times in the header", path=path,
                            line=1, value=c)
    for c in cols:
        if c not in known:
            close = difflib.get_close_matches(c, list(known), n=1, cutoff=0.75)
            if close:
                raise DataError(f"unknown column {c!r} (did you mean {close[0]!r}?)", path=path,
                                line=1, value=c)


class _Rows:
    """The table's rows as integer codes: users and items (codes into the distinct values
    ``ufound``/``ifound``, then indices into the universe after ``_map_ids``), behavior index,
    split index (0 train, 1 valid, 2 test), timestamps."""

    def __init__(self, reader: TableReader, enc: EncodedTable, behaviors: list[str]) -> None:
        self.reader, self.table = reader, reader.path
        u, i = enc.columns["user"], enc.columns["item"]
        for col, e in (("user", u), ("item", i)):
            _check_ids(reader, col, e)
        self.ucodes, self.ufound, self.icodes, self.ifound = u.codes, u.values, i.codes, i.values
        self.bcodes = _behavior_codes(reader, enc, behaviors)
        self.has_split = "split" in enc.columns
        self.scodes = _split_codes(reader, enc) if self.has_split else np.zeros(enc.n_rows, dtype=np.int8)
        self.ts = enc.ts

    def line(self, row: int) -> int:
        return self.reader.line(row)


def _first_row(codes: np.ndarray, bad_values: np.ndarray) -> int:
    """The first row whose code is flagged in ``bad_values`` (a boolean mask over the values)."""
    return int(np.flatnonzero(bad_values[codes])[0])


def _check_ids(reader: TableReader, col: str, e: Any) -> None:
    """No empty ids, none longer than :data:`MAX_ID_CHARS`."""
    if len(e.values) == 0:
        return
    empty = e.values == ""
    if empty.any():
        raise DataError(f"empty {col} id", path=reader.path, line=reader.line(_first_row(e.codes, empty)),
                        value="")
    long = np.char.str_len(e.values) > MAX_ID_CHARS
    if long.any():
        k = _first_row(e.codes, long)
        v = str(e.values[e.codes[k]])
        raise DataError(f"{col} id of {len(v):,} characters (at most {MAX_ID_CHARS:,}; an unclosed quote?)",
                        path=reader.path, line=reader.line(k), value=v[:40] + "...")


def _behavior_codes(reader: TableReader, enc: EncodedTable, behaviors: list[str]) -> np.ndarray:
    """Each row's behavior index; every declared behavior must have rows."""
    b = enc.columns["behavior"]
    bmap = pd.Index(behaviors).get_indexer(b.values)
    if (bmap < 0).any():
        bad = sorted(b.values[bmap < 0].tolist())
        k = _first_row(b.codes, bmap < 0)
        raise DataError(
            f"behavior(s) {bad} not declared in dataset.yaml {behaviors}{suggest(bad[0], behaviors)}",
            path=reader.path, line=reader.line(k), value=str(b.values[b.codes[k]]),
        )
    bcodes = bmap.astype(np.int16)[b.codes]
    counts = np.bincount(bcodes, minlength=len(behaviors))
    for name, c in zip(behaviors, counts):
        if c == 0:
            raise DataError(f"dataset.yaml lists behavior {name!r} but the file has no rows for it",
                            path=reader.path, value=name)
    return bcodes


def _split_codes(reader: TableReader, enc: EncodedTable) -> np.ndarray:
    """Each row's split index (0 train, 1 valid, 2 test)."""
    s = enc.columns["split"]
    smap = pd.Index(list(SPLITS)).get_indexer(s.values)
    if (smap < 0).any():
        k = _first_row(s.codes, smap < 0)
        v = str(s.values[s.codes[k]])
        raise DataError(f"split must be one of {list(SPLITS)}{suggest(v, SPLITS)}",
                        path=reader.path, line=reader.line(k), value=v)
    return smap.astype(np.int8)[s.codes]


# ----------------------------------------------------------------------------- ids
def _index(found: np.ndarray, universe: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(index into the universe of each distinct value, -1 if absent; ids in index order)."""
    if universe is None:
        universe = _sorted_ids(found)
    return pd.Index(universe).get_indexer(found), np.asarray(universe).astype(str)


def _sorted_ids(found: np.ndarray) -> np.ndarray:
    """Distinct ids sorted numerically when all are integers (of up to 18 digits), else as text."""
    s = pd.Series(found, dtype=object)
    if len(s) and s.str.fullmatch(r"-?\d{1,18}").all():
        return found[np.argsort(s.astype(np.int64).to_numpy(), kind="stable")]
    return np.sort(found)


def _read_ids(dir_: Path, fname: Any, yaml_path: Path) -> np.ndarray:
    p = dir_ / str(fname)
    if not p.exists():
        raise DataError(f"id file {fname!r} named in dataset.yaml not found", path=yaml_path)
    ids = np.array([ln.strip() for ln in _read_text(p, "id file").splitlines() if ln.strip()])
    if len(ids) == 0:
        raise DataError("empty id file", path=p)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError("duplicate id", path=p, value=str(uniq[counts > 1][0]))
    return ids


def _map_ids(rows: _Rows, path: Path, meta: dict[str, Any], ypath: Path) -> tuple[np.ndarray, np.ndarray]:
    """Replace the rows' codes by indices into the id universe; returns ``(user_ids, item_ids)``."""
    universes = {key: _read_ids(path, meta[key], ypath) if key in meta else None for key in ("users", "items")}
    umap, user_ids = _index(rows.ufound, universes["users"])
    imap, item_ids = _index(rows.ifound, universes["items"])
    for col, raw, found, cmap in (("user", rows.ucodes, rows.ufound, umap), ("item", rows.icodes, rows.ifound, imap)):
        if (cmap < 0).any():
            k = _first_row(raw, cmap < 0)
            raise DataError(f"{col} id not in the {col}s file named in dataset.yaml",
                            path=rows.table, line=rows.line(k), value=str(found[raw[k]]))
    small = lambda m: m.astype(np.int32) if len(m) < 2**31 else m  # noqa: E731 - 4 bytes a row, not 8
    rows.ucodes, rows.icodes = small(umap)[rows.ucodes], small(imap)[rows.icodes]
    for key, n in (("n_users", len(user_ids)), ("n_items", len(item_ids))):
        if key in meta and int(meta[key]) != n:
            raise DataError(f"dataset.yaml declares {key}: {meta[key]} but the file has {n:,}",
                            path=ypath, value=meta[key])
    return user_ids, item_ids


# ----------------------------------------------------------------------------- load
def load(path: Path, *, name: str, seed: int = 0, **options: Any) -> MultiBehaviorData:
    check_options(options, OPTIONS, "the generic format")
    table = _table_path(path)
    ypath = path / "dataset.yaml"
    meta = _read_yaml(ypath)
    policy = heldout_policy(options, meta, ypath)
    behaviors, target, notes = _order_behaviors(meta, ypath)
    reader = TableReader(table, use_pyarrow_csv=USE_PYARROW_CSV)
    _check_columns(reader.columns, table)
    has_ts = "timestamp" in reader.columns
    id_cols = REQUIRED + (("split",) if "split" in reader.columns else ())
    enc = reader.read(id_cols, "timestamp" if has_ts else None)
    if enc.n_rows == 0:
        raise DataError("no interaction rows" + ("" if reader.parquet else " (the file has only a header)"),
                        path=table)
    rows = _Rows(reader, enc, behaviors)
    del enc
    user_ids, item_ids = _map_ids(rows, path, meta, ypath)
    pairs = _collapse_duplicates(rows, len(item_ids), len(behaviors))
    if not rows.has_split:
        notes.append(_leave_one_out(pairs, len(behaviors) - 1, target, seed))
    fixed = ("users" in meta, "items" in meta)
    pairs, user_ids, item_ids, note = _heldout_unseen(policy, pairs, rows, user_ids, item_ids, fixed)
    if note:
        notes.append(note)
    fu, fi, fb, fs = pairs["u"], pairs["i"], pairs["b"], pairs["s"]
    mats = _matrices(fu, fi, fb, fs, behaviors, len(user_ids), len(item_ids))
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


def _collapse_duplicates(rows: _Rows, n_items: int, nb: int) -> dict[str, Any]:
    """One pair per distinct (user, item, behavior, split): arrays ``u``, ``i``, ``b``, ``s``,
    ``ts`` (the earliest row's timestamp, or None) and, without a split column, ``row`` (the
    kept row's index in the file, rows in file order: the leave-one-out draw depends on it)."""
    ts = rows.ts
    key = (rows.ucodes.astype(np.int64) * n_items + rows.icodes) * nb + rows.bcodes
    key *= 3
    key += rows.scodes
    if rows.has_split and ts is None:  # order and row do not matter: sort the keys and decode them
        key.sort()  # (np.unique would hash first: several times slower on 10^7 keys)
        key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
        s = (key % 3).astype(np.int8)
        key //= 3
        b = (key % nb).astype(np.int16)
        key //= nb
        return {"u": key // n_items, "i": key % n_items, "b": b, "s": s, "ts": None}
    if ts is not None:
        order = np.argsort(ts, kind="stable")
        _, first = np.unique(key[order], return_index=True)
        kept = order[np.sort(first)]
    else:
        _, first = np.unique(key, return_index=True)
        kept = np.sort(first)
    del key
    return {"u": rows.ucodes[kept].astype(np.int64), "i": rows.icodes[kept].astype(np.int64),
            "b": rows.bcodes[kept], "s": rows.scodes[kept].copy(),
            "ts": None if ts is None else ts[kept], "row": kept}


def _leave_one_out(pairs: dict[str, Any], tcode: int, target: str, seed: int) -> str:
    """No split column: hold out the target per user (``pairs['s']`` is updated in place);
    returns the note."""
    fu, fb, fs, ts = pairs["u"], pairs["b"], pairs["s"], pairs["ts"]
    tsel = np.flatnonzero(fb == tcode)
    rng = np.random.default_rng(seed)
    is_valid, is_test = leave_one_out(fu[tsel], rng, None if ts is None else ts[tsel])
    fs[tsel[is_valid]] = 1
    fs[tsel[is_test]] = 2
    how = "latest by timestamp" if ts is not None else f"random (seed {seed})"
    return (f"No split column: leave-one-out split of {target!r}, {how}: test for users with "
            f">= 2 {target} items ({int(is_test.sum()):,}), valid for users with >= 3 "
            f"({int(is_valid.sum()):,}).")


def _heldout_unseen(policy: str, pairs: dict[str, Any], rows: _Rows, user_ids: np.ndarray,
                    item_ids: np.ndarray, fixed: tuple[bool, bool]) -> tuple[dict[str, Any], np.ndarray, np.ndarray, str]:
    """Apply ``heldout_unseen`` to held-out rows whose user or item has no training row of any
    behavior; returns ``(pairs, user_ids, item_ids, note)``."""
    fu, fi, fs = pairs["u"], pairs["i"], pairs["s"]
    train = fs == 0
    u_seen = np.bincount(fu[train], minlength=len(user_ids)) > 0
    i_seen = np.bincount(fi[train], minlength=len(item_ids)) > 0
    cold_u, cold_i = (fs > 0) & ~u_seen[fu], (fs > 0) & ~i_seen[fi]
    cold = cold_u | cold_i
    if not cold.any():
        return pairs, user_ids, item_ids, ""
    n_rows, n_u, n_i = int(cold.sum()), len(np.unique(fu[cold_u])), len(np.unique(fi[cold_i]))
    what = (f"held-out rows naming a user or item with no training row: {n_rows:,} "
            f"({n_u:,} users, {n_i:,} items)")
    if policy == "error":
        if "row" in pairs:  # split assigned by leave-one-out: the pairs know their rows
            k = int(np.argmin(np.where(cold, pairs["row"], np.iinfo(np.int64).max)))
            row, u, i, s = int(pairs["row"][k]), fu[k], fi[k], fs[k]
        else:  # split column: the first such row of the file
            raw = (rows.scodes > 0) & (~u_seen[rows.ucodes] | ~i_seen[rows.icodes])
            row = int(np.flatnonzero(raw)[0])
            u, i, s = rows.ucodes[row], rows.icodes[row], rows.scodes[row]
        col, value = ("user", user_ids[u]) if not u_seen[u] else ("item", item_ids[i])
        raise DataError(f"{SPLITS[s]} row for a {col} with no training row of any behavior "
                        f"(heldout_unseen: error; {what}; keep or drop loads them)",
                        path=rows.table, line=rows.line(row), value=str(value))
    if policy == "keep":
        return pairs, user_ids, item_ids, f"{what.capitalize()}, kept (heldout_unseen: keep)."
    pairs = {k: (v[~cold] if v is not None else None) for k, v in pairs.items()}
    user_ids, pairs["u"] = (user_ids, pairs["u"]) if fixed[0] else _compact(pairs["u"], user_ids)
    item_ids, pairs["i"] = (item_ids, pairs["i"]) if fixed[1] else _compact(pairs["i"], item_ids)
    return pairs, user_ids, item_ids, f"{what.capitalize()}, dropped (heldout_unseen: drop)."


def _compact(codes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove ids no row uses; ``(remaining ids in their order, codes renumbered)``."""
    used = np.bincount(codes, minlength=len(ids)) > 0
    new = np.cumsum(used) - 1
    return ids[used], new[codes]


def _matrices(fu: np.ndarray, fi: np.ndarray, fb: np.ndarray, fs: np.ndarray, behaviors: list[str],
              n_users: int, n_items: int) -> dict[str, dict[str, Any]]:
    """``{split: {behavior: CSR}}``."""
    mats: dict[str, dict[str, Any]] = {s: {} for s in SPLITS}
    group = fb.astype(np.int16) * len(SPLITS) + fs  # small integers: numpy's stable sort is a radix sort
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(behaviors) * len(SPLITS) + 1))
    for k, b in enumerate(behaviors):
        for j, s in enumerate(SPLITS):
            g = k * len(SPLITS) + j
            sel = order[bounds[g]:bounds[g + 1]]
            mats[s][b] = pairs_to_csr(fu[sel], fi[sel], n_users, n_items)
    return mats
