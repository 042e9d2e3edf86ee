"""The model contract: checks every registered model passes, plus the example model.

Parametrized over :func:`mbrec.models.base.available_models` (every built-in model, and anything
registered when the tests are collected) and over the example models in ``examples/``
(``EXAMPLES``). Each runs on the built-in ``synthetic`` data with ``configs/<model>/synthetic.yaml``
when it exists, for one or two epochs, evaluating every epoch:

* one epoch trains and reports finite loss terms and metrics;
* the same seed gives identical losses and metrics (and another seed different ones);
* 2 epochs in one go equal 1 epoch then ``mbrec train --resume --epochs 2``;
* ``mbrec recommend`` never returns an item the protocol masks, for every scored behavior;
* bad option values are :class:`~mbrec.errors.MbrecError` (``mbrec`` exits with 2): every
  ``choices`` option of the model's config set to a bogus value, and ``embedding_dim=0``.

A new model gets all of this by being registered: built-in models by their entry in
``BUILTIN_MODELS``, models outside the package by adding their file to ``EXAMPLES``. See
docs/adding-a-model.md.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from mbrec.cli.main import main
from mbrec.config import build_config
from mbrec.errors import MbrecError
from mbrec.evaluate import mask_for
from mbrec.models import base
from mbrec.rundir import load_run
from mbrec.train import train

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "adding-a-model.md"
#: example models outside the package: registered name -> file
EXAMPLES: dict[str, Path] = {"bprmf": REPO / "examples" / "bprmf.py"}

BUILTIN = base.available_models()  # at collection, before any example registers itself
MODELS = BUILTIN + [m for m in EXAMPLES if m not in BUILTIN]
SEED = 7
BOGUS = "__bogus__"


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def example_models():
    """Import the example models for this module only (other test modules see the registry
    without them)."""
    added = []
    for name, path in EXAMPLES.items():
        if name in base._REGISTRY:
            continue
        spec = importlib.util.spec_from_file_location(f"_mbrec_example_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
        assert name in base._REGISTRY, f"{path} does not register a model named {name!r}"
        added.append(name)
    yield
    for name in added:
        base._REGISTRY.pop(name, None)
        sys.modules.pop(f"_mbrec_example_{name}", None)


def config_file(model: str) -> Path | None:
    f = REPO / "configs" / model / "synthetic.yaml"
    return f if f.is_file() else None


def make_config(model: str, *extra: str, epochs: int = 1, seed: int = SEED):
    """The model's synthetic config, evaluated after every epoch."""
    return build_config(model, "synthetic", config_file=config_file(model), overrides=[
        f"train.epochs={epochs}", "train.eval_start=1", "train.eval_every=1", f"seed={seed}", *extra])


class Runs:
    """Training runs shared by the tests of one model, each trained once, when first needed."""

    def __init__(self, model: str, root: Path) -> None:
        self.model, self.root = model, root
        self._done: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any]:
        if key not in self._done:
            self._done[key] = getattr(self, "_" + key)()
        return self._done[key]

    def folder(self, key: str) -> Path:
        self.get(key)
        return self.root / key

    def _one(self) -> dict[str, Any]:
        return train(make_config(self.model), self.root / "one", quiet=True)

    def _again(self) -> dict[str, Any]:
        return train(make_config(self.model), self.root / "again", quiet=True)

    def _other_seed(self) -> dict[str, Any]:
        return train(make_config(self.model, seed=SEED + 1), self.root / "other_seed", quiet=True)

    def _two(self) -> dict[str, Any]:
        return train(make_config(self.model, epochs=2), self.root / "two", quiet=True)

    def _resumed(self) -> dict[str, Any]:
        """1 epoch, then the command line's ``--resume --epochs 2`` on the same folder."""
        out = self.root / "resumed"
        train(make_config(self.model, epochs=1), out, quiet=True)
        code = main(["train", self.model, "synthetic", "--out", str(out), "--resume", "--epochs", "2", "--quiet"])
        assert code == 0
        return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, Runs] = {}

    def get(model: str) -> Runs:
        if model not in cache:
            cache[model] = Runs(model, tmp_path_factory.mktemp(f"contract-{model}"))
        return cache[model]

    return get


def loss_terms(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "valid", "test")} for h in history]


def eval_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: h[k] for k in ("epoch", "valid", "test") if k in h} for h in history]


def all_numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in all_numbers(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in all_numbers(v)]
    return [float(obj)]


def choice_fields(model: str) -> list[str]:
    cls = base.get_model_class(model).config_class
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("choices") is not None]


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("model", MODELS)
def test_trains_one_epoch_with_finite_losses_and_metrics(model, runs):
    m = runs(model).get("one")
    assert m["epochs_run"] == 1
    trained = [h for h in m["history"] if h["epoch"] == 1]
    assert len(trained) == 1, m["history"]
    terms = loss_terms(trained)[0]
    terms.pop("epoch")
    assert "loss" in terms, f"loss() must return a 'loss' term, got {sorted(terms)}"
    assert all(math.isfinite(v) for v in terms.values()), terms
    target = m["target"]
    for split in ("valid", "test"):
        assert target in m[split], f"no {split} metrics for the target {target!r}: {m[split]}"
        values = all_numbers(m[split])
        assert values and all(math.isfinite(v) and v >= 0 for v in values), m[split]
    assert "valid" in trained[0], "epoch 1 was not evaluated"


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_same_numbers(model, runs):
    a, b = runs(model).get("one"), runs(model).get("again")
    # equal up to float summation order: with several torch threads, reductions may add in
    # another order from run to run (last-bit differences); one thread gives identical bits
    for x, y in ((loss_terms(a["history"]), loss_terms(b["history"])),
                 (eval_history(a["history"]), eval_history(b["history"])), (a["valid"], b["valid"]), (a["test"], b["test"])):
        assert all_numbers(x) == pytest.approx(all_numbers(y), rel=1e-6, abs=1e-9)
    assert [sorted(t) for t in loss_terms(a["history"])] == [sorted(t) for t in loss_terms(b["history"])]
    assert a["best_epoch"] == b["best_epoch"]
    other = runs(model).get("other_seed")
    assert loss_terms(other["history"]) != loss_terms(a["history"]), "another seed gave the same losses"


