"""The generic format: ``interactions.csv|.tsv|.parquet`` + ``dataset.yaml`` (documented in docs/data.md).

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
#: read CSV/TSV with pyarrow when it is installed (about 3x faster than pandas' C reader)
USE_PYARROW_CSV = True


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


class _Table:
    """Columns of the interaction table as strings, read with pyarrow when installed (fast,
    multi-threaded) else pandas' C reader. Ids are factorized once; work on distinct values only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arrow = None
        self._df: pd.DataFrame | None = None
        try:
            import pyarrow as pa
            import pyarrow.csv as pacsv
        except ImportError:
            pa = None
        if path.suffix == ".parquet":
            if pa is None:
                raise DataError("reading .parquet needs pyarrow: pip install 'mbrec[parquet]'",
                                path=path)
            import pyarrow.parquet as pq

            try:
                self._arrow = pq.read_table(path)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"unreadable parquet file ({e})", path=path) from None
        elif pa is not None and USE_PYARROW_CSV:
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    first = fh.readline().rstrip("\r\n")
                names = [c.strip().strip('"') for c in first.split(self._sep)]
                self._arrow = pacsv.read_csv(
                    path,
                    parse_options=pacsv.ParseOptions(delimiter=self._sep),
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in names}, strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
            except pa.ArrowInvalid as e:
                msg = str(e)
                if "Empty CSV file" in msg:
                    raise DataError("empty file (expected a header line user,item,behavior,...)",
                                    path=path) from None
                raise DataError(f"malformed table ({msg.splitlines()[0]})", path=path) from None
        else:
            try:
                self._df = pd.read_csv(path, sep=self._sep, dtype=str, keep_default_na=False)
            except pd.errors.EmptyDataError:
                raise DataError("empty file (expected a header line user,item,behavior,...)",
                                path=path) from None
            except pd.errors.ParserError as e:
                raise DataError(f"malformed table ({e})", path=path) from None

    @property
    def _sep(self) -> str:
        return "\t" if self.path.suffix == ".tsv" else ","

    @property
    def columns(self) -> list[str]:
        if self._arrow is not None:
            return [str(c) for c in self._arrow.column_names]
        assert self._df is not None
        return [str(c) for c in self._df.columns]

    def __len__(self) -> int:
        return self._arrow.num_rows if self._arrow is not None else len(self._df)  # type: ignore[arg-type]

    def series(self, col: str) -> pd.Series:
        if self._arrow is not None:
            return self._arrow.column(col).to_pandas()
        assert self._df is not None
        return self._df[col]

    def codes(self, col: str) -> tuple[np.ndarray, np.ndarray]:
        """(code of each row, distinct values stripped of surrounding blanks, as str)."""
        if self._arrow is not None:
            import pyarrow as pa
            import pyarrow.compute as pc

            arr = self._arrow.column(col)
            if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
                arr = pc.cast(arr, pa.string())
            enc = arr.combine_chunks().dictionary_encode() if arr.num_chunks != 1 else arr.chunk(0).dictionary_encode()
            codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            uniq = enc.dictionary.to_pylist()
        else:
            codes, uniq = pd.factorize(self.series(col).astype(str))
        stripped = np.asarray(["" if v is None else str(v).strip() for v in uniq], dtype=object)
        c2, u2 = pd.factorize(stripped)
        return c2[codes], np.asarray(u2, dtype=object).astype(str)


def _line(path: Path, offset: int, row: int) -> int:
    if path.suffix == ".parquet":
        return row + 1
    return nth_data_line(path, row + 1)


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
    for c in cols:
        if c not in known:
            close = difflib.get_close_matches(c, list(known), n=1, cutoff=0.75)
            if close:
                raise DataError(f"unknown column {c!r} (did you mean {close[0]!r}?)", path=path,
                                line=1, value=c)


