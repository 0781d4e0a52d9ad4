"""Name → constructor registry: adding a model is one new file and one ``register_model`` line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from imram.errors import ConfigError
from imram.schema import ModelConfig


@dataclass(frozen=True)
class _Entry:
    constructor: Callable[[ModelConfig], nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, constructor: Callable[[ModelConfig], nn.Module], **defaults: Any
) -> None:
    """Register ``constructor`` as ``name``; ``defaults`` are where it departs from ModelConfig."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = _Entry(constructor, dict(defaults))


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The resolved config of a registered model: ModelConfig ← registry defaults ← overrides."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    overrides.pop("name", None)
    return ModelConfig.from_dict({**_REGISTRY[name].defaults, **overrides, "name": name})


def build_model(name: str | ModelConfig, **overrides: Any) -> nn.Module:
    """Build a model by registry name (with keyword overrides) or from a full ModelConfig."""
    if isinstance(name, ModelConfig):
        config = ModelConfig.from_dict({**name.to_dict(), **overrides})
    else:
        config = model_config(name, **overrides)
    if config.name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {config.name!r}; registered models: {', '.join(list_models())}"
        )
    return _REGISTRY[config.name].constructor(config)
