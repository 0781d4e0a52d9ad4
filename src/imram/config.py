"""Typed configuration: the model (design §encoders to §matching), training (§loss, §mining),
data and precision, loaded from presets and YAML files with ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from imram.errors import ConfigError
from imram.schema import (
    AGGREGATORS,
    ATTENTION_NORMS,
    ATTENTION_SIMS,
    BRANCHES,
    MEMBER_BANKS,
    MEMBER_POOLS,
    POOLINGS,
    TEXT_POOLS,
    WORD_VECTORS,
    ModelConfig,
)

__all__ = [
    "AGGREGATORS",
    "ATTENTION_NORMS",
    "ATTENTION_SIMS",
    "BRANCHES",
    "MEMBER_BANKS",
    "MEMBER_POOLS",
    "LOSSES",
    "LR_SCHEDULES",
    "MINING",
    "POOLINGS",
    "PRECISIONS",
    "TEXT_POOLS",
    "WORD_VECTORS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "list_presets",
    "load_config",
    "parse_override",
    "save_config",
]

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
MINING = ("exact", "shortlist", "off")
LR_SCHEDULES = ("step", "cosine")
LOSSES = ("hinge", "infonce")


@dataclass
class TrainConfig:
    """Optimisation (design §loss): Adam with step decay, hinge loss, validation and budgets."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    # A fine-tuned pretrained text encoder's learning rate (model.text_encoder other than gru,
    # model.freeze_text false): pretrained weights move less than new ones; decays with lr.
    text_lr: float = 2e-5
    # A tuned image tower's learning rate (model.image_tower: tuned): pretrained convolutions,
    # in their own group; decays with lr.
    tower_lr: float = 1e-4
    lr_decay_epochs: int = 15
    lr_decay: float = 0.1
    # ``step``: lr × lr_decay every lr_decay_epochs (the papers'); ``cosine``: lr × (1 +
    # cos(π · epoch / epochs)) / 2, set at each epoch's start.
    lr_schedule: str = "step"
    # Decoupled weight decay (AdamW's) on every trained weight; 0 is the papers' Adam.
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    margin: float = 0.2
    hardest_negative: bool = True
    # ``hinge`` (the papers': margin, hardest negatives, the warm-up) or ``infonce``: the
    # cross-entropy of each query's softmax over the batch at ``temperature`` (every pair in
    # autograd: train.mining off).
    loss: str = "hinge"
    temperature: float = 0.05
    # With hardest negatives: ``exact`` scores the batch without autograd, picks each query's
    # hardest negative and re-scores only those 3·B pairs with autograd (the same loss and
    # gradients); ``shortlist`` scores fully only each query's ``mining_shortlist`` best
    # candidates by the step-1 score (exact whenever the hardest negative is among them; K=1
    # models mine exactly); ``off`` keeps every pair in autograd.
    mining: str = "exact"
    mining_shortlist: int = 4
    warmup_epochs: int = 0
    # The warm-up's loss: 0 sums every negative's violation with every pair in autograd; m > 0
    # charges each query's m hardest negatives through the mined step ((2m + 1)·B pairs in
    # autograd), unless train.mining is off.
    warmup_negatives: int = 0
    val_every: int = 0
    # Validate a cross-attention model by re-ranking this trained embedding run's (a run folder
    # means its best/) top val_shortlist per query over the data.val_captions captions: the
    # ranking a two-stage search serves (training/validation.py); "" scores every pair.
    val_rerank: str = ""
    val_shortlist: int = 30
    # Early stopping: end the run after this many validations in a row without a better rsum
    # (best/ keeps the best one); 0 trains every epoch.
    patience: int = 0
    log_every: int = 10
    seed: int = 0
    max_minutes: float = 0.0
    score_budget_mb: float = 1024.0
    # Recompute each scoring block in the backward pass instead of keeping its intermediates:
    # training memory stays near one block of score_budget_mb at any batch size.
    activation_checkpointing: bool = False
    # Fault tolerance: also checkpoint last/ every N iterations (0: at epoch ends and
    # validations only); stop after this many non-finite steps in a row (each is skipped).
    checkpoint_every: int = 0
    max_nonfinite_steps: int = 5
    # Start from the trained weights of another run (a run folder means its best/) wherever
    # names match (another shape is refused), e.g. a cross-attention model's fragment encoders
    # from an embedding model's (training/warm_start.py); ignored on resume.
    init_from: str = ""
    # A trained cross-attention checkpoint whose batch scores an embedding model learns beside
    # the hinge loss (training/distill.py): KL of row and column softmaxes at this temperature.
    distill_from: str = ""
    distill_weight: float = 1.0
    distill_temperature: float = 0.05

    def lr_factor(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (0-based) as a multiple of ``lr``."""
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.lr_decay ** (epoch // self.lr_decay_epochs)

    def validate(self) -> None:
        counts = ("epochs", "batch_size", "lr_decay_epochs", "log_every", "max_nonfinite_steps")
        for key in (*counts, "mining_shortlist", "val_shortlist"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be >= 1")
        for key in (
            "warmup_epochs",
            "warmup_negatives",
            "val_every",
            "patience",
            "max_minutes",
            "checkpoint_every",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be >= 0")
        if self.distill_weight < 0:
            raise ConfigError(f"train.distill_weight={self.distill_weight!r} must be >= 0")
        if self.distill_from and self.mining != "off":
            raise ConfigError(
                "train.distill_from needs train.mining: off (the teacher's ranking is learned "
                "over the whole batch's scores)"
            )
        for key in ("lr", "text_lr", "tower_lr", "score_budget_mb", "distill_temperature"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be > 0")
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss={self.loss!r} must be one of {', '.join(LOSSES)}")
        if self.loss == "infonce" and self.mining != "off":
            raise ConfigError("train.loss: infonce scores every pair; set train.mining: off")
        if not self.temperature > 0:
            raise ConfigError(f"train.temperature={self.temperature!r} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay!r} must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"train.lr_schedule={self.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}"
            )
        if self.mining not in MINING:
            raise ConfigError(f"train.mining={self.mining!r} must be one of {', '.join(MINING)}")


@dataclass
class DataConfig:
    """Which splits to read and how the vocabulary is built: train and dev words seen
    ``vocab_threshold`` times, plus GloVe's ``vocab_glove_top`` most frequent words."""

    train_split: str = "train"
    val_split: str = "dev"
    val_captions: int = 5000
    vocab_threshold: int = 4
    vocab_glove_top: int = 0

    def validate(self) -> None:
        if self.val_captions < 1 or self.vocab_threshold < 1:
            raise ConfigError("data.val_captions and data.vocab_threshold must be >= 1")
        if self.vocab_glove_top < 0:
            raise ConfigError(f"data.vocab_glove_top={self.vocab_glove_top!r} must be >= 0")


@dataclass
class Config:
    """The whole run: ``model``, ``train``, ``data`` and the numeric ``precision``."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    precision: str = "fp32"

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        """Build from a nested mapping; the model section is resolved through the registry."""
        from imram.models.registry import model_config

        if not isinstance(values, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections, got {type(values).__name__}"
            )
        sections = {"model", "train", "data", "precision"}
        unknown = sorted(set(values) - sections)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid: "
                + ", ".join(sorted(sections))
            )
        model_values = dict(values.get("model") or {})
        name = model_values.pop("name", "imram_full")
        try:
            config = cls(
                model=model_config(name, **model_values),
                train=_section(TrainConfig, values.get("train"), "train"),
                data=_section(DataConfig, values.get("data"), "data"),
                precision=values.get("precision", "fp32"),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        config.validate()
        return config


def _section(cls: type, values: Any, name: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; valid: "
            + ", ".join(f"{name}.{k}" for k in sorted(known))
        )
    for f in dataclasses.fields(cls):
        if f.name in values:
            values[f.name] = _coerce(values[f.name], type(f.default), f"{name}.{f.name}")
    return cls(**values)


def _coerce(value: Any, kind: type, key: str) -> Any:
    """Check a scalar against its field's type; YAML's ``2e-4`` (a string) becomes a float,
    and its ``off``/``on`` (booleans) become those words where a string is expected."""
    if kind is str and isinstance(value, bool):
        return "on" if value else "off"
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, bool, str) and (
        not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}={value!r} must be of type {kind.__name__}")
    return value


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in ``imram/presets``."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("imram.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from None
    return values or {}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as a YAML scalar)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.steps=1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _with_base(values: dict[str, Any], source: str, seen: list[str]) -> dict[str, Any]:
    """``values`` over the preset its ``base:`` names (recursively, section by section), so
    that a variant states only what differs from the preset it extends."""
    base = values.pop("base", None)
    if base is None:
        return values
    if base not in list_presets():
        raise ConfigError(f"{source}: base {base!r} is not a preset")
    if base in seen:
        raise ConfigError(f"{source}: presets extend each other in a cycle ({base})")
    from importlib.resources import files

    text = files("imram.presets").joinpath(f"{base}.yaml").read_text("utf-8")
    merged = _with_base(_read_yaml(text, f"preset {base}"), f"preset {base}", [*seen, base])
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(preset_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML file, then ``--set`` overrides in order, validated."""
    from importlib.resources import files
    from pathlib import Path

    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        source = str(path)
        values = _read_yaml(path.read_text(encoding="utf-8"), source)
    else:
        if preset_or_path not in list_presets():
            raise ConfigError(
                f"unknown preset {preset_or_path!r}; presets: {', '.join(list_presets())}"
            )
        source = f"preset {preset_or_path}"
        text = files("imram.presets").joinpath(f"{preset_or_path}.yaml").read_text("utf-8")
        values = _read_yaml(text, source)
    values = _with_base(values, source, [])
    for item in overrides or []:
        keys, value = parse_override(item)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key} is not a section")
        node[keys[-1]] = value
    return Config.from_dict(values, source)


def save_config(config: Config, path: Any) -> None:
    """Write the resolved config as YAML (atomically), loadable by :func:`load_config`."""
    import yaml

    from imram.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
