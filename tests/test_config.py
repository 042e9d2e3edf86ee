"""Configuration: YAML, dotted overrides, typed coercion, clear errors, protocol presets."""

from __future__ import annotations

import pytest

from mbrec.config import build_config, config_from_dict, parse_overrides
from mbrec.errors import ConfigError, UnknownNameError
from mbrec.protocol import get_protocol


def test_dotted_overrides_parse_yaml_values_without_eval():
    assert parse_overrides(["train.lr=1e-3", "protocol.ks=[5, 10]", "model_args.mode=merged", "x=__import__('os')"]) == {
        "train": {"lr": 1e-3},
        "protocol": {"ks": [5, 10]},
        "model_args": {"mode": "merged"},
        "x": "__import__('os')",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_resolution_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: lightgcn\ndata: synthetic\nseed: 7\ntrain: {lr: 0.01, epochs: 9}\nmodel_args: {n_layers: 2}\nprotocol: rmbrec\n")
    cfg = build_config("lightgcn", None, config_file=f, overrides=["train.epochs=3"])
    assert cfg.train.lr == 0.01  # YAML over the model's train_defaults
    assert cfg.train.epochs == 3  # --set over YAML
    assert cfg.train.patience == 20  # the model's train_defaults
    assert cfg.model_args.n_layers == 2 and cfg.seed == 7
    assert cfg.protocol.name == "rmbrec" and cfg.protocol.select_metric == "HR@10"
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_unknown_keys_and_bad_types_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        build_config("lightgcn", "synthetic", overrides=["model_args.n_layer=2"])
    with pytest.raises(ConfigError, match="expected int"):
        build_config("lightgcn", "synthetic", overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config("lightgcn", "synthetic", overrides=["trian.epochs=1"])
    with pytest.raises(UnknownNameError, match="unknown model"):
        build_config("nosuchmodel", "synthetic")
    f = tmp_path / "c.yaml"
    f.write_text("model: rmbrec\n")
    with pytest.raises(ConfigError, match="for model 'rmbrec'"):
        build_config("lightgcn", None, config_file=f)
    with pytest.raises(ConfigError, match="not found"):
        build_config("lightgcn", None, config_file=tmp_path / "missing.yaml")


def test_protocol_presets_and_overrides():
    assert get_protocol("copf").hr == "hits_per_user" and get_protocol("copf").paper_parity
    assert get_protocol("mmr").mask == "behavior" and get_protocol("mmr").tasks == "all"
    p = get_protocol({"preset": "rmbrec", "ks": [10, 20, 50]})
    assert p.ks == (10, 20, 50) and p.name == "rmbrec"
    assert get_protocol("default", ks=[5]).ks == (5, 10)  # the selection cut-off is added
    with pytest.raises(UnknownNameError):
        get_protocol("nope")
    with pytest.raises(ConfigError, match="protocol.mask"):
        get_protocol("default", mask="everything")
    with pytest.raises(ConfigError, match="unknown protocol field"):
        get_protocol({"preset": "default", "kss": [1]})
    assert "best-on-TEST" in get_protocol("copf").describe()


def test_protocol_field_override_refines_a_preset_given_by_name(tmp_path):
    """``protocol: mmr`` in YAML + ``--set protocol.select_behavior=sum`` keeps mmr (a bug once
    silently fell back to the default preset)."""
    f = tmp_path / "c.yaml"
    f.write_text("model: lightgcn\ndata: synthetic\nprotocol: mmr\n")
    cfg = build_config("lightgcn", None, config_file=f, overrides=["protocol.select_behavior=sum"])
    assert cfg.protocol.name == "mmr" and cfg.protocol.mask == "behavior" and cfg.protocol.ks == (5, 10, 20)
    assert cfg.protocol.select_behavior == "sum"
    cfg = build_config("lightgcn", None, config_file=f, overrides=["protocol.ks=[5]"])
    assert cfg.protocol.name == "mmr" and cfg.protocol.tasks == "all"
    # a whole new preset by name still replaces it, and --protocol (protocol.preset=...) switches it
    assert build_config("lightgcn", None, config_file=f, overrides=["protocol=copf"]).protocol.name == "copf"
    assert build_config("lightgcn", None, config_file=f, overrides=["protocol.preset=rmbrec"]).protocol.name == "rmbrec"
