"""Every model config declares its options (``mbrec.options.option``): allowed values, a doc line,
and one-line ``ConfigError``s instead of tracebacks."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from mbrec.cli.main import main
from mbrec.models.base import BUILTIN_MODELS, get_model_class
from mbrec.options import check_options

MODELS = sorted(BUILTIN_MODELS)


def _is_text(hint: object) -> bool:
    """``str`` or ``str | None`` (not lists or dicts of strings)."""
    if hint is str:
        return True
    args = typing.get_args(hint)
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and str in args and \
        all(a in (str, type(None)) for a in args)


@pytest.mark.parametrize("model", MODELS)
def test_every_field_is_declared_with_a_doc(model: str) -> None:
    cls = get_model_class(model).config_class
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc"), f"{model}: model_args.{f.name} has no option(..., doc=...)"


@pytest.mark.parametrize("model", MODELS)
def test_text_fields_declare_their_choices(model: str) -> None:
    cls = get_model_class(model).config_class
    hints = typing.get_type_hints(cls)
    text = [f for f in dataclasses.fields(cls) if _is_text(hints[f.name])]
    for f in text:
        assert f.metadata.get("choices"), f"{model}: model_args.{f.name} is text without declared choices"
        default = f.default
        assert default is None or default in f.metadata["choices"], f"{model}: default of {f.name} not allowed"


@pytest.mark.parametrize("model", MODELS)
def test_defaults_pass_the_declared_checks(model: str) -> None:
    check_options(get_model_class(model).config_class(), "model_args")


def test_bad_copf_variant_is_one_line_exit_2(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", "copf", "synthetic", "--set", "model_args.variant=X", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model_args.variant = 'X'" in err and "'full'" in err and "'wo_fit'" in err
    assert "Traceback" not in err
