"""Loaders on tiny hand-made files: one test per layout plus auto-detection."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mbrec.data.registry import detect_layout, load_dataset
from mbrec.errors import DataError


def write(path: Path, text: str, crlf: bool = False) -> None:
    path.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())


def pairs(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist()))


# ----------------------------------------------------------------------------- CRGCN text
def crgcn_dir(tmp_path: Path) -> Path:
    d = tmp_path / "crgcn"
    d.mkdir()
    write(d / "count.txt", '{"user": 4, "item": 5}')
    write(d / "view.txt", "1 1\n1 2\n2 2\n2 3\n3 4\n3 1\n")
    write(d / "cart.txt", "1 1\n2 2\n3 4\n")
    write(d / "buy.txt", "1 1\n2 2\n3 4\n1 2\n")  # = train ∪ validation
    write(d / "train.txt", "1 1\n2 2\n3 4\n", crlf=True)
    write(d / "validation.txt", "1 2\n")
    write(d / "test.txt", "1 3\n2 5\n")
    return d


def test_crgcn_text_layout(tmp_path: Path) -> None:
    d = crgcn_dir(tmp_path)
    assert detect_layout(d) == "crgcn-text"
    data = load_dataset(d)
    assert data.behaviors == ("view", "cart", "buy")
    assert (data.n_users, data.n_items) == (4, 5)  # user 4 / item 5 exist without training pairs
    assert list(data.user_ids) == ["1", "2", "3", "4"]
    assert pairs(data.train["buy"]) == {(0, 0), (1, 1), (2, 3)}  # train.txt, CRLF tolerated
    assert pairs(data.valid["buy"]) == {(0, 1)}
    assert pairs(data.test["buy"]) == {(0, 2), (1, 4)}
    assert data.train["view"].nnz == 6 and data.train["cart"].nnz == 3
    assert "train.txt" in data.description


def test_crgcn_valid_policy(tmp_path: Path) -> None:
    d = tmp_path / "mule"
    d.mkdir()
    write(d / "view.txt", "1 1\n1 2\n2 2\n2 3\n3 3\n")
    write(d / "cart.txt", "1 1\n2 2\n")
    write(d / "buy.txt", "1 1\n1 2\n2 2\n2 3\n3 3\n")
    write(d / "train.txt", "1 1\n1 2\n2 2\n2 3\n3 3\n")
    write(d / "valid.txt", "1 2\n2 3\n")  # subset of train, as in mule-taobao
    write(d / "test.txt", "1 3\n2 1\n")
    carved = load_dataset(d)
    assert carved.train["buy"].nnz == 3 and carved.valid["buy"].nnz == 2
    assert "carve" in carved.description
    ignored = load_dataset(d, valid_policy="ignore")
    assert ignored.train["buy"].nnz == 5 and ignored.valid["buy"].nnz == 0
    assert "ignore" in ignored.description
    assert (carved.n_users, carved.n_items) == (3, 3)  # no count.txt: max id
    with pytest.raises(DataError, match="valid_policy"):
        load_dataset(d, valid_policy="keep")
    with pytest.raises(DataError, match="did you mean 'valid_policy'"):
        load_dataset(d, valid_polcy="carve")


# ----------------------------------------------------------------------------- pickles
def dump(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def test_pickle_layout(tmp_path: Path) -> None:
    d = tmp_path / "pk"
    d.mkdir()
    buy = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=np.int32))
    cart = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=np.int32))
    pv = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=np.int64))
    dump(d / "trn_buy", buy)
    dump(d / "trn_cart", cart)
    dump(d / "trn_pv_DERIVED", pv)
    dump(d / "tst_int", [2, None, [0, np.int64(1)]])
    assert detect_layout(d) == "hkuds-pickle"
    data = load_dataset(d)
    assert data.behaviors == ("pv", "cart", "buy")
    assert list(data.user_ids) == ["0", "1", "2"]
    assert pairs(data.test["buy"]) == {(0, 2), (2, 0), (2, 1)}
    assert data.train["pv"].nnz == 7 and data.valid["buy"].nnz == 0
    assert "trn_pv_DERIVED" in data.description
    carved = load_dataset(d, carve_valid=True, seed=3)
    assert carved.valid["buy"].nnz == 1  # only user 2 has >= 2 training buys
    assert carved.train["buy"].nnz == 3


# ----------------------------------------------------------------------------- split files
def jd_dir(tmp_path: Path) -> Path:
    d = tmp_path / "jd"
    d.mkdir()
    write(d / "click_train", "1 1\n1 2\n2 3\n3 4\n")
    write(d / "click_valid", "1 3\n")
    write(d / "click_test", "2 1\n")
    write(d / "favourite_train", "1 2\n")
    write(d / "favourite_valid", "")
    write(d / "favourite_test", "3 1\n")
    write(d / "cart_train", "")
    write(d / "cart_valid", "2 2\n")
    write(d / "cart_test", "1 4\n")
    write(d / "target_train", "1 1\n2 3\n3 4\n3 5\n")
    write(d / "target_valid", "1 2\n")
    write(d / "target_test", "3 2\n")
    return d


def test_split_files_layout(tmp_path: Path) -> None:
    d = jd_dir(tmp_path)
    assert detect_layout(d) == "split-files"
    data = load_dataset(d)
    assert data.behaviors == ("click", "favourite", "purchase")
    assert (data.n_users, data.n_items) == (3, 5)
    assert pairs(data.valid["click"]) == {(0, 2)} and pairs(data.test["favourite"]) == {(2, 0)}
    assert data.valid["favourite"].nnz == 0  # empty file allowed
    assert "Dropped behavior(s) ['cart']" in data.description
    kept = load_dataset(d, keep_empty=True)
    assert kept.behaviors == ("click", "favourite", "cart", "purchase")
    assert kept.train["cart"].nnz == 0 and kept.test["cart"].nnz == 1


# ----------------------------------------------------------------------------- generic
def generic_dir(tmp_path: Path, csv: str, yaml_text: str, name: str = "gen") -> Path:
    d = tmp_path / name
    d.mkdir()
    write(d / "interactions.csv", csv)
    write(d / "dataset.yaml", yaml_text)
    return d


def test_generic_with_split_column(tmp_path: Path) -> None:
    csv = (
        "user,item,behavior,split\n"
        "alice,x,view,train\nalice,y,view,train\nalice,x,buy,train\nbob,y,buy,train\n"
        "bob,y,buy,train\n"  # duplicate collapses
        "bob,x,buy,test\nalice,y,buy,valid\nbob,x,view,valid\n"
    )
    d = generic_dir(tmp_path, csv, "behaviors: [view, buy]\n")
    assert detect_layout(d) == "generic"
    data = load_dataset(d)
    assert data.behaviors == ("view", "buy")
    assert list(data.user_ids) == ["alice", "bob"] and list(data.item_ids) == ["x", "y"]
    assert pairs(data.train["buy"]) == {(0, 0), (1, 1)}
    assert pairs(data.test["buy"]) == {(1, 0)} and pairs(data.valid["buy"]) == {(0, 1)}
    assert pairs(data.valid["view"]) == {(1, 0)}


def test_generic_loo_by_timestamp(tmp_path: Path) -> None:
    rows = ["user,item,behavior,timestamp"]
    # user 1 buys items 10, 11, 12, 13 at times 4, 1, 3, 2 -> test 10, valid 12
    for item, t in ((10, 4), (11, 1), (12, 3), (13, 2)):
        rows.append(f"1,{item},buy,{t}")
    rows += ["2,10,buy,5", "2,11,buy,9"]  # two buys -> test only (latest 11)
    rows += ["3,12,buy,1"]  # one buy -> training only
    rows += ["1,10,buy,0"]  # earlier duplicate: the pair keeps time 0 -> no longer latest
    rows += ["3,10,cart,1"]
    d = generic_dir(tmp_path, "\n".join(rows) + "\n", "behaviors: [cart, buy]\ntarget: buy\n")
    data = load_dataset(d)
    ui = lambda u, i: (data.user_index(u), data.item_index(i))  # noqa: E731
    assert list(data.item_ids) == ["10", "11", "12", "13"]  # numeric order
    assert pairs(data.test["buy"]) == {ui(1, 12), ui(2, 11)}
    assert pairs(data.valid["buy"]) == {ui(1, 13)}
    assert pairs(data.train["buy"]) == {ui(1, 10), ui(1, 11), ui(2, 10), ui(3, 12)}
    assert "latest by timestamp" in data.description


def test_generic_loo_random_is_seeded(tmp_path: Path) -> None:
    rows = ["user,item,behavior"] + [f"u{u},i{i},buy" for u in range(6) for i in range(5)]
    d = generic_dir(tmp_path, "\n".join(rows) + "\n", "behaviors: [buy]\n")
    a, b, c = load_dataset(d, seed=1), load_dataset(d, seed=1), load_dataset(d, seed=2)
    assert a.test["buy"].nnz == 6 and a.valid["buy"].nnz == 6 and a.train["buy"].nnz == 18
    assert pairs(a.test["buy"]) == pairs(b.test["buy"])
    assert pairs(a.test["buy"]) != pairs(c.test["buy"])


def test_generic_tsv_and_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pandas as pd

    df = pd.DataFrame({"user": ["1", "1", "2", "2"], "item": ["a", "b", "a", "b"],
                       "behavior": ["click", "buy", "buy", "buy"],
                       "split": ["train", "train", "train", "test"]})
    for suffix in ("tsv", "parquet"):
        d = tmp_path / suffix
        d.mkdir()
        if suffix == "tsv":
            df.to_csv(d / "interactions.tsv", sep="\t", index=False)
        else:
            df.to_parquet(d / "interactions.parquet")
        write(d / "dataset.yaml", "behaviors: [click, buy]\n")
        data = load_dataset(d)
        assert data.counts()["train"] == {"click": 1, "buy": 2} and data.test["buy"].nnz == 1


def test_detect_layout_lists_files(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match=r"no known dataset layout.*notes\.md"):
        detect_layout(tmp_path)


def test_generic_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mbrec.data.formats import generic

    csv = "user,item,behavior,split\n1,a,view,train\n1,b,buy,train\n2,a,buy,train\n2,b,buy,test\n"
    d = generic_dir(tmp_path, csv, "behaviors: [view, buy]\n")
    fast = load_dataset(d)
    monkeypatch.setattr(generic, "USE_PYARROW_CSV", False)
    slow = load_dataset(d)
    assert fast.counts() == slow.counts() and list(fast.item_ids) == list(slow.item_ids)
    (d / "interactions.csv").rename(d / "interactions.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match="needs pyarrow"):
        load_dataset(d)


def test_generic_empty_id_and_dates(tmp_path: Path) -> None:
    csv = "user,item,behavior,timestamp\n1,a,buy,2024-01-02\n1,b,buy,2024-01-01\n1,c,buy,2024-01-03\n"
    data = load_dataset(generic_dir(tmp_path, csv, "behaviors: [buy]\n"))
    assert pairs(data.test["buy"]) == {(0, data.item_index("c"))}
    assert pairs(data.valid["buy"]) == {(0, data.item_index("a"))}
    bad = generic_dir(tmp_path, "user,item,behavior\n1,a,buy\n,b,buy\n", "behaviors: [buy]\n", "e")
    with pytest.raises(DataError, match="empty user id") as e:
        load_dataset(bad)
    assert e.value.line == 3


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("fmt", ["csv-pyarrow", "csv-pandas", "parquet"])
def test_generic_streams_in_small_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Tiny batches (3 rows, 64-byte CSV blocks) give the same container as one batch, and an
    error in a later batch names its own line."""
    from mbrec.data.formats import generic, table

    rng = np.random.default_rng(0)
    rows = [f"u{rng.integers(9)},i{rng.integers(12)},{['view', 'buy'][rng.integers(2)]},"
            f"{['train', 'train', 'valid', 'test'][rng.integers(4)]},{k}" for k in range(60)]
    rows += ["u0,i0,buy,train,100"]
    csv = "user,item,behavior,split,timestamp\n" + "\n".join(rows) + "\n"
    d = generic_dir(tmp_path, csv, "behaviors: [view, buy]\n")
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
        import pandas as pd

        pd.read_csv(d / "interactions.csv", dtype=str).to_parquet(d / "interactions.parquet")
        (d / "interactions.csv").unlink()
    if fmt == "csv-pandas":
        monkeypatch.setattr(generic, "USE_PYARROW_CSV", False)
    whole = load_dataset(d)
    monkeypatch.setattr(table, "BATCH_ROWS", 3)
    monkeypatch.setattr(table, "CSV_BLOCK", 64)
    parts = load_dataset(d)
    assert list(parts.user_ids) == list(whole.user_ids) and list(parts.item_ids) == list(whole.item_ids)
    for s in ("train", "valid", "test"):
        for b in whole.behaviors:
            assert pairs(parts.split(s)[b]) == pairs(whole.split(s)[b])
    if fmt != "parquet":
        write(d / "interactions.csv", csv.replace("u0,i0,buy,train,100", "u0,i0,buy,tset,100"))
        with pytest.raises(DataError) as e:
            load_dataset(d)
        assert e.value.line == 62 and e.value.value == "tset"


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mbrec.data.formats import table

    csv = "user,item,behavior\n1,a,buy\n1,b,view\n2,a,buy\n"
    d = generic_dir(tmp_path, csv, "behaviors: [view, buy]\n")
    load_dataset(d)
    assert "reading interactions.csv" not in capsys.readouterr().err  # not a terminal
    monkeypatch.setattr(table, "PROGRESS_BYTES", 0)
    monkeypatch.setattr(table.sys.stderr, "isatty", lambda: True, raising=False)
    load_dataset(d)
    assert "reading interactions.csv" in capsys.readouterr().err
