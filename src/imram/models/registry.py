"""Name → model class registry: adding a model is one new file that defines a
:class:`~imram.models.interface.RetrievalModel` and registers its names beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imram.errors import ConfigError
from imram.models.interface import CrossAttentionModel, EmbeddingModel, RetrievalModel
from imram.schema import ModelConfig


@dataclass(frozen=True)
class _Entry:
    constructor: type[RetrievalModel]
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, constructor: type[RetrievalModel], **defaults: Any) -> None:
    """Register the model class ``constructor`` as ``name``; ``defaults`` are where it departs
    from ModelConfig. The class must be an embedding or a cross-attention model, since the
    scorer, the trainer and the index dispatch on those two kinds."""
    kinds = (EmbeddingModel, CrossAttentionModel)
    if not (isinstance(constructor, type) and issubclass(constructor, kinds)):
        raise TypeError(
            f"model {name!r}: {constructor!r} is neither an EmbeddingModel nor a "
            "CrossAttentionModel (imram.models.interface)"
        )
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = _Entry(constructor, dict(defaults))


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_class(name: str) -> type[RetrievalModel]:
    """The class registered as ``name`` (``issubclass`` tells its kind without building it)."""
    return _entry(name).constructor


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The resolved config of a registered model: ModelConfig ← registry defaults ← overrides."""
    defaults = _entry(name).defaults
    overrides.pop("name", None)
    return ModelConfig.from_dict({**defaults, **overrides, "name": name})


def build_model(name: str | ModelConfig, **overrides: Any) -> RetrievalModel:
    """Build a model by registry name (with keyword overrides) or from a full ModelConfig."""
    if isinstance(name, ModelConfig):
        config = ModelConfig.from_dict({**name.to_dict(), **overrides})
    else:
        config = model_config(name, **overrides)
    return _entry(config.name).constructor(config)