def _index(found: np.ndarray, universe: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(index into the universe of each distinct value, -1 if absent; ids in index order)."""
    if universe is None:
        s = pd.Series(found, dtype=object)
        if len(s) and s.str.fullmatch(r"-?\d{1,18}").all():
            universe = found[np.argsort(s.astype(np.int64).to_numpy(), kind="stable")]
        else:
            universe = np.sort(found)
    return pd.Index(universe).get_indexer(found), np.asarray(universe).astype(str)


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
    present = [path / f for f in FILES if (path / f).exists()]
    if len(present) > 1:
        raise DataError(f"several interaction tables ({', '.join(p.name for p in present)}); keep exactly one",
                        path=path)
    table = present[0]
    if table.is_dir():
        raise DataError("is a folder, not a file", path=table)
    ypath = path / "dataset.yaml"
    meta = _read_yaml(ypath)
    behaviors, target, notes = _order_behaviors(meta, ypath)
    df = _Table(table)
    _check_columns(df.columns, table)
    if len(df) == 0:
        raise DataError("no interaction rows", path=table)
    rows = _Rows.read(df, table, behaviors)
    user_ids, item_ids = _map_ids(rows, path, meta, ypath)
    fu, fi, fb, fs, kept_ts = _collapse_duplicates(rows, len(item_ids), len(behaviors))
    if not rows.has_split:
        notes.append(_leave_one_out(fu, fb, fs, kept_ts, len(behaviors) - 1, target, seed))
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


class _Rows:
    """The table's rows as integer codes: users and items (codes into the distinct values
    ``ufound``/``ifound``), behavior index, split index (0 train, 1 valid, 2 test), timestamps."""

    def __init__(self, table: Path, ucodes: np.ndarray, ufound: np.ndarray, icodes: np.ndarray,
                 ifound: np.ndarray, bcodes: np.ndarray, scodes: np.ndarray, has_split: bool,
                 ts: np.ndarray | None) -> None:
        self.table, self.offset = table, 1 if table.suffix == ".parquet" else 2
        self.ucodes, self.ufound, self.icodes, self.ifound = ucodes, ufound, icodes, ifound
        self.bcodes, self.scodes, self.has_split, self.ts = bcodes, scodes, has_split, ts

    @classmethod
    def read(cls, df: _Table, table: Path, behaviors: list[str]) -> "_Rows":
        offset = 1 if table.suffix == ".parquet" else 2
        ucodes, ufound = df.codes("user")
        icodes, ifound = df.codes("item")
        for col, codes, found in (("user", ucodes, ufound), ("item", icodes, ifound)):
            if (found == "").any():
                k = int(np.flatnonzero(found[codes] == "")[0])
                raise DataError(f"empty {col} id", path=table, line=_line(table, offset, k), value="")
        bcodes = _behavior_codes(df, table, offset, behaviors)
        has_split = "split" in df.columns
        scodes = _split_codes(df, table, offset) if has_split else np.zeros(len(df), dtype=np.int64)
        ts = _timestamps(df, table, offset) if "timestamp" in df.columns else None
        return cls(table, ucodes, ufound, icodes, ifound, bcodes, scodes, has_split, ts)

    def line(self, row: int) -> int:
        return _line(self.table, self.offset, row)



def _behavior_codes(df: _Table, table: Path, offset: int, behaviors: list[str]) -> np.ndarray:
    """Each row's behavior index; every declared behavior must have rows."""
    bcodes, bfound = df.codes("behavior")
    bmap = pd.Index(behaviors).get_indexer(bfound)
    if (bmap < 0).any():
        bad = sorted(bfound[bmap < 0].tolist())
        k = int(np.flatnonzero(bmap[bcodes] < 0)[0])
        raise DataError(
            f"behavior(s) {bad} not declared in dataset.yaml {behaviors}{suggest(bad[0], behaviors)}",
            path=table, line=_line(table, offset, k), value=str(bfound[bcodes[k]]),
        )
    bcodes = bmap[bcodes]
    counts = np.bincount(bcodes, minlength=len(behaviors))
    for b, c in zip(behaviors, counts):
        if c == 0:
            raise DataError(f"dataset.yaml lists behavior {b!r} but the file has no rows for it",
                            path=table, value=b)
    return bcodes


def _split_codes(df: _Table, table: Path, offset: int) -> np.ndarray:
    """Each row's split index (0 train, 1 valid, 2 test)."""
    scodes, sfound = df.codes("split")
    scodes = pd.Index(list(SPLITS)).get_indexer(sfound)[scodes]
    if (scodes < 0).any():
        k = int(np.flatnonzero(scodes < 0)[0])
        v = str(df.series("split").iloc[k]).strip()
        raise DataError(f"split must be one of {list(SPLITS)}{suggest(v, SPLITS)}",
                        path=table, line=_line(table, offset, k), value=v)
    return scodes


