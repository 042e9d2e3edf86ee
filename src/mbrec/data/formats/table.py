"""Reading an interaction table (CSV, TSV or Parquet) in bounded memory.

The table is streamed in batches (pyarrow's streaming CSV reader / Parquet batches, else
pandas' chunked C reader). Each batch's columns become integer codes right away: a column's
rows are dictionary-encoded per batch and the per-batch dictionaries are merged once at the
end, so memory holds a few integers per row and one Python string per *distinct* value, never
a Python object per row. Timestamps become float64 per batch.

Every failure is a :class:`~mbrec.errors.DataError` naming the file, the line (CSV) or row
(Parquet) and the value: bytes that are not UTF-8, rows with the wrong number of fields, nulls in
a Parquet column, column types that cannot hold ids (lists, structs), missing timestamps. The
file is scanned line by line only after the fast reader failed, to find the exact line.
"""

from __future__ import annotations

import codecs
import csv
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mbrec.data.io import nth_data_line
from mbrec.errors import DataError

#: rows per Parquet / pandas batch
BATCH_ROWS = 1 << 20
#: bytes per pyarrow CSV block
CSV_BLOCK = 16 << 20
#: show a progress bar (on a terminal) for files at least this large
PROGRESS_BYTES = 32 << 20


def _pyarrow() -> Any:
    """The pyarrow module, or None when it is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401
        import pyarrow.csv  # noqa: F401
    except ImportError:
        return None
    return pa


@dataclass
class Encoded:
    """One column as codes: ``values[codes[r]]`` is row ``r``'s value (blanks stripped)."""

    codes: np.ndarray
    values: np.ndarray


@dataclass
class EncodedTable:
    """The rows of a table as integer codes per column, plus timestamps (float64) if any."""

    n_rows: int
    columns: dict[str, Encoded]
    ts: np.ndarray | None


