"""The model interface every mbrec model implements, and the model registry.

A model is an ``nn.Module`` that never owns its graph: the trainer asks it once for its
graphs (``build_graphs``), keeps them on the device, and passes them to every call::

    graphs = model.build_graphs(data, device)          # once per run
    sampler = model.make_sampler(data)                 # once per run
    for batch in sampler.epoch(rng):                   # dict of numpy arrays
        terms = model.loss(graphs, to_device(batch))   # {"loss": total, "bpr": ..., ...}
    emb = model(graphs)                                # once per evaluation
    scores = model.score(emb, users, behavior)         # [len(users), n_items]

Hyperparameters are a dataclass (``config_class``) filled from YAML and ``--set`` overrides.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from mbrec.data.container import MultiBehaviorData
from mbrec.errors import UnknownNameError
from mbrec.options import check_options, option

Batch = Mapping[str, np.ndarray]


@dataclass
class ModelConfig:
    """Fields every model has; subclasses add their own."""

    embedding_dim: int = option(64, min=1, doc="embedding size d")


class Sampler(Protocol):
    """Yields the batches of one epoch as dicts of numpy arrays."""

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]: ...


class Model(nn.Module):
    """Base class. Subclasses set ``name``, ``config_class`` and implement the five methods."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    #: TrainConfig fields this model's official code uses by default (lr, weight_decay, ...).
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: appended to the trainer's warning when a pairwise loss term sits at ln 2 (what to do about it)
    ln2_hint: ClassVar[str] = ""
    #: one-line description for ``mbrec models``.
    summary: ClassVar[str] = ""

    def __init__(self, data: MultiBehaviorData, config: ModelConfig) -> None:
        super().__init__()
        check_options(config, "model_args")
        self.config = config
        self.n_users = data.n_users
        self.n_items = data.n_items
        self.behaviors: tuple[str, ...] = data.behaviors
        self.target: str = data.target

    # -- graphs, sampling, loss -------------------------------------------------
    def build_graphs(self, data: MultiBehaviorData, device: torch.device) -> Any:
        """Build every graph the model needs, once, on ``device``."""
        raise NotImplementedError

    def make_sampler(self, data: MultiBehaviorData) -> Sampler:
        """The training sampler (built once; ``epoch(rng)`` yields batches)."""
        raise NotImplementedError

    def loss(self, graphs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss terms; ``"loss"`` is the total that is minimized."""
        raise NotImplementedError

    # -- inference --------------------------------------------------------------
    def forward(self, graphs: Any) -> Any:  # type: ignore[override]
        """Final embeddings (any structure ``score`` understands)."""
        raise NotImplementedError

    def score(self, emb: Any, users: torch.Tensor, behavior: str) -> torch.Tensor:
        """Scores ``[len(users), n_items]`` of ``users`` for ``behavior``."""
        raise NotImplementedError

    def embed(self, graphs: Any, behaviors: tuple[str, ...] | None = None) -> Any:
        """What ``score`` needs for ``behaviors`` (default: all it scores). Models whose final
        embeddings differ per task override it to build only the evaluated tasks' parts."""
        return self(graphs)

    def floor_products(self, graphs: Any, batch: Mapping[str, torch.Tensor]) -> list[Any]:
        """The large products one training step on ``batch`` requires (``mbrec.bench``'s
        ``SparseProduct``/``DenseProduct``): what the algorithm needs, counting only output rows
        the loss reads (give a sparse product the batch's row indices, not only their count: their
        degrees decide its cost). ``mbrec bench`` times them with the fastest kernel to give the
        step's floor. Models that do not declare them report no floor."""
        return []

    @property
    def scored_behaviors(self) -> tuple[str, ...]:
        """Behaviors this model ranks for. Target-only models return ``(target,)``."""
        return (self.target,)

    # -- optional hooks ---------------------------------------------------------
    def on_train_start(
        self, data: MultiBehaviorData, graphs: Any, device: torch.device, log: Callable[[str], None] | None = None
    ) -> None:
        """Called once before the first epoch (e.g. pretraining); ``log`` writes to the run's log."""

    def check_behavior(self, behavior: str) -> None:
        if behavior not in self.scored_behaviors:
            raise UnknownNameError(
                f"model {self.name!r} does not predict behavior {behavior!r}; it predicts "
                f"{list(self.scored_behaviors)}"
            )


# ----------------------------------------------------------------------------- registry
#: name -> module holding it. Modules register themselves on import via ``@register``.
BUILTIN_MODELS: dict[str, str] = {
    "lightgcn": "mbrec.models.lightgcn",
    "rmbrec": "mbrec.models.rmbrec",
    "copf": "mbrec.models.copf",
    "bigel": "mbrec.models.bigel",
    "mbcgcn": "mbrec.models.mbcgcn",
    "crgcn": "mbrec.models.crgcn",
    "pkef": "mbrec.models.pkef",
}

_REGISTRY: dict[str, type[Model]] = {}


def register(name: str):  # type: ignore[no-untyped-def]
    """Class decorator: ``@register("lightgcn")``."""

    def deco(cls: type[Model]) -> type[Model]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_models() -> list[str]:
    """Names of the models that import on this installation."""
    names = []
    for name, module in BUILTIN_MODELS.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        names.append(name)
    return names + sorted(set(_REGISTRY) - set(BUILTIN_MODELS))


def get_model_class(name: str) -> type[Model]:
    if name not in _REGISTRY and name in BUILTIN_MODELS:
        try:
            importlib.import_module(BUILTIN_MODELS[name])
        except ModuleNotFoundError as e:
            if e.name != BUILTIN_MODELS[name]:
                raise
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[name]