def _timestamps(df: _Table, table: Path, offset: int) -> np.ndarray:
    """Timestamps as float seconds: numbers as they are, dates parsed (UTC nanoseconds)."""
    raw_ts = df.series("timestamp")
    num = pd.to_numeric(raw_ts, errors="coerce")
    if num.isna().any():
        dt = pd.to_datetime(raw_ts, errors="coerce", utc=True)
        if dt.isna().any():
            k = int(np.flatnonzero(dt.isna().to_numpy())[0])
            raise DataError("timestamp is neither a number nor a date", path=table,
                            line=_line(table, offset, k), value=str(raw_ts.iloc[k]))
        num = pd.Series(dt.astype("int64"), index=raw_ts.index)
    return num.to_numpy(dtype=np.float64)


def _map_ids(rows: _Rows, path: Path, meta: dict[str, Any], ypath: Path) -> tuple[np.ndarray, np.ndarray]:
    """Replace the rows' codes by indices into the id universe; returns ``(user_ids, item_ids)``."""
    universes = {key: _read_ids(path, meta[key], ypath) if key in meta else None for key in ("users", "items")}
    umap, user_ids = _index(rows.ufound, universes["users"])
    imap, item_ids = _index(rows.ifound, universes["items"])
    rows.ucodes, rows.icodes = umap[rows.ucodes], imap[rows.icodes]
    for col, codes, found, cmap in (("user", rows.ucodes, rows.ufound, umap), ("item", rows.icodes, rows.ifound, imap)):
        if (codes < 0).any():
            k = int(np.flatnonzero(codes < 0)[0])
            raise DataError(f"{col} id not in the {col}s file named in dataset.yaml",
                            path=rows.table, line=rows.line(k), value=str(found[np.flatnonzero(cmap < 0)[0]]))
    for key, n in (("n_users", len(user_ids)), ("n_items", len(item_ids))):
        if key in meta and int(meta[key]) != n:
            raise DataError(f"dataset.yaml declares {key}: {meta[key]} but the file has {n:,}",
                            path=ypath, value=meta[key])
    if rows.has_split and universes["users"] is None:
        _check_heldout_known(rows.table, rows.offset, rows.scodes, rows.ucodes, "user", user_ids)
    if rows.has_split and universes["items"] is None:
        _check_heldout_known(rows.table, rows.offset, rows.scodes, rows.icodes, "item", item_ids)
    return user_ids, item_ids


def _collapse_duplicates(rows: _Rows, n_items: int, nb: int) -> tuple[Any, ...]:
    """Keep the earliest row of each (user, item, behavior, split); ``(users, items, behaviors,
    splits, timestamps or None)`` of the kept rows, in file order."""
    ts = rows.ts
    order = np.argsort(ts, kind="stable") if ts is not None else np.arange(len(rows.ucodes))
    key = ((rows.ucodes[order].astype(np.int64) * n_items + rows.icodes[order]) * nb + rows.bcodes[order]) * 3
    key += rows.scodes[order]
    _, first = np.unique(key, return_index=True)
    kept = order[np.sort(first)]
    return (rows.ucodes[kept].astype(np.int64), rows.icodes[kept].astype(np.int64),
            rows.bcodes[kept].astype(np.int64), rows.scodes[kept].astype(np.int64).copy(),
            None if ts is None else ts[kept])


def _leave_one_out(fu: np.ndarray, fb: np.ndarray, fs: np.ndarray, ts: np.ndarray | None, tcode: int,
                   target: str, seed: int) -> str:
    """No split column: hold out the target per user (``fs`` is updated in place); returns the note."""
    tsel = np.flatnonzero(fb == tcode)
    rng = np.random.default_rng(seed)
    is_valid, is_test = leave_one_out(fu[tsel], rng, None if ts is None else ts[tsel])
    fs[tsel[is_valid]] = 1
    fs[tsel[is_test]] = 2
    how = "latest by timestamp" if ts is not None else f"random (seed {seed})"
    return (f"No split column: leave-one-out split of {target!r}, {how}: test for users with "
            f">= 2 {target} items ({int(is_test.sum()):,}), valid for users with >= 3 "
            f"({int(is_valid.sum()):,}).")


def _matrices(fu: np.ndarray, fi: np.ndarray, fb: np.ndarray, fs: np.ndarray, behaviors: list[str],
              n_users: int, n_items: int) -> dict[str, dict[str, Any]]:
    """``{split: {behavior: CSR}}``."""
    mats: dict[str, dict[str, Any]] = {s: {} for s in SPLITS}
    for k, b in enumerate(behaviors):
        for j, s in enumerate(SPLITS):
            sel = (fb == k) & (fs == j)
            mats[s][b] = pairs_to_csr(fu[sel], fi[sel], n_users, n_items)
    return mats


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