# ----------------------------------------------------------------------------- the reader
class TableReader:
    """The header (or Parquet schema) of an interaction table, and a streaming ``read``.

    ``columns`` lists the header's names (stripped of blanks); ``line(row)`` is the 1-based line
    of a 0-based data row (CSV) or its 1-based row number (Parquet).
    """

    def __init__(self, path: Path, *, use_pyarrow_csv: bool = True) -> None:
        self.path = path
        self.parquet = path.suffix == ".parquet"
        self.sep = "\t" if path.suffix == ".tsv" else ","
        self.pa = _pyarrow()
        if self.parquet and self.pa is None:
            raise DataError("reading .parquet needs pyarrow: pip install 'mbrec[parquet]'", path=path)
        self.arrow_csv = self.pa is not None and use_pyarrow_csv
        self.size = _file_size(path)
        self.n_rows_hint: int | None = None
        self.columns = self._parquet_schema() if self.parquet else self._csv_header()

    # -- header ---------------------------------------------------------------------------
    def _csv_header(self) -> list[str]:
        if self.size == 0:
            raise DataError("empty file (expected a header line user,item,behavior,...)", path=self.path)
        with _open_binary(self.path) as fh:
            raw = fh.readline()
        self._header_bytes = len(raw)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise _not_utf8(self.path, 1, raw, e) from None
        text = text.rstrip("\r\n")
        if not text.strip():
            raise DataError("the first line is blank; it must be the header user,item,behavior,...",
                            path=self.path, line=1)
        names = [c.strip() for c in next(csv.reader([text], delimiter=self.sep))]
        return names

    def _parquet_schema(self) -> list[str]:
        import pyarrow.parquet as pq

        try:
            self._pf = pq.ParquetFile(str(self.path))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"unreadable parquet file ({_first_line(e)})", path=self.path) from None
        self.n_rows_hint = int(self._pf.metadata.num_rows)
        names = self._pf.schema_arrow.names
        self._actual = {str(n).strip(): n for n in names}  # stripped name -> the file's name
        return [str(n).strip() for n in names]

    def line(self, row: int) -> int:
        """1-based line (CSV) or row number (Parquet) of the 0-based data row ``row``."""
        return row + 1 if self.parquet else nth_data_line(self.path, row + 1)

    def check_types(self, cols: list[str], id_cols: tuple[str, ...]) -> None:
        """Parquet: refuse column types that cannot hold ids or timestamps (lists, structs...)."""
        if not self.parquet:
            return
        schema = self._pf.schema_arrow
        for c in cols:
            t = schema.field(schema.names.index(self._actual[c])).type
            ok = _text_like(self.pa, t) if c in id_cols else (_text_like(self.pa, t) or _time_like(self.pa, t))
            if not ok:
                want = "text or integer ids" if c in id_cols else "numbers, dates or text"
                raise DataError(f"column {c!r} has Parquet type {t}; expected {want}", path=self.path,
                                value=str(t))

    # -- streaming ------------------------------------------------------------------------
    def read(self, id_cols: tuple[str, ...], ts_col: str | None) -> EncodedTable:
        """Stream the table; ``id_cols`` become :class:`Encoded` columns, ``ts_col`` float64."""
        want = list(id_cols) + ([ts_col] if ts_col else [])
        self.check_types(want, id_cols)
        encoders = {c: _Codes(c, self) for c in id_cols}
        times = _Times(ts_col, self) if ts_col else None
        n = 0
        with _progress(self) as bar:
            for batch, done in self._batches(want):
                for c in id_cols:
                    encoders[c].add(batch[c], n)
                if times is not None:
                    times.add(batch[ts_col], n)
                n += _batch_len(batch)
                bar(done)
        return EncodedTable(n, {c: e.finish(n) for c, e in encoders.items()},
                            None if times is None else times.finish())

    def _batches(self, cols: list[str]) -> Iterator[tuple[dict[str, Any], int]]:
        if self.parquet:
            return self._parquet_batches(cols)
        if self.size <= self._header_bytes or not _has_data(self.path, self._header_bytes):
            return iter(())
        return self._arrow_csv_batches(cols) if self.arrow_csv else self._pandas_csv_batches(cols)

    def _parquet_batches(self, cols: list[str]) -> Iterator[tuple[dict[str, Any], int]]:
        pa = self.pa
        actual = self._actual
        done = 0
        it = self._pf.iter_batches(batch_size=BATCH_ROWS, columns=[actual[c] for c in cols])
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"unreadable parquet file ({_first_line(e)})", path=self.path) from None
            done += batch.num_rows
            yield {c: batch.column(batch.schema.names.index(actual[c])) for c in cols}, done

    def _arrow_csv_batches(self, cols: list[str]) -> Iterator[tuple[dict[str, Any], int]]:
        pa = self.pa
        pacsv = pa.csv
        try:
            source = pa.OSFile(str(self.path))
        except OSError as e:
            raise DataError(f"cannot read the file ({_first_line(e)})", path=self.path) from None
        try:
            reader = pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(column_names=self._unique_names(), skip_rows=1,
                                               block_size=CSV_BLOCK),
                parse_options=pacsv.ParseOptions(delimiter=self.sep),
                convert_options=pacsv.ConvertOptions(
                    include_columns=cols, column_types={c: pa.string() for c in cols},
                    strings_can_be_null=False, quoted_strings_can_be_null=False,
                ),
            )
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                yield {c: batch.column(c) for c in cols}, source.tell()
        except pa.ArrowInvalid as e:
            raise self._csv_failure(str(e)) from None
        except OSError as e:
            raise DataError(f"cannot read the file ({_first_line(e)})", path=self.path) from None
        finally:
            source.close()

    def _pandas_csv_batches(self, cols: list[str]) -> Iterator[tuple[dict[str, Any], int]]:
        with _open_binary(self.path) as fh:
            try:
                # every column is read (no usecols) so that a row with extra fields is an error
                chunks = pd.read_csv(
                    fh, sep=self.sep, header=None, names=self._unique_names(), skiprows=1,
                    dtype=str, keep_default_na=False, na_filter=False,
                    chunksize=BATCH_ROWS, encoding="utf-8", engine="c",
                )
                for df in chunks:
                    yield {c: df[c].to_numpy(dtype=object) for c in cols}, fh.tell()
            except UnicodeDecodeError as e:
                raise self._csv_failure(f"invalid UTF8 ({e})") from None
            except (pd.errors.ParserError, ValueError) as e:
                raise self._csv_failure(str(e)) from None

    def _unique_names(self) -> list[str]:
        """Header names with duplicates of unused columns renamed (readers need unique names)."""
        seen: dict[str, int] = {}
        out = []
        for c in self.columns:
            k = seen.get(c, 0)
            seen[c] = k + 1
            out.append(c if k == 0 else f"{c}.{k}")
        return out

    def _csv_failure(self, message: str) -> DataError:
        """The exact line of a parse failure (found by a line-by-line scan), as a DataError."""
        bad = _first_non_utf8(self.path)
        if bad is not None:
            return bad
        found = _first_bad_field_count(self.path, self.sep, len(self.columns))
        if found is not None:
            line, n, text = found
            if "\n" in text:
                return DataError("a quoted field opens here and is not closed on this line (an unmatched "
                                 '\'"\'?)', path=self.path, line=line, value=_raw_line(self.path, line))
            return DataError(f"this row has {n} field(s) but the header has {len(self.columns)} "
                             f"({', '.join(self.columns)})", path=self.path, line=line, value=text)
        return DataError(f"malformed table ({message.splitlines()[0] if message else 'unknown error'})",
                         path=self.path)


