"""Experiment specs: typed dataclasses read from YAML, expanded into one :class:`RunPlan` per run.

A spec (``experiments/*.yaml``)::

    name: copf-table2
    kind: table                  # table (default) | noise | sweep
    description: COPF Table 2, Beibei and Taobao-15k columns
    seeds: [0, 1, 2, 3, 4]       # or a count: 5 -> [0, 1, 2, 3, 4]
    reference: copf              # row the t-test and the relative-improvement row compare against
    metrics: [HR@10, NDCG@10]    # table columns per dataset (split ``test``, target behavior)
    epochs: null                 # optional epoch cap (min with each config's train.epochs)
    set: {}                      # overrides for every run, dotted keys: {train.eval_every: 5}
    config_dir: configs          # where configs/<model>/<dataset>.yaml live
    datasets:
      - {name: hkuds-beibei, label: Beibei}        # name selects the config file
      - {name: mule-taobao, label: Taobao-15k}
    models:
      - lightgcn                                   # row "lightgcn", configs/lightgcn/<dataset>.yaml
      - {name: COPF-P, model: copf, set: {model_args.variant: P}}
      - {name: bare, model: lightgcn, config: none}  # no file: the model's defaults

The data each run loads is the config file's ``data`` (and ``data_options``) unless the dataset
entry gives ``data`` / ``data_options``; a missing config file is an error that names the path.
``kind: noise`` adds ``noise: {ratios: [...], behaviors: null}`` (one run per ratio, ratio 0 =
clean data); ``kind: sweep`` adds ``sweep: {params: {model_args.lambda_cl: [0.2, 0.5, 1.0]}}``
(one or two parameters; every combination is a run).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from mbrec.config import RunConfig, build_config, check_keys, deep_merge, parse_overrides, read_yaml
from mbrec.errors import ConfigError, MbrecError

KINDS = ("table", "noise", "sweep")
DEFAULT_NOISE_RATIOS = (-0.5, -0.3, -0.1, 0.1, 0.3, 0.5)
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def safe_name(text: str) -> str:
    """A folder-safe version of a row / dataset / value label."""
    return _SAFE.sub("_", str(text)).strip("_") or "x"


def nest(overrides: Mapping[str, Any] | list[str] | None, where: str) -> dict[str, Any]:
    """``{"model_args.variant": "P"}`` / ``["train.lr=1e-3"]`` / nested mappings -> a nested dict."""
    if overrides is None:
        return {}
    if isinstance(overrides, list):
        if not all(isinstance(x, str) for x in overrides):
            raise ConfigError(f"{where}: expected a mapping or a list of 'key=value' strings, got {overrides!r}")
        return parse_overrides(overrides)
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: expected a mapping of overrides, got {overrides!r}")
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node: dict[str, Any] = {}
        leaf = node
        for p in parts[:-1]:
            leaf = leaf.setdefault(p, {})
        leaf[parts[-1]] = nest(value, where) if isinstance(value, Mapping) else value
        out = deep_merge(out, node)
    return out


@dataclass
class ModelEntry:
    """One table row: a registered model, its config file and overrides."""

    name: str
    model: str
    #: ``None``: ``<config_dir>/<model>/<dataset>.yaml`` (must exist); ``"none"``: no file;
    #: ``"auto"``: that path when it exists, else none; otherwise a path (``{dataset}`` expands)
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetEntry:
    """One table column group: ``name`` picks the config file, ``label`` heads the column."""

    name: str
    label: str
    data: str | None = None
    data_options: dict[str, Any] | None = None


@dataclass
class NoiseSpec:
    ratios: tuple[float, ...] = DEFAULT_NOISE_RATIOS
    behaviors: tuple[str, ...] | None = None
    #: seed of the perturbation (added to the run seed, so each seed sees its own noise)
    seed_offset: int = 0


@dataclass
class SweepSpec:
    params: dict[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass
class ExperimentSpec:
    name: str
    models: list[ModelEntry]
    datasets: list[DatasetEntry]
    seeds: tuple[int, ...] = (0,)
    kind: str = "table"
    description: str = ""
    reference: str | None = None
    metrics: tuple[str, ...] = ("HR@10", "NDCG@10")
    split: str = "test"
    #: behaviors reported (``None``: the target); several give one column group per behavior
    behaviors: tuple[str | None, ...] = (None,)
    epochs: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config_dir: Path = Path("configs")
    noise: NoiseSpec | None = None
    sweep: SweepSpec | None = None
    #: run folders, relative to the experiment folder; two specs naming the same folder share
    #: identical runs (e.g. the full model of an ablation table and of a variants table)
    runs_dir: str = "runs"
    source: Path | None = None

    @property
    def behavior(self) -> str | None:
        return self.behaviors[0]

    def row_names(self) -> list[str]:
        return [m.name for m in self.models]


@dataclass
class RunPlan:
    """One run of an experiment: where it goes and its resolved configuration."""

    row: str
    dataset: str
    seed: int
    folder: Path
    cfg: RunConfig
    noise_ratio: float | None = None
    noise_behaviors: tuple[str, ...] | None = None
    noise_seed: int = 0
    point: dict[str, Any] = field(default_factory=dict)  # sweep values

    @property
    def label(self) -> str:
        extra = "" if self.noise_ratio is None else f" noise {self.noise_ratio:+.0%}"
        extra += "".join(f" {k}={v}" for k, v in self.point.items())
        return f"{self.row} on {self.dataset} seed {self.seed}{extra}"


# -- reading ---------------------------------------------------------------------------------
_TOP_KEYS = {"name", "kind", "description", "seeds", "reference", "metrics", "split", "behavior",
             "epochs", "set", "config_dir", "datasets", "models", "noise", "sweep", "runs_dir"}


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: seeds count must be >= 1, got {value}")
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: duplicate seeds {value}")
        return tuple(value)
    raise ConfigError(f"{where}: seeds must be a count or a non-empty list of integers, got {value!r}")


def _behaviors(value: Any, where: str) -> tuple[str | None, ...]:
    if value is None:
        return (None,)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(b, str) for b in value):
        return tuple(value)
    raise ConfigError(f"{where}: behavior must be a behavior name or a list of names, got {value!r}")


def _model_entry(item: Any, where: str) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(name=item, model=item)
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: a model entry is a name or a mapping, got {item!r}")
    check_keys(item, {"name", "model", "config", "set"}, where)
    model = item.get("model") or item.get("name")
    if not model:
        raise ConfigError(f"{where}: a model entry needs 'model' (or 'name'): {dict(item)!r}")
    config = item.get("config", None)
    if config is not None:
        config = str(config)
    return ModelEntry(name=str(item.get("name") or model), model=str(model), config=config,
                      overrides=nest(item.get("set"), f"{where}.set"))


def _dataset_entry(item: Any, where: str) -> DatasetEntry:
    if isinstance(item, str):
        return DatasetEntry(name=item, label=item)
    if not isinstance(item, Mapping) or "name" not in item:
        raise ConfigError(f"{where}: a dataset entry is a name or a mapping with 'name', got {item!r}")
    check_keys(item, {"name", "label", "data", "data_options"}, where)
    opts = item.get("data_options")
    if opts is not None and not isinstance(opts, Mapping):
        raise ConfigError(f"{where}.data_options must be a mapping, got {opts!r}")
    return DatasetEntry(name=str(item["name"]), label=str(item.get("label") or item["name"]),
                        data=None if item.get("data") is None else str(item["data"]),
                        data_options=None if opts is None else dict(opts))


def spec_from_dict(raw: Mapping[str, Any], source: Path | None = None) -> ExperimentSpec:
    where = str(source) if source else "experiment spec"
    check_keys(raw, _TOP_KEYS, where)
    for key in ("models", "datasets"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise ConfigError(f"{where}: '{key}' must be a non-empty list")
    kind = str(raw.get("kind", "table"))
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind {kind!r}; choose from {list(KINDS)}")
    models = [_model_entry(m, f"{where}: models[{i}]") for i, m in enumerate(raw["models"])]
    datasets = [_dataset_entry(d, f"{where}: datasets[{i}]") for i, d in enumerate(raw["datasets"])]
    for what, names in (("model", [m.name for m in models]), ("dataset", [d.name for d in datasets])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}: duplicate {what} name(s) {dup}; give each row a distinct 'name'")
    reference = raw.get("reference")
    if reference is not None and str(reference) not in [m.name for m in models]:
        raise ConfigError(f"{where}: reference {reference!r} is not a model row; rows: {[m.name for m in models]}")
    metrics = raw.get("metrics", ["HR@10", "NDCG@10"])
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in metrics:
        name, _, k = str(m).partition("@")
        if not k.isdigit():
            raise ConfigError(f"{where}: metric {m!r} must look like HR@10")
    split = str(raw.get("split", "test"))
    if split not in ("valid", "test"):
        raise ConfigError(f"{where}: split must be 'valid' or 'test', got {split!r}")
    epochs = raw.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise ConfigError(f"{where}: epochs (the cap) must be a positive integer, got {epochs!r}")
    config_dir = Path(str(raw.get("config_dir", "configs")))
    noise = sweep = None
    if kind == "noise":
        n = raw.get("noise") or {}
        if not isinstance(n, Mapping):
            raise ConfigError(f"{where}: noise must be a mapping")
        ratios = tuple(float(r) for r in n.get("ratios", DEFAULT_NOISE_RATIOS))
        if any(r < -1 for r in ratios):
            raise ConfigError(f"{where}: noise ratios must be >= -1 (remove at most 100%), got {ratios}")
        beh = n.get("behaviors")
        noise = NoiseSpec(ratios=ratios, behaviors=None if beh is None else tuple(beh),
                          seed_offset=int(n.get("seed_offset", 0)))
    if kind == "sweep":
        s = raw.get("sweep") or {}
        params = s.get("params") if isinstance(s, Mapping) else None
        if not isinstance(params, Mapping) or not 1 <= len(params) <= 2:
            raise ConfigError(f"{where}: sweep.params must map one or two dotted keys to value lists")
        sweep = SweepSpec(params={str(k): tuple(v if isinstance(v, list) else [v]) for k, v in params.items()})
    return ExperimentSpec(
        name=str(raw.get("name") or (source.stem if source else "experiment")),
        kind=kind,
        description=str(raw.get("description", "")),
        models=models,
        datasets=datasets,
        seeds=_seeds(raw.get("seeds", [0]), where),
        reference=None if reference is None else str(reference),
        metrics=tuple(str(m) for m in metrics),
        split=split,
        behaviors=_behaviors(raw.get("behavior"), where),
        runs_dir=str(raw.get("runs_dir", "runs")),
        epochs=epochs,
        overrides=nest(raw.get("set"), f"{where}: set"),
        config_dir=config_dir,
        noise=noise,
        sweep=sweep,
        source=source,
    )


def load_spec(path: str | Path) -> ExperimentSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment spec not found: {p}")
    return spec_from_dict(read_yaml(p), source=p)


# -- expansion -------------------------------------------------------------------------------
def _config_path(spec: ExperimentSpec, entry: ModelEntry, dataset: DatasetEntry) -> Path | None:
    if entry.config is not None and entry.config.lower() == "none":
        return None
    if entry.config is None or entry.config.lower() == "auto":
        rel = spec.config_dir / entry.model / f"{dataset.name}.yaml"
    else:
        rel = Path(entry.config.replace("{dataset}", dataset.name).replace("{model}", entry.model))
    candidates = [rel] if rel.is_absolute() else [Path.cwd() / rel]
    if spec.source is not None and not rel.is_absolute():
        candidates += [spec.source.parent / rel, spec.source.parent.parent / rel]
    for c in candidates:
        if c.is_file():
            return c
    if entry.config is not None and entry.config.lower() == "auto":
        return None
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(
        f"experiment {spec.name!r}: model row {entry.name!r} on dataset {dataset.name!r} needs the config "
        f"file {rel}, which does not exist (looked in: {looked}). Write it, point the row's 'config:' "
        "at another file, or set 'config: none' to run with the model's defaults"
    )


@functools.lru_cache(maxsize=256)
def _read_config_cached(path: str, mtime: float) -> str:
    return json.dumps(read_yaml(path))


def _read_config(path: Path) -> dict[str, Any]:
    """A config file's mapping, parsed once per (path, mtime): specs expand to hundreds of runs."""
    return json.loads(_read_config_cached(str(path.resolve()), path.stat().st_mtime))


