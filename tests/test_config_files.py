"""Every shipped YAML under configs/ resolves: known model, known fields, valid options."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbrec.config import build_config, read_yaml
from mbrec.models.base import BUILTIN_MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def test_there_are_configs_for_every_builtin_model() -> None:
    assert {p.parent.name for p in CONFIGS} >= set(BUILTIN_MODELS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_file_resolves(path: Path) -> None:
    raw = read_yaml(path)
    assert raw["model"] == path.parent.name, "configs/<model>/<data>.yaml must be for <model>"
    cfg = build_config(path.parent.name, config_file=path)
    assert cfg.model == path.parent.name
    assert cfg.data.split("/")[0] == path.stem, "the file name names the dataset it is for"