# ----------------------------------------------------------------------------- columns
class _Codes:
    """One column's codes, batch by batch; per-batch distinct values are merged in ``finish``."""

    def __init__(self, name: str, reader: TableReader) -> None:
        self.name, self.reader = name, reader
        self.parts: list[tuple[int, np.ndarray]] = []  # (first row, codes into this batch's dict)
        self.dicts: list[Any] = []

    def add(self, col: Any, row0: int) -> None:
        pa = self.reader.pa
        if isinstance(col, np.ndarray):  # pandas fallback: object array of str
            codes, uniq = pd.factorize(col)
            self.parts.append((row0, codes.astype(np.int32)))
            self.dicts.append(np.asarray(uniq, dtype=object))
            return
        arr = _as_text(pa, col, self.name, self.reader, row0)
        enc = arr.dictionary_encode()
        self.parts.append((row0, enc.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)))
        self.dicts.append(enc.dictionary)

    def finish(self, n_rows: int) -> Encoded:
        """All rows' codes into the column's distinct values (blanks stripped)."""
        glob, values = self._merge()
        out = np.empty(n_rows, dtype=np.int32)
        off = 0
        for (row0, idx), d in zip(self.parts, self.dicts):
            out[row0:row0 + len(idx)] = glob[off + idx]
            off += len(d)
        return Encoded(out, values)

    def _merge(self) -> tuple[np.ndarray, np.ndarray]:
        """(global code of each per-batch distinct value, the global distinct values as str)."""
        pa = self.reader.pa
        if not self.dicts:
            return np.empty(0, dtype=np.int32), np.empty(0, dtype=str)
        if isinstance(self.dicts[0], np.ndarray):
            allv = pd.Series(np.concatenate(self.dicts), dtype=object).str.strip()
            codes, uniq = pd.factorize(allv)
            return codes.astype(np.int32), np.asarray(uniq, dtype=object).astype(str)
        allv = pa.concat_arrays(self.dicts) if len(self.dicts) > 1 else self.dicts[0]
        enc = pa.compute.utf8_trim_whitespace(allv).dictionary_encode()
        values = enc.dictionary.to_numpy(zero_copy_only=False)
        return enc.indices.to_numpy(zero_copy_only=False).astype(np.int32), np.asarray(values, dtype=object).astype(str)


