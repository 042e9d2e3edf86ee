"""Bad inputs to the generic format, one case per row of the table in docs/data.md ("Bad inputs").

Each case writes a tiny dataset folder and either expects a :class:`~mbrec.errors.DataError`
whose message contains a given text (and names the line and value where meaningful), or is valid
input that must load correctly ("accepted"). CSV cases run with both readers (pyarrow's and the
pandas fallback). No case may end in any other exception: that would be a traceback for the user.

``python tests/test_data_bad_inputs.py`` prints the Markdown table of docs/data.md from these
cases (the messages as they are, with the folder shown as ``ds/``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mbrec.data.container import MultiBehaviorData
from mbrec.data.formats import generic, table
from mbrec.data.registry import load_dataset
from mbrec.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "data.md"
YAML = b"behaviors: [view, buy]\n"
H = b"user,item,behavior\n"
OK_ROWS = b"u1,a,buy\nu1,b,view\nu2,a,buy\n"


def parquet(**cols: Any) -> Callable[[], bytes]:
    """Parquet bytes of the given columns (pyarrow arrays or lists), built when the case runs."""

    def build() -> bytes:
        pa = pytest.importorskip("pyarrow")
        import io

        import pyarrow.parquet as pq

        base = {"user": ["u1", "u1", "u2"], "item": ["a", "b", "a"], "behavior": ["buy", "view", "buy"]}
        base.update({k: (v() if callable(v) else v) for k, v in cols.items()})
        buf = io.BytesIO()
        pq.write_table(pa.table({k: v for k, v in base.items() if v is not None}), buf)
        return buf.getvalue()

    return build


def pa_array(values: list[Any], typ: str | None = None) -> Callable[[], Any]:
    return lambda: _pa_array(values, typ)


def _pa_array(values: list[Any], typ: str | None) -> Any:
    pa = pytest.importorskip("pyarrow")
    types = {"int32": pa.int32(), "binary": pa.binary(), "ts": pa.timestamp("s"), "date": pa.date32()}
    if typ == "dict":
        return pa.array(values).dictionary_encode()
    if typ == "date":
        return pa.array(values, pa.int32()).cast(pa.date32())
    return pa.array(values, types[typ]) if typ else pa.array(values)


DIR = object()  # a folder in place of a file


@dataclass
class Case:
    """One bad (or tricky but valid) input."""

    id: str
    what: str
    files: dict[str, Any]
    error: str | None = None  # expected message text; None = accepted
    line: int | None = None
    value: Any = "unchecked"
    check: Callable[[MultiBehaviorData], bool] | None = None
    accepted: str = ""  # what "accepted" means, for the docs table
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def csv(self) -> bool:
        return "interactions.csv" in self.files or "interactions.tsv" in self.files


def ids(d: MultiBehaviorData, axis: str) -> list[str]:
    return [str(x) for x in (d.user_ids if axis == "user" else d.item_ids)]


CASES = [
    # ------------------------------------------------------------------ files and folders
    Case("no-table", "dataset.yaml without an interaction table", {"dataset.yaml": YAML},
         "dataset.yaml is here but no interaction table"),
    Case("no-yaml", "interactions.csv without dataset.yaml", {"interactions.csv": H + OK_ROWS},
         "dataset.yaml (it must list the behaviors, upstream first) is missing"),
    Case("table-is-folder", "interactions.csv is a folder", {"interactions.csv": DIR, "dataset.yaml": YAML},
         "is a folder, not a file"),
    Case("yaml-is-folder", "dataset.yaml is a folder", {"interactions.csv": H + OK_ROWS, "dataset.yaml": DIR},
         "is a folder, not a file"),
    Case("unreadable", "interactions.csv without read permission",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": YAML}, "cannot read the file (Permission denied)"),
    Case("two-tables", "both interactions.csv and interactions.parquet",
         {"interactions.csv": H + OK_ROWS, "interactions.parquet": parquet(), "dataset.yaml": YAML},
         "several interaction tables"),
    Case("empty-file", "interactions.csv of 0 bytes", {"interactions.csv": b"", "dataset.yaml": YAML},
         "empty file (expected a header line"),
    Case("blank-first-line", "a blank line before the header", {"interactions.csv": b"\n" + H + OK_ROWS,
                                                                 "dataset.yaml": YAML},
         "the first line is blank", line=1),
    Case("header-only", "a header and no rows", {"interactions.csv": H, "dataset.yaml": YAML},
         "no interaction rows (the file has only a header)"),
    # ------------------------------------------------------------------ dataset.yaml
    Case("yaml-empty", "an empty dataset.yaml", {"interactions.csv": H + OK_ROWS, "dataset.yaml": b""},
         "dataset.yaml must be a mapping with a 'behaviors' list"),
    Case("yaml-invalid", "dataset.yaml that is not YAML", {"interactions.csv": H + OK_ROWS,
                                                          "dataset.yaml": b"behaviors: [view, buy\n"},
         "invalid YAML"),
    Case("yaml-dup-behavior", "a behavior listed twice in dataset.yaml",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": b"behaviors: [view, view, buy]\n"},
         "'behaviors' lists 'view' twice"),
    Case("yaml-unknown-key", "a misspelt key in dataset.yaml",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": YAML + b"taget: buy\n"},
         "unknown key 'taget' (did you mean 'target'?)"),
    Case("yaml-target-unknown", "a target that is not in behaviors",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": YAML + b"target: cart\n"},
         "target 'cart' is not in behaviors", value="cart"),
    Case("yaml-n-users", "n_users that disagrees with the file",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": YAML + b"n_users: 5\n"},
         "dataset.yaml declares n_users: 5 but the file has 2"),
    Case("yaml-not-utf8", "dataset.yaml in Latin-1", {"interactions.csv": H + OK_ROWS,
                                                      "dataset.yaml": YAML + b"name: caf\xe9\n"},
         "not UTF-8 text (byte 0xe9)", line=2),
    Case("yaml-bad-policy", "an unknown heldout_unseen value",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": YAML + b"heldout_unseen: skip\n"},
         "'heldout_unseen' must be one of ['keep', 'drop', 'error']"),
    Case("users-file-missing", "a users file named in dataset.yaml that does not exist",
         {"interactions.csv": H + OK_ROWS, "dataset.yaml": YAML + b"users: users.txt\n"},
         "id file 'users.txt' named in dataset.yaml not found"),
    Case("user-not-in-users-file", "a user missing from the users file",
         {"interactions.csv": H + OK_ROWS, "users.txt": b"u1\n", "dataset.yaml": YAML + b"users: users.txt\n"},
         "user id not in the users file named in dataset.yaml", line=4, value="u2"),
    Case("users-file-duplicate", "an id twice in the users file",
         {"interactions.csv": H + OK_ROWS, "users.txt": b"u1\nu2\nu1\n", "dataset.yaml": YAML + b"users: users.txt\n"},
         "duplicate id", value="u1"),
    # ------------------------------------------------------------------ header and columns
    Case("missing-column", "no user column (misspelt)", {"interactions.csv": b"usr,item,behavior\n" + OK_ROWS,
                                                        "dataset.yaml": YAML},
         "missing column 'user' (did you mean 'usr'?)", line=1),
    Case("misspelt-optional", "a misspelt optional column",
         {"interactions.csv": b"user,item,behavior,splt\nu1,a,buy,train\n", "dataset.yaml": YAML},
         "unknown column 'splt' (did you mean 'split'?)", line=1, value="splt"),
    Case("duplicate-column", "a column twice in the header",
         {"interactions.csv": b"user,item,behavior,user\nu1,a,buy,u1\n", "dataset.yaml": YAML},
         "column 'user' appears 2 times in the header", line=1),
    Case("extra-columns", "extra columns (price, session)",
         {"interactions.csv": b"user,price,item,behavior,session\nu1,3.5,a,buy,s\nu1,1,b,view,s\nu2,2,a,buy,t\n",
          "dataset.yaml": YAML},
         check=lambda d: d.counts()["train"] == {"view": 1, "buy": 2}, accepted="ignored"),
    Case("wrong-separator", "semicolons in a .csv", {"interactions.csv": b"user;item;behavior\nu1;a;buy\n",
                                                     "dataset.yaml": YAML},
         "this file is separated by ';'", line=1),
    Case("tsv-with-commas", "commas in a .tsv", {"interactions.tsv": H + OK_ROWS, "dataset.yaml": YAML},
         "rename it to interactions.csv", line=1),
    Case("row-extra-field", "a row with one field too many",
         {"interactions.csv": H + b"u1,a,buy\nu1,b,view,x\n", "dataset.yaml": YAML},
         "this row has 4 field(s) but the header has 3", line=3, value="u1,b,view,x"),
    Case("row-missing-field", "a row with one field too few",
         {"interactions.csv": H + b"u1,a,buy\nu1,b\n", "dataset.yaml": YAML},
         "", line=3),  # pyarrow: "this row has 2 field(s)"; pandas: "behavior(s) [''] not declared"
    Case("unclosed-quote", "an opening quote that is never closed",
         {"interactions.csv": H + b'u1,"a,buy\nu1,b,view\nu2,a,buy\n', "dataset.yaml": YAML},
         "a quoted field opens here and is not closed", line=2, value='u1,"a,buy'),
    # ------------------------------------------------------------------ encodings and line ends
    Case("bom", "a UTF-8 byte-order mark", {"interactions.csv": b"\xef\xbb\xbf" + H + OK_ROWS, "dataset.yaml": YAML},
         check=lambda d: ids(d, "user") == ["u1", "u2"], accepted="the mark is skipped"),
    Case("crlf", "Windows line ends (CRLF)", {"interactions.csv": (H + OK_ROWS).replace(b"\n", b"\r\n"),
                                              "dataset.yaml": YAML},
         check=lambda d: ids(d, "item") == ["a", "b"] and d.train["buy"].nnz == 2, accepted="same as LF"),
    Case("quoted-comma", "an id with a comma, quoted", {"interactions.csv": H + b'u1,"a,1",buy\nu1,b,view\nu2,"a,1",buy\n',
                                                        "dataset.yaml": YAML},
         check=lambda d: ids(d, "item") == ["a,1", "b"], accepted="the id is `a,1`"),
    Case("blank-lines", "blank lines between rows", {"interactions.csv": H + b"\nu1,a,buy\n\nu1,b,view\nu2,a,buy\n\n",
                                                     "dataset.yaml": YAML},
         check=lambda d: d.counts()["train"] == {"view": 1, "buy": 2}, accepted="skipped"),
    Case("not-utf8", "Latin-1 bytes in a row", {"interactions.csv": H + b"u1,a,buy\nu1,caf\xe9,view\n",
                                                "dataset.yaml": YAML},
         "not UTF-8 text: byte 0xe9 at column 7; save the file as UTF-8", line=3),
    Case("unicode-ids", "ids in other scripts", {"interactions.csv": H + "ü1,日本,buy\nü1,b,view\nпольз,日本,buy\n".encode(),
                                                 "dataset.yaml": YAML},
         check=lambda d: ids(d, "user") == ["ü1", "польз"] and d.item_index("日本") >= 0, accepted="kept as written"),
    Case("blanks-around-ids", "spaces around ids and names", {"interactions.csv": b"user, item, behavior\n u1 , a ,buy\nu1,b, view\nu2,a,buy\n",
                                                              "dataset.yaml": YAML},
         check=lambda d: ids(d, "user") == ["u1", "u2"] and d.train["buy"].nnz == 2, accepted="stripped"),
    Case("long-id", "a 1,000-character id", {"interactions.csv": H + b"u1,a,buy\nu1," + b"x" * 1000 + b",view\nu2,a,buy\n",
                                             "dataset.yaml": YAML},
         check=lambda d: max(len(i) for i in ids(d, "item")) == 1000, accepted="up to 1,000 characters"),
    Case("too-long-id", "a 5,000-character id", {"interactions.csv": H + b"u1,a,buy\nu1," + b"x" * 5000 + b",view\n",
                                                 "dataset.yaml": YAML},
         "item id of 5,000 characters (at most 1,000; an unclosed quote?)", line=3),
    # ------------------------------------------------------------------ values
    Case("empty-id", "an empty user id", {"interactions.csv": H + b"u1,a,buy\n,b,view\n", "dataset.yaml": YAML},
         "empty user id", line=3, value=""),
    Case("unknown-behavior", "a behavior not in dataset.yaml", {"interactions.csv": H + b"u1,a,buy\nu1,b,veiw\n",
                                                                "dataset.yaml": YAML},
         "behavior(s) ['veiw'] not declared in dataset.yaml", line=3, value="veiw"),
    Case("behavior-without-rows", "a listed behavior with no rows",
         {"interactions.csv": H + b"u1,a,buy\nu2,b,buy\n", "dataset.yaml": b"behaviors: [view, cart, buy]\n"},
         "dataset.yaml lists behavior 'view' but the file has no rows for it", value="view"),
    Case("target-without-training", "a target with held-out rows only",
         {"interactions.csv": b"user,item,behavior,split\nu1,a,view,train\nu1,a,buy,test\n", "dataset.yaml": YAML},
         "the target behavior 'buy' has no training rows"),
    Case("unknown-split", "a split value that is not train/valid/test",
         {"interactions.csv": b"user,item,behavior,split\nu1,a,buy,train\nu1,b,buy,tset\n",
          "dataset.yaml": b"behaviors: [buy]\n"},
         "split must be one of ['train', 'valid', 'test'] (did you mean 'test'?)", line=3, value="tset"),
    Case("duplicate-rows", "the same row twice", {"interactions.csv": H + OK_ROWS + b"u1,a,buy\n", "dataset.yaml": YAML},
         check=lambda d: d.train["buy"].nnz == 2, accepted="collapsed to one"),
    Case("heldout-unseen", "a test row for a user with no training row",
         {"interactions.csv": b"user,item,behavior,split\nu1,a,buy,train\nu9,a,buy,test\n", "dataset.yaml": b"behaviors: [buy]\n"},
         check=lambda d: ids(d, "user") == ["u1", "u9"] and d.test["buy"].nnz == 1,
         accepted="kept (`heldout_unseen: keep`)"),
    Case("heldout-unseen-error", "the same with `heldout_unseen: error`",
         {"interactions.csv": b"user,item,behavior,split\nu1,a,buy,train\nu9,a,buy,test\n",
          "dataset.yaml": b"behaviors: [buy]\nheldout_unseen: error\n"},
         "test row for a user with no training row of any behavior", line=3, value="u9"),
    Case("nan-timestamp", "a NaN timestamp", {"interactions.csv": b"user,item,behavior,timestamp\nu1,a,buy,1\nu1,b,view,NaN\n",
                                              "dataset.yaml": YAML},
         "timestamp is NaN or infinite", line=3, value="NaN"),
    Case("empty-timestamp", "an empty timestamp", {"interactions.csv": b"user,item,behavior,timestamp\nu1,a,buy,1\nu1,b,view,\n",
                                                   "dataset.yaml": YAML},
         "missing timestamp (empty)", line=3, value=""),
    Case("bad-timestamp", "a timestamp that is no number or date",
         {"interactions.csv": b"user,item,behavior,timestamp\nu1,a,buy,yesterday\nu1,b,view,2\n", "dataset.yaml": YAML},
         "timestamp is neither a number nor a date", line=2, value="yesterday"),
    Case("mixed-timestamps", "numbers and dates in one timestamp column",
         {"interactions.csv": b"user,item,behavior,timestamp\nu1,a,buy,1\nu1,b,view,2024-01-01\n", "dataset.yaml": YAML},
         "timestamps mix plain numbers and dates", line=2, value="1"),
    Case("date-timestamps", "ISO dates with and without zone",
         {"interactions.csv": b"user,item,behavior,timestamp\nu1,a,buy,2024-01-02T00:00:00+02:00\nu1,b,buy,2024-01-01\n"
                              b"u1,c,buy,2024-01-03 10:00:00\nu1,c,view,2024-01-01\n", "dataset.yaml": YAML},
         check=lambda d: d.test["buy"][0, d.item_index("c")] == 1 and d.valid["buy"][0, d.item_index("a")] == 1,
         accepted="ordered in time"),
    # ------------------------------------------------------------------ Parquet
    Case("parquet-int-ids", "integer id columns", {"interactions.parquet": parquet(user=pa_array([1, 1, 2]), item=pa_array([10, 11, 10], "int32")),
                                                   "dataset.yaml": YAML},
         check=lambda d: ids(d, "user") == ["1", "2"] and ids(d, "item") == ["10", "11"], accepted="ids as text"),
    Case("parquet-float-ids", "float ids with whole values", {"interactions.parquet": parquet(user=pa_array([1.0, 1.0, 2.0])),
                                                               "dataset.yaml": YAML},
         check=lambda d: ids(d, "user") == ["1", "2"], accepted="`1.0` is id `1`"),
    Case("parquet-dictionary", "dictionary (categorical) columns", {"interactions.parquet": parquet(behavior=pa_array(["buy", "view", "buy"], "dict")),
                                                                    "dataset.yaml": YAML},
         check=lambda d: d.counts()["train"] == {"view": 1, "buy": 2}, accepted="decoded"),
    Case("parquet-timestamp-type", "a timestamp[s] column", {"interactions.parquet": parquet(timestamp=pa_array([3, 1, 2], "ts")),
                                                             "dataset.yaml": YAML},
         check=lambda d: d.train["buy"].nnz == 2, accepted="used as time"),
    Case("parquet-date-type", "a date32 column", {"interactions.parquet": parquet(timestamp=pa_array([3, 1, 2], "date")),
                                                  "dataset.yaml": YAML},
         check=lambda d: d.train["buy"].nnz == 2, accepted="used as time"),
    Case("parquet-blank-names", "column names with blanks around them",
         {"interactions.parquet": parquet(user=None, **{" user ": pa_array(["u1", "u1", "u2"])}), "dataset.yaml": YAML},
         check=lambda d: ids(d, "user") == ["u1", "u2"], accepted="names stripped"),
    Case("parquet-null-user", "a null user", {"interactions.parquet": parquet(user=pa_array(["u1", None, "u2"])), "dataset.yaml": YAML},
         "missing user (null)", line=2),
    Case("parquet-null-behavior", "a null behavior", {"interactions.parquet": parquet(behavior=pa_array(["buy", None, "buy"])),
                                                      "dataset.yaml": YAML},
         "missing behavior (null)", line=2),
    Case("parquet-null-split", "a null split", {"interactions.parquet": parquet(split=pa_array(["train", "train", None])),
                                                "dataset.yaml": YAML},
         "missing split (null)", line=3),
    Case("parquet-nan-id", "a NaN in a float id column", {"interactions.parquet": parquet(item=pa_array([1.0, float("nan"), 2.0])),
                                                          "dataset.yaml": YAML},
         "missing item (NaN)", line=2),
    Case("parquet-list-column", "a list-typed item column", {"interactions.parquet": parquet(item=pa_array([["a"], ["b"], ["a"]])),
                                                             "dataset.yaml": YAML},
         "column 'item' has Parquet type list<element: string>; expected text or integer ids"),
    Case("parquet-struct-timestamp", "a struct-typed timestamp", {"interactions.parquet": parquet(timestamp=pa_array([{"s": 1}, {"s": 2}, {"s": 3}])),
                                                                  "dataset.yaml": YAML},
         "column 'timestamp' has Parquet type struct<s: int64>; expected numbers, dates or text"),
    Case("parquet-nan-timestamp", "a NaN timestamp", {"interactions.parquet": parquet(timestamp=pa_array([1.0, float("nan"), 3.0])),
                                                      "dataset.yaml": YAML},
         "timestamp is NaN or infinite", line=2),
    Case("parquet-bool-split", "a boolean split column", {"interactions.parquet": parquet(split=pa_array([True, False, True])),
                                                          "dataset.yaml": YAML},
         "split must be one of ['train', 'valid', 'test']", line=1, value="true"),
    Case("parquet-binary-not-utf8", "binary ids that are not UTF-8",
         {"interactions.parquet": parquet(item=pa_array([b"a", b"\xe9", b"a"], "binary")), "dataset.yaml": YAML},
         "column 'item' holds bytes that are not UTF-8 text"),
    Case("parquet-no-rows", "a Parquet file with no rows", {"interactions.parquet": parquet(user=pa_array([], "int32"), item=pa_array([], "int32"),
                                                                                            behavior=pa_array([], "int32")),
                                                            "dataset.yaml": YAML},
         "no interaction rows"),
    Case("parquet-garbage", "a .parquet file that is not Parquet", {"interactions.parquet": b"user,item,behavior\n", "dataset.yaml": YAML},
         "unreadable parquet file (Parquet magic bytes not found"),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"


def build(root: Path, case: Case) -> Path:
    d = root / "ds"
    d.mkdir(parents=True)
    for name, content in case.files.items():
        p = d / name
        if content is DIR:
            p.mkdir()
            continue
        if callable(content):
            content = content()
        p.write_bytes(content)
    return d


def make_unreadable(d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; as root (who reads anyway) the reader's ``open`` raises the same error."""
    (d / "interactions.csv").chmod(0)
    if os.geteuid() == 0:
        def deny(path: Any, *a: Any, **k: Any) -> Any:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(table, "open", deny, raising=False)


