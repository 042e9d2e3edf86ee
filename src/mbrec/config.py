"""Typed run configuration: dataclasses, YAML files and dotted ``key=value`` overrides.

Resolution order (later wins): dataclass defaults < the model's ``train_defaults`` < the YAML
file (``--config``) < command-line flags and ``--set`` overrides. Values in ``--set`` are parsed
as YAML scalars/lists (``--set train.lr=1e-3``, ``--set protocol.ks=[5,10]``); nothing is
ever ``eval``-ed. Unknown keys are errors that list the known ones.

A YAML file::

    model: rmbrec
    data: crgcn-beibei          # built-in name, folder under $MBREC_DATASETS, or a path
    data_options: {}            # loader options (e.g. valid_policy: carve)
    protocol: rmbrec            # preset name, or {preset: rmbrec, ks: [10, 20, 50]}
    seed: 2026
    train: {epochs: 200, patience: 20, lr: 0.001, weight_decay: 0.001}
    model_args: {lambda_cl: 0.8, tau: 0.07}
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mbrec.errors import ConfigError
from mbrec.models.base import ModelConfig, get_model_class
from mbrec.options import check_options, option
from mbrec.protocol import Protocol, get_protocol


@dataclass
class TrainConfig:
    """Trainer settings. ``patience`` and ``epochs`` count epochs."""

    epochs: int = option(100, min=0, doc="training epochs")
    patience: int = option(20, min=0, doc="stop when epoch - best_epoch > patience (RMBRec's rule); 0 disables early stopping")
    min_epochs: int = option(0, min=0, doc="early stopping cannot end a run before this epoch (models with early "
                                           "stopping default to 50 without a config; paper configs set 0)")
    lr: float = option(1e-3, min=0, max=100, doc="Adam learning rate (0 freezes the weights)")
    weight_decay: float = option(0.0, min=0, doc="Adam weight decay")
    lr_decay: float = option(1.0, gt=0, max=1, doc="staircase decay lr * lr_decay ** (step // lr_decay_steps) (COPF/PKEF)")
    lr_decay_steps: int = option(0, min=0, doc="steps per decay stair; 0 = no decay")
    eval_every: int = option(1, min=1, doc="evaluate every N epochs")
    eval_start: int = option(1, min=0, doc="first evaluated epoch (0 = before training)")
    test_every_eval: bool = option(False, doc="also evaluate the test split at each evaluation (for curves)")
    eval_memory_mb: float = option(512.0, gt=0, doc="memory budget of one chunk of full-ranking scores")
    progress: bool | None = option(None, doc="progress bar; None: only on an interactive terminal outside CI")
    grad_clip: float = option(0.0, min=0, doc="clip the gradient norm to this value; 0 = off")


@dataclass
class RunConfig:
    """Everything that defines one run. ``model_args`` is a model's own config dataclass."""

    model: str = "lightgcn"
    data: str = "synthetic"
    data_options: dict[str, Any] = field(default_factory=dict)
    protocol: Protocol = field(default_factory=Protocol)
    seed: int = 0
    device: str = "cpu"
    train: TrainConfig = field(default_factory=TrainConfig)
    model_args: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, Any]:
        proto = dataclasses.asdict(self.protocol)
        proto["preset"] = proto.pop("name")
        proto["ks"] = list(self.protocol.ks)
        proto["metrics"] = list(self.protocol.metrics)
        return {
            "model": self.model,
            "data": self.data,
            "data_options": dict(self.data_options),
            "protocol": proto,
            "seed": self.seed,
            "device": self.device,
            "train": dataclasses.asdict(self.train),
            "model_args": dataclasses.asdict(self.model_args),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML (numbers, booleans, lists, strings); never evaluated as code."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-3", ...]`` -> nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        parts = key.strip().split(".")
        if len(parts) > 1 and parts[0] == "protocol":
            out = _preset_as_section(out)  # protocol=mmr, then protocol.ks=[5]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {p!r} is not a section")
        node[parts[-1]] = parse_value(value)
    return out