class _Times:
    """A timestamp column as float64 per batch: numbers as they are, dates as UTC nanoseconds."""

    def __init__(self, name: str, reader: TableReader) -> None:
        self.name, self.reader = name, reader
        self.parts: list[np.ndarray] = []
        self.kinds: set[str] = set()
        self.first_kind_row: dict[str, int] = {}

    def add(self, col: Any, row0: int) -> None:
        if isinstance(col, np.ndarray):
            values, kind = _times_pandas(pd.Series(col, dtype=object), self, row0)
        else:
            values, kind = _times_arrow(self.reader.pa, col, self, row0)
        self.first_kind_row.setdefault(kind, row0)
        self.kinds.add(kind)
        if len(self.kinds) > 1:
            k = max(self.first_kind_row.values())
            raise DataError("timestamps mix plain numbers and dates; use one kind for the whole column",
                            path=self.reader.path, line=self.reader.line(k))
        self.parts.append(values)

    def finish(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0, dtype=np.float64)

    def fail(self, message: str, row: int, value: object) -> DataError:
        return DataError(message, path=self.reader.path, line=self.reader.line(row), value=value)


def _times_arrow(pa: Any, col: Any, t: _Times, row0: int) -> tuple[np.ndarray, str]:
    pc = pa.compute
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    _check_nulls(arr, t.reader, row0, "missing timestamp (null)")
    typ = arr.type
    if pa.types.is_timestamp(typ) or pa.types.is_date(typ) or pa.types.is_time(typ) or pa.types.is_duration(typ):
        storage = pa.int32() if typ.bit_width == 32 else pa.int64()  # days, ms, ns...: order only
        return pc.cast(arr, storage).to_numpy(zero_copy_only=False).astype(np.float64), "date"
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        out = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        _check_nan(out, t, row0, arr)
        return out, "number"
    if pa.types.is_boolean(typ):
        raise t.fail("timestamp column holds true/false values", row0, None)
    text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    empty = pc.equal(text, "").to_numpy(zero_copy_only=False)
    if empty.any():
        raise t.fail("missing timestamp (empty)", row0 + int(np.flatnonzero(empty)[0]), "")
    try:
        out = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        _check_nan(out, t, row0, text)
        return out, "number"
    except pa.ArrowInvalid:
        pass
    for typ in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):
        try:
            return pc.cast(pc.cast(text, typ), pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64), "date"
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return _dates_pandas(pd.Series(text.to_numpy(zero_copy_only=False), dtype=object), t, row0), "date"


def _times_pandas(raw: pd.Series, t: _Times, row0: int) -> tuple[np.ndarray, str]:
    text = raw.str.strip()
    empty = (text == "").to_numpy()
    if empty.any():
        raise t.fail("missing timestamp (empty)", row0 + int(np.flatnonzero(empty)[0]), "")
    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    nan_text = text.str.lower().isin(["nan", "-nan", "inf", "-inf", "infinity", "-infinity"]).to_numpy()
    bad = nan_text | np.isinf(num)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise t.fail("timestamp is NaN or infinite", row0 + k, str(text.iloc[k]))
    if not np.isnan(num).any():
        return num, "number"
    return _dates_pandas(text, t, row0), "date"


def _dates_pandas(text: pd.Series, t: _Times, row0: int) -> np.ndarray:
    """Dates in any format pandas understands (this batch only), as UTC nanoseconds."""
    try:
        dt = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
    except (TypeError, ValueError):  # pandas < 2 has no format="mixed" (it parses each value anyway)
        dt = pd.to_datetime(text, errors="coerce", utc=True)
    if dt.isna().any():
        k = int(np.flatnonzero(dt.isna().to_numpy())[0])
        v = str(text.iloc[k])
        if not np.isnan(pd.to_numeric(pd.Series([v]), errors="coerce").iloc[0]):
            raise t.fail("timestamps mix plain numbers and dates; use one kind for the whole column",
                         row0 + k, v)
        raise t.fail("timestamp is neither a number nor a date", row0 + k, v)
    return dt.astype("int64").to_numpy(dtype=np.float64)


def _check_nan(out: np.ndarray, t: _Times, row0: int, arr: Any) -> None:
    bad = ~np.isfinite(out)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise t.fail("timestamp is NaN or infinite", row0 + k, str(arr[k].as_py()))