@pytest.mark.parametrize("model", MODELS)
def test_resume_equals_uninterrupted_run(model, runs):
    full, resumed = runs(model).get("two"), runs(model).get("resumed")
    assert resumed["epochs_run"] == full["epochs_run"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [h["epoch"] for h in full["history"]]
    for got, want in zip(loss_terms(resumed["history"]), loss_terms(full["history"])):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    for got, want in zip(eval_history(resumed["history"]), eval_history(full["history"])):
        assert sorted(got) == sorted(want)
        assert all_numbers(got) == pytest.approx(all_numbers(want), rel=1e-6, abs=1e-9)
    assert resumed["best_epoch"] == full["best_epoch"]
    assert all_numbers(resumed["test"]) == pytest.approx(all_numbers(full["test"]), rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------- recommend
@pytest.mark.parametrize("model", MODELS)
def test_recommend_never_returns_masked_items(model, runs, tmp_path):
    run = runs(model).folder("two")
    cfg, data, net, _ = load_run(run)
    k = 50
    user_index = {str(u): n for n, u in enumerate(data.user_ids)}
    item_index = {str(i): n for n, i in enumerate(data.item_ids)}
    assert net.scored_behaviors, "scored_behaviors is empty"
    for behavior in net.scored_behaviors:
        out = tmp_path / f"{behavior}.csv"
        assert main(["recommend", str(run), "--users", "all", "--k", str(k), "--behavior", behavior,
                     "--out", str(out)]) == 0
        with out.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        mask = mask_for(data, cfg.protocol, behavior)
        per_user: dict[int, list[int]] = {}
        for r in rows:
            assert r["behavior"] == behavior
            per_user.setdefault(user_index[r["user"]], []).append(item_index[r["item"]])
        assert len(per_user) == data.n_users
        for u, items in per_user.items():
            masked = set() if mask is None else set(mask.indices[mask.indptr[u]:mask.indptr[u + 1]].tolist())
            assert not masked & set(items), f"{behavior}: user {data.user_ids[u]} got masked items {sorted(masked & set(items))}"
            assert len(items) == len(set(items)) == min(k, data.n_items - len(masked))


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("model", MODELS)
def test_bogus_choices_are_config_errors(model):
    """Every option declared with ``choices`` rejects a value outside them, from YAML/--set and
    from a config built in Python."""
    from mbrec.data.registry import load_dataset

    names = choice_fields(model)
    if not names:
        pytest.skip(f"{model}'s config declares no option(..., choices=...)")
    cfg = make_config(model)
    data = load_dataset("synthetic", seed=SEED)
    cls = base.get_model_class(model)
    for name in names:
        with pytest.raises(MbrecError, match=re.escape(name)):
            make_config(model, f"model_args.{name}={BOGUS}")
        with pytest.raises(MbrecError, match=re.escape(name)):
            cls(data, dataclasses.replace(cfg.model_args, **{name: BOGUS}))


@pytest.mark.parametrize("model", MODELS)
def test_embedding_dim_zero_is_a_config_error(model):
    with pytest.raises(MbrecError, match="embedding_dim"):
        make_config(model, "model_args.embedding_dim=0")


@pytest.mark.parametrize("model", MODELS)
def test_cli_bad_option_exits_with_2(model, tmp_path, capsys):
    cases = [("embedding_dim", "0"), ("embedding_dim", "bogus")] + [(n, BOGUS) for n in choice_fields(model)]
    cfg_args = ["--config", str(config_file(model))] if config_file(model) else []
    for n, (name, value) in enumerate(cases):
        out = tmp_path / f"run{n}"
        code = main(["train", model, "synthetic", *cfg_args, "--set", f"model_args.{name}={value}",
                     "--epochs", "1", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, f"model_args.{name}={value}: exit code {code}"
        assert "error" in err and name in err, err
        assert not out.exists(), f"model_args.{name}={value}: a run folder was created before the error"


# ----------------------------------------------------------------------------- the guide
def test_guide_embeds_the_example_verbatim():
    """docs/adding-a-model.md shows examples/bprmf.py between two markers; they must not drift."""
    text = DOC.read_text()
    found = re.search(r"<!-- begin examples/bprmf.py -->\n```python\n(.*?)```\n<!-- end examples/bprmf.py -->",
                      text, re.S)
    assert found, "the markers around the example's code block are missing"
    assert found.group(1) == EXAMPLES["bprmf"].read_text(), (
        "the guide's copy of examples/bprmf.py differs from the file; paste the file into the guide")


def test_guide_links_exist():
    text = DOC.read_text()
    links = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert links
    missing = [t for t in links if not (DOC.parent / t).exists()]
    assert not missing, f"broken links in {DOC.name}: {missing}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