def _preset_as_section(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``{protocol: mmr}`` -> ``{protocol: {preset: mmr}}`` so that field overrides can refine it."""
    if isinstance(raw.get("protocol"), str):
        return {**raw, "protocol": {"preset": raw["protocol"]}}
    return dict(raw)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` (nested mappings merge, anything else replaces).

    ``protocol: mmr`` in ``base`` is shorthand for ``{preset: mmr}``: when ``extra`` refines the
    protocol field by field (``protocol.ks=[5]``), the refinement applies to that preset instead of
    replacing it by the default one. A string in ``extra`` still replaces the whole protocol.
    """
    if isinstance(extra.get("protocol"), Mapping):
        base = _preset_as_section(base)
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def check_keys(found: Any, known: Any, where: str) -> None:
    """Raise a ConfigError naming every key of ``found`` not in ``known``, with spelling hints.

    Keys that are not strings (YAML read ``{name: a, b}`` as keys ``name`` and ``b``; a plain
    scalar in a flow mapping ends at its first comma) get a hint to quote the value.
    """
    names = [str(k) for k in known]
    unknown = [k for k in found if k not in known]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), names, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    text = f"{where}: unknown key(s) {', '.join(hints)}; known: {sorted(names)}"
    if any(not isinstance(k, str) for k in unknown):
        text += (". A non-text key usually means a comma inside an unquoted value of a "
                 "{...} mapping (YAML splits it there): quote that value")
    raise ConfigError(text)


def _fill(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` with type coercion and clear errors."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, known, where)
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _coerce(v, known[k], f"{where}.{k}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    check_options(obj, where.split(" ")[0])
    return obj


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:  # type: ignore[type-arg]
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    )
    if value is None or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError
            return value
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value
        if isinstance(default, (tuple, list)):
            if isinstance(value, (int, float, str)):
                value = [value]
            return type(default)(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}") from None
    return value


def _whole_number(value: Any, key: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(f"{key} = {value!r}; allowed: a whole number")
    return int(value)


def build_config(
    model: str | None = None,
    data: str | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
) -> RunConfig:
    """Resolve a :class:`RunConfig` (see the module docstring for the order)."""
    raw: dict[str, Any] = read_yaml(config_file) if config_file else {}
    if model is not None:
        if raw.get("model") not in (None, model):
            raise ConfigError(f"{config_file}: this config is for model {raw['model']!r}, not {model!r}")
        raw["model"] = model
    if data is not None:
        raw["data"] = data
    extra = parse_overrides(list(overrides)) if isinstance(overrides, list) else dict(overrides or {})
    raw = deep_merge(raw, extra)  # keeps a shorthand preset that extra refines (see deep_merge)
    known_top = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - known_top)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(known_top)}")
    model_name = str(raw.get("model", "lightgcn"))
    cls = get_model_class(model_name)
    train_values = deep_merge(cls.train_defaults, raw.get("train") or {})
    proto_raw = raw.get("protocol")
    try:
        protocol = get_protocol(proto_raw)
    except TypeError as e:
        raise ConfigError(f"protocol: {e}") from None
    data_options = raw.get("data_options") or {}
    if not isinstance(data_options, dict):
        raise ConfigError(f"data_options must be a mapping, got {data_options!r}")
    return RunConfig(
        model=model_name,
        data=str(raw.get("data", "synthetic")),
        data_options=dict(data_options),
        protocol=protocol,
        seed=_whole_number(raw.get("seed", 0), "seed"),
        device=str(raw.get("device", "cpu")),
        train=_fill(TrainConfig, train_values, "train"),
        model_args=_fill(cls.config_class, raw.get("model_args") or {}, f"model_args ({model_name})"),
    )


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :meth:`RunConfig.to_dict` output (a run's config.yaml).
    Keys added to mbrec after the file was written take the value that reproduces how that run
    was trained (:data:`ADDED_KEYS`), not today's model defaults."""
    d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    for section, key, value in ADDED_KEYS:
        if isinstance(d.get(section), dict):
            d[section].setdefault(key, value)
    return build_config(overrides=d)


#: (section, key, value) of settings added after run folders existed, with the value under which
#: older runs trained (``train.min_epochs``: there was no minimum)
ADDED_KEYS: tuple[tuple[str, str, Any], ...] = (("train", "min_epochs", 0),)