def build_run_config(
    spec: ExperimentSpec,
    entry: ModelEntry,
    dataset: DatasetEntry,
    seed: int,
    extra: Mapping[str, Any] | None = None,
    epochs_cap: int | None = None,
    device: str | None = None,
) -> RunConfig:
    path = _config_path(spec, entry, dataset)
    file_raw = _read_config(path) if path else {}
    if file_raw.get("model") not in (None, entry.model):
        raise ConfigError(f"experiment {spec.name!r}, row {entry.name!r}: {path} is a config for model "
                          f"{file_raw['model']!r}, not {entry.model!r}")
    file_raw.pop("model", None)
    over: dict[str, Any] = deep_merge(spec.overrides, entry.overrides)
    over = deep_merge(over, dict(extra or {}))
    if dataset.data is not None:
        over["data"] = dataset.data
    elif not file_raw.get("data") and "data" not in over:
        over["data"] = dataset.name
    if dataset.data_options is not None:
        over["data_options"] = dict(dataset.data_options)
    over["seed"] = seed
    if device:
        over["device"] = device
    try:
        cfg = build_config(entry.model, None, overrides=deep_merge(file_raw, over))
    except MbrecError as e:
        raise ConfigError(f"experiment {spec.name!r}, row {entry.name!r} on {dataset.name!r}: {e}") from None
    cap = min(c for c in (spec.epochs, epochs_cap) if c is not None) if (spec.epochs or epochs_cap) else None
    if cap is not None and cfg.train.epochs > cap:
        cfg.train.epochs = cap
    return cfg


