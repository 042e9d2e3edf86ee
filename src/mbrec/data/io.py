"""Small shared helpers of the loaders: fast pair parsing, precise error locations, option checks.

Parsing is vectorized (pandas' C reader); only when a file fails to parse, or a value is out of
range, is it scanned line by line to report the exact line and value in a :class:`DataError`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from mbrec.errors import DataError


def suggest(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` when a close match exists, else ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_options(options: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse option names a loader does not know, suggesting the closest known one."""
    allowed = sorted(set(allowed))
    for key in options:
        if key not in allowed:
            raise DataError(
                f"unknown option {key!r} for {where}{suggest(key, allowed)}; "
                f"known options: {allowed or 'none'}"
            )


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise DataError(f"option {name!r} must be true or false", value=value)


def _scan_pairs(path: Path, ncols: int) -> None:
    """Line-by-line scan used only after the fast reader failed: raise at the first bad line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            parts = raw.split()
            if not parts:
                continue
            if len(parts) < ncols:
                raise DataError(
                    f"expected {ncols} whitespace-separated integer ids, found {len(parts)} field(s)",
                    path=path, line=lineno, value=raw.decode("utf-8", "replace").strip(),
                )
            for p in parts[:ncols]:
                try:
                    int(p)
                except ValueError:
                    raise DataError(
                        "non-numeric id in a numeric layout", path=path, line=lineno,
                        value=p.decode("utf-8", "replace"),
                    ) from None
    raise DataError("could not parse the file as whitespace-separated integer pairs", path=path)


def read_int_pairs(path: str | Path) -> np.ndarray:
    """``[n, 2]`` int64 array of the ``user item`` pairs in a whitespace-separated text file.

    Blank lines, CRLF endings and extra columns after the second are tolerated; an empty file
    gives an empty array. Non-numeric ids raise a :class:`DataError` naming the line and value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    if path.stat().st_size == 0:
        return np.empty((0, 2), dtype=np.int64)
    try:
        df = pd.read_csv(
            path, sep=r"\s+", header=None, engine="c", usecols=[0, 1], dtype=np.int64,
            comment=None,
        )
    except pd.errors.EmptyDataError:
        return np.empty((0, 2), dtype=np.int64)
    except (ValueError, pd.errors.ParserError, TypeError, OverflowError):
        _scan_pairs(path, 2)
        raise  # unreachable: _scan_pairs always raises
    return df.to_numpy(dtype=np.int64, copy=False).reshape(-1, 2)


def nth_data_line(path: Path, row: int) -> int:
    """1-based line number of the ``row``-th (0-based) non-blank line of ``path``."""
    seen = -1
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return lineno
    return seen + 1


def check_id_range(
    pairs: np.ndarray, path: Path, n_users: int, n_items: int, base: int,
    line_of: Callable[[int], int] | None = None,
) -> None:
    """Raise a :class:`DataError` at the first pair whose ids fall outside ``base..base+n-1``."""
    if len(pairs) == 0:
        return
    for col, n, what in ((0, n_users, "user"), (1, n_items, "item")):
        bad = (pairs[:, col] < base) | (pairs[:, col] >= base + n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            line = line_of(k) if line_of else nth_data_line(path, k)
            raise DataError(
                f"{what} id outside the declared range {base}..{base + n - 1}",
                path=path, line=line, value=int(pairs[k, col]),
            )