def _text_like(pa: Any, t: Any) -> bool:
    """Types whose values can be read as id strings."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_boolean(t) or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _time_like(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_decimal(t)
                or pa.types.is_time(t) or pa.types.is_duration(t))


def _as_text(pa: Any, col: Any, name: str, reader: TableReader, row0: int) -> Any:
    """A batch's column as a pyarrow string array (nulls and NaNs refused)."""
    pc = pa.compute
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not _text_like(pa, arr.type):
        raise DataError(f"column {name!r} holds {arr.type} values; expected text or integer ids",
                        path=reader.path, value=str(arr.type))
    _check_nulls(arr, reader, row0, f"missing {name} (null)")
    if pa.types.is_floating(arr.type):
        nan = pc.is_nan(arr).to_numpy(zero_copy_only=False)
        if nan.any():
            k = int(np.flatnonzero(nan)[0])
            raise DataError(f"missing {name} (NaN)", path=reader.path, line=reader.line(row0 + k),
                            value="NaN")
        if pc.all(pc.equal(arr, pc.floor(arr))).as_py() in (True, None):
            arr = pc.cast(arr, pa.int64())
    if pa.types.is_string(arr.type):
        return arr
    try:
        return pc.cast(arr, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
            raise DataError(f"column {name!r} holds bytes that are not UTF-8 text", path=reader.path) from None
        raise DataError(f"column {name!r}: cannot read {arr.type} values as text ({_first_line(e)})",
                        path=reader.path) from None


def _check_nulls(arr: Any, reader: TableReader, row0: int, message: str) -> None:
    """A DataError at the first null of a batch's column (row numbers counted from ``row0``)."""
    if arr.null_count:
        k = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(message, path=reader.path, line=reader.line(row0 + k), value=None)


def _batch_len(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


# ----------------------------------------------------------------------------- files
def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror or e})", path=path) from None


def _open_binary(path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise DataError("is a folder, not a file", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror or e})", path=path) from None


def _has_data(path: Path, header_bytes: int) -> bool:
    """Whether anything but blank lines follows the header."""
    with _open_binary(path) as fh:
        fh.seek(header_bytes)
        while True:
            chunk = fh.read(1 << 16)
            if not chunk:
                return False
            if chunk.strip():
                return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _not_utf8(path: Path, line: int, raw: bytes, e: UnicodeDecodeError) -> DataError:
    byte = raw[e.start:e.start + 1].hex()
    return DataError(f"not UTF-8 text: byte 0x{byte} at column {e.start + 1}; save the file as UTF-8",
                     path=path, line=line, value=raw.decode("utf-8", "replace").rstrip("\r\n"))


def _first_non_utf8(path: Path) -> DataError | None:
    """The first line that is not valid UTF-8, as a DataError (None when the file is UTF-8)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                dec.decode(raw)
            except UnicodeDecodeError as e:
                return _not_utf8(path, lineno, raw, e)
    return None


def _raw_line(path: Path, line: int) -> str:
    """Line ``line`` (1-based) of a file as text, without its line break."""
    with _open_binary(path) as fh:
        for k, raw in enumerate(fh, start=1):
            if k == line:
                return raw.decode("utf-8", "replace").rstrip("\r\n")
    return ""


def _first_bad_field_count(path: Path, sep: str, n: int) -> tuple[int, int, str] | None:
    """(line, number of fields, text) of the first non-blank row whose field count is not ``n``."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=sep)
        start = 1
        for k, rec in enumerate(reader):
            if k > 0 and rec and any(f.strip() for f in rec) and len(rec) != n:
                return start, len(rec), sep.join(rec)
            start = reader.line_num + 1
    return None


class _progress:
    """A tqdm bar over the file's bytes (CSV) or rows (Parquet), shown on a terminal only."""

    def __init__(self, reader: TableReader) -> None:
        self.reader = reader
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        r = self.reader
        isatty = getattr(sys.stderr, "isatty", None)
        if isatty is not None and isatty() and r.size >= PROGRESS_BYTES:
            from tqdm import tqdm

            total = r.n_rows_hint if r.parquet else r.size
            self.bar = tqdm(total=total, unit="rows" if r.parquet else "B", unit_scale=True,
                            desc=f"reading {r.path.name}", leave=False)
        return self._update

    def _update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, done - self.bar.n))

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
