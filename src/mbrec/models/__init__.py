"""Models. Each lives in its own module and registers itself; see :mod:`mbrec.models.base`."""

from mbrec.models.base import Model, ModelConfig, available_models, get_model_class, register

__all__ = ["Model", "ModelConfig", "available_models", "get_model_class", "register"]