def _fmt_point(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def expand(
    spec: ExperimentSpec,
    out_dir: str | Path,
    *,
    epochs_cap: int | None = None,
    device: str | None = None,
    seeds: tuple[int, ...] | None = None,
) -> list[RunPlan]:
    """Every run of the experiment, in execution order (dataset, seed, then rows)."""
    out = Path(out_dir)
    plans: list[RunPlan] = []
    for ds in spec.datasets:
        for seed in seeds or spec.seeds:
            for entry in spec.models:
                base = Path(os.path.normpath(out / spec.runs_dir)) / safe_name(ds.name) / safe_name(entry.name)
                if spec.kind == "noise":
                    assert spec.noise is not None
                    for ratio in (0.0, *[r for r in spec.noise.ratios if r != 0.0]):
                        cfg = build_run_config(spec, entry, ds, seed, None, epochs_cap, device)
                        folder = base / f"noise{ratio:+.2f}" / f"seed{seed}"
                        plans.append(RunPlan(entry.name, ds.name, seed, folder, cfg, ratio,
                                             spec.noise.behaviors, seed + spec.noise.seed_offset))
                elif spec.kind == "sweep":
                    assert spec.sweep is not None
                    keys = list(spec.sweep.params)
                    for values in itertools.product(*spec.sweep.params.values()):
                        point = dict(zip(keys, values))
                        cfg = build_run_config(spec, entry, ds, seed, nest(point, "sweep"), epochs_cap, device)
                        tag = "_".join(f"{k.split('.')[-1]}={safe_name(_fmt_point(v))}" for k, v in point.items())
                        plans.append(RunPlan(entry.name, ds.name, seed, base / tag / f"seed{seed}", cfg, point=point))
                else:
                    cfg = build_run_config(spec, entry, ds, seed, None, epochs_cap, device)
                    plans.append(RunPlan(entry.name, ds.name, seed, base / f"seed{seed}", cfg))
    return plans


def select_rows(spec: ExperimentSpec, names: list[str]) -> ExperimentSpec:
    """The spec restricted to the model rows ``names`` (in the spec's order), for running part of a
    table in one process and the rest in another. The run folders do not depend on which rows are
    selected, so a later run of the whole spec reuses these runs. The reference row is kept only
    when it is selected (its t-test marks need it)."""
    known = [m.name for m in spec.models]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"experiment {spec.name!r}: no model row named {unknown or names!r}; rows: {known}")
    models = [m for m in spec.models if m.name in names]
    return replace(spec, models=models, reference=spec.reference if spec.reference in names else None)


def select_datasets(spec: ExperimentSpec, names: list[str]) -> ExperimentSpec:
    """The spec restricted to the dataset columns ``names`` (in the spec's order): the cheap
    datasets of a table first, the expensive ones in another process or later. As with
    :func:`select_rows`, the run folders do not change, so the whole spec reuses these runs."""
    known = [d.name for d in spec.datasets]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"experiment {spec.name!r}: no dataset named {unknown or names!r}; datasets: {known}")
    return replace(spec, datasets=[d for d in spec.datasets if d.name in names])


def default_out_dir(spec: ExperimentSpec) -> Path:
    return Path("runs") / "experiments" / safe_name(spec.name)


__all__ = [
    "DatasetEntry", "ExperimentSpec", "ModelEntry", "NoiseSpec", "RunPlan", "SweepSpec",
    "build_run_config", "default_out_dir", "expand", "load_spec", "nest", "safe_name", "select_datasets",
    "select_rows",
    "spec_from_dict",
]