def outcome(case: Case, root: Path, monkeypatch: pytest.MonkeyPatch) -> MultiBehaviorData | DataError:
    """Load the case: the data, or the DataError (any other exception propagates)."""
    d = build(root, case)
    if case.id == "unreadable":
        make_unreadable(d, monkeypatch)
    try:
        return load_dataset(d, **case.options)
    except DataError as e:
        return e
    finally:
        if case.id == "unreadable":
            (d / "interactions.csv").chmod(0o644)


def params() -> list[Any]:
    out = []
    for c in CASES:
        readers = ("pyarrow", "pandas") if c.csv else ("pyarrow",)
        out += [pytest.param(c, r, id=f"{c.id}-{r}") for r in readers]
    return out


@pytest.mark.parametrize("case, reader", params())
def test_bad_input(case: Case, reader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if reader == "pandas":
        monkeypatch.setattr(generic, "USE_PYARROW_CSV", False)
    got = outcome(case, tmp_path, monkeypatch)
    if case.error is None:
        assert isinstance(got, MultiBehaviorData), f"expected to load, got {got}"
        assert case.check is not None and case.check(got)
        return
    assert isinstance(got, DataError), f"expected a DataError, loaded {got}"
    assert case.error in str(got)
    assert got.path is not None and "\n" not in str(got)
    if case.line is not None:
        assert got.line == case.line
    if case.value != "unchecked":
        assert got.value == case.value


def test_the_docs_table_lists_every_case() -> None:
    section = DOC.read_text(encoding="utf-8").split("### Bad inputs", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE)
    assert sorted(documented) == sorted(BY_ID) and len(documented) >= 25


def markdown_table(root: Path) -> str:
    """The docs table, from the cases as they load now (pyarrow reader)."""
    lines = ["| case | input | result |", "|---|---|---|"]
    for k, c in enumerate(CASES):
        with pytest.MonkeyPatch.context() as mp:
            got = outcome(c, root / str(k), mp)
        if isinstance(got, DataError):
            text = str(got).replace(str(root / str(k)) + "/", "")
            text = "error: " + text.replace("|", "\\|").replace("`", "'")
        else:
            text = f"accepted: {c.accepted}"
        lines.append(f"| `{c.id}` | {c.what} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sys.stdout.write(markdown_table(Path(tmp)) + "\n")
