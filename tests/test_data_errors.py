"""Bad input: one DataError naming the file, the line and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbrec.data.registry import load_dataset
from mbrec.errors import DataError, UnknownNameError


def make(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    d = tmp_path / "ds"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def err(d: Path, **options: object) -> DataError:
    with pytest.raises(DataError) as e:
        load_dataset(d, **options)
    return e.value


GOOD_YAML = "behaviors: [view, buy]\n"


def test_missing_column_suggests_name(tmp_path: Path) -> None:
    d = make(tmp_path, {"interactions.csv": "usr,item,behavior\n1,2,buy\n", "dataset.yaml": GOOD_YAML})
    e = err(d)
    assert "missing column 'user'" in str(e) and "did you mean 'usr'" in str(e)
    assert e.path and e.path.endswith("interactions.csv") and e.line == 1


def test_misspelt_optional_column(tmp_path: Path) -> None:
    d = make(tmp_path, {"interactions.csv": "user,item,behavior,splt\n1,2,buy,train\n",
                        "dataset.yaml": GOOD_YAML})
    assert "did you mean 'split'" in str(err(d))


def test_unknown_behavior_names_line(tmp_path: Path) -> None:
    csv = "user,item,behavior\n1,2,buy\n1,3,veiw\n"
    e = err(make(tmp_path, {"interactions.csv": csv, "dataset.yaml": GOOD_YAML}))
    assert e.line == 3 and e.value == "veiw" and "did you mean 'view'" in str(e)


def test_yaml_disagrees_with_file(tmp_path: Path) -> None:
    csv = "user,item,behavior\n1,2,buy\n2,3,buy\n"
    e = err(make(tmp_path, {"interactions.csv": csv, "dataset.yaml": GOOD_YAML}))
    assert "'view'" in str(e) and "no rows" in str(e)
    d2 = tmp_path / "b"
    d2.mkdir()
    (d2 / "interactions.csv").write_text("user,item,behavior\n1,2,buy\n2,3,view\n")
    (d2 / "dataset.yaml").write_text("behaviors: [view, buy]\nn_users: 5\n")
    e = err(d2)
    assert "n_users" in str(e) and e.path.endswith("dataset.yaml")
    (d2 / "dataset.yaml").write_text("behaviors: [view, buy]\nbehaviour: x\n")
    assert "did you mean 'behaviors'" in str(err(d2))
    (d2 / "dataset.yaml").write_text("behaviors: [view, buy]\ntarget: cart\n")
    assert "target 'cart'" in str(err(d2))


def test_bad_split_value(tmp_path: Path) -> None:
    csv = "user,item,behavior,split\n1,2,buy,train\n1,3,buy,tset\n"
    e = err(make(tmp_path, {"interactions.csv": csv, "dataset.yaml": "behaviors: [buy]\n"}))
    assert e.line == 3 and e.value == "tset" and "did you mean 'test'" in str(e)


def test_heldout_for_unknown_user(tmp_path: Path) -> None:
    """Kept by default (tests/test_data_heldout.py); an error only with heldout_unseen: error."""
    csv = "user,item,behavior,split\n1,2,buy,train\n9,2,buy,test\n"
    d = make(tmp_path, {"interactions.csv": csv, "dataset.yaml": "behaviors: [buy]\n"})
    assert load_dataset(d).test["buy"].nnz == 1
    e = err(d, heldout_unseen="error")
    assert e.line == 3 and e.value == "9" and "user with no training row" in str(e)


def test_empty_target(tmp_path: Path) -> None:
    csv = "user,item,behavior,split\n1,2,view,train\n1,2,buy,test\n"
    e = err(make(tmp_path, {"interactions.csv": csv, "dataset.yaml": GOOD_YAML}))
    assert "no training rows" in str(e)
    d = tmp_path / "t"
    d.mkdir()
    (d / "buy.txt").write_text("")
    (d / "test.txt").write_text("1 1\n")
    assert "no training pairs" in str(err(d))


def test_non_numeric_id_in_text_layout(tmp_path: Path) -> None:
    d = make(tmp_path, {"buy.txt": "1 1\n\n2 x7\n", "test.txt": "1 2\n"})
    e = err(d)
    assert e.path.endswith("buy.txt") and e.line == 3 and e.value == "x7"


def test_id_beyond_declared_count(tmp_path: Path) -> None:
    d = make(tmp_path, {"count.txt": '{"user": 2, "item": 3}', "buy.txt": "1 1\n2 3\n",
                        "view.txt": "1 1\n2 4\n", "test.txt": "1 2\n"})
    e = err(d)
    assert e.path.endswith("view.txt") and e.line == 2 and e.value == 4
    (d / "view.txt").write_text("1 1\n")
    (d / "test.txt").write_text("3 1\n")
    e = err(d)
    assert e.path.endswith("test.txt") and e.line == 1 and e.value == 3


def test_unreadable_pickle(tmp_path: Path) -> None:
    d = make(tmp_path, {"trn_buy": b"not a pickle", "tst_int": b"x"})
    e = err(d)
    assert "unreadable pickle" in str(e) and e.path.endswith("trn_buy")


def test_unknown_option_and_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="did you mean 'n_users'"):
        load_dataset("synthetic", n_user=10)
    with pytest.raises(UnknownNameError, match="unknown dataset"):
        load_dataset(str(tmp_path / "missing-folder"))
    with pytest.raises(DataError, match="unknown behavior 'veiw'"):
        load_dataset("synthetic", behaviors=["veiw", "buy"])
