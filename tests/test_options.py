"""Declared options (``mbrec.options``): one declaration, one check, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mbrec.config import build_config
from mbrec.errors import ConfigError
from mbrec.options import check_options, describe_options, option


@dataclass
class _Cfg:
    mode: str = option("a", choices=("a", "b"), doc="a mode")
    tau: float = option(0.2, gt=0, doc="temperature")
    layers: list = option([1, 2], min=1)
    free: int = 3


def test_defaults_pass_and_lists_are_fresh_copies() -> None:
    a, b = _Cfg(), _Cfg()
    check_options(a, "x")
    a.layers.append(5)
    assert b.layers == [1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "c"}, "x.mode = 'c'; allowed: one of 'a', 'b'"),
        ({"tau": 0.0}, "x.tau = 0.0; allowed: > 0"),
        ({"tau": float("nan")}, "x.tau = nan; allowed: > 0"),
        ({"layers": [1, 0]}, "x.layers = [1, 0] (element 0); allowed: >= 1"),
    ],
)
def test_violations_name_key_value_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_options(_Cfg(**kwargs), "x")
    assert str(e.value) == message


def test_describe_lists_default_allowed_and_doc() -> None:
    rows = {name: (default, allowed, doc) for name, default, allowed, doc in describe_options(_Cfg)}
    assert rows["mode"] == ("a", "one of 'a', 'b'", "a mode")
    assert rows["free"] == (3, "", "")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=-5", "train.epochs = -5; allowed: >= 0"),
        ("train.lr=-1", "train.lr = -1.0; allowed: >= 0 and <= 100"),
        ("model_args.embedding_dim=0", "model_args.embedding_dim = 0; allowed: >= 1"),
    ],
)
def test_build_config_checks_declared_options(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config("lightgcn", "synthetic", overrides=[override])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("protocol.ks=[a]", "protocol.ks = ('a',) (element 'a'); allowed: >= 1"),
        ("protocol.ks=[2.5]", "protocol.ks = [2.5]; allowed: a non-empty list of whole numbers >= 1"),
        ("protocol.mask=foo", "protocol.mask = 'foo'; allowed: one of 'target', 'behavior', 'all', 'none'"),
        ("protocol.n_negatives=0", "protocol.n_negatives = 0; allowed: >= 1"),
    ],
)
def test_protocol_fields_are_declared_options(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config("lightgcn", "synthetic", overrides=[override])
    assert str(e.value) == message
