"""The model's typed configuration (design §encoders to §matching) and its choices: the schema
that the models, the registry and every config section above them share. It imports no model,
so the registry and the models can depend on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from imram.errors import ConfigError

BRANCHES = ("full", "text", "image")
ATTENTION_NORMS = ("clipped_l2norm", "relu_l2norm")
ATTENTION_SIMS = ("dot", "cosine")
AGGREGATORS = ("ours", "add", "mlp", "att", "gate")
POOLINGS = ("avg", "lse")
TEXT_POOLS = ("last", "mean")
WORD_VECTORS = ("", "glove-6b-50d")
TEXT_ENCODERS = ("gru", "minilm")
MEMBER_BANKS = ("queue", "learned", "kmeans")
MEMBER_FUSIONS = ("residual", "fragments")
MEMBER_MEMORIES = ("relative", "centered", "raw")
MEMBER_POOLS = ("mean", "attention")
IMAGE_TOWERS = ("frozen", "tuned")


@dataclass
class ModelConfig:
    """Everything that fixes a model's parameters and its score.

    Defaults follow the published IMRAM runs (design §encoders to §matching); registry
    entries override a few (e.g. SCAN i-t uses ``lambda_softmax=4``).
    """

    name: str = "imram_full"
    vocab_size: int = 10000
    word_dim: int = 300
    img_dim: int = 2048
    embed_dim: int = 1024
    gru_layers: int = 1
    # A residual two-layer MLP beside each fragment projection (regions; word pieces of a
    # pretrained text encoder), its output layer zero at the start, so a fresh model projects
    # as the linear map alone: the frozen features' only non-linear trainable part.
    fragment_mlp: bool = False
    # Dropout on the features a fragment projection reads (regions; a pretrained text encoder's
    # states) while training: a share of every fragment's input left out, a regulariser.
    feature_dropout: float = 0.0
    # Caption encoder: "gru" (a Bi-GRU over word embeddings, the papers') or "minilm" (the
    # pretrained all-MiniLM-L6-v2 over word pieces); freeze_text keeps the pretrained
    # transformer fixed (its states cached per caption) instead of fine-tuning it.
    text_encoder: str = "gru"
    freeze_text: bool = True
    # With a frozen pretrained text encoder: its last N layers train (from their pretrained
    # weights, at train.text_lr) over the cached states of the layers below.
    text_tuned_layers: int = 0
    # The image side's input: "frozen" reads the prepared region grid; "tuned" trains the
    # backbone's last tower_stages stages and head (from tower_backbone's installed ImageNet
    # weights; that backbone must have made the data) over the cached trunk output below them
    # (imram prepare folder --tower-stages N), at train.tower_lr.
    image_tower: str = "frozen"
    tower_stages: int = 2
    tower_backbone: str = "efficientnet_lite0"
    # Word embeddings: "" (random) or "glove-6b-50d" (needs word_dim 50); frozen or trained.
    word_vectors: str = ""
    freeze_words: bool = False
    # Cross-attention models (IMRAM, SCAN).
    branch: str = "full"
    steps: int = 3
    lambda_softmax: float = 9.0
    lambda_image: float | None = None
    attn_norm: str = "clipped_l2norm"
    attn_sim: str = "dot"
    aggregator: str = "ours"
    renorm: bool = False
    pooling: str = "avg"
    lambda_lse: float = 6.0
    # Embedding models (VSE++).
    text_pool: str = "last"
    # MEMBER: fragments per memory bank, how a bank is filled, how fragments are pooled; its
    # attention takes λ from lambda_softmax (words) and image_lambda (regions).
    member_bank_size: int = 2048
    member_bank: str = "queue"
    member_pool: str = "mean"
    # How the bank enters the embedding: "residual" adds a gated memory vector to VSE++'s own
    # (the gate starts closed: a fresh MEMBER scores as VSE++ with the same weights);
    # "fragments" fuses every fragment with its attended slots, then pools.
    member_fusion: str = "residual"
    # How the recalled memory m enters a residual: "relative" adds g ⊙ ‖v‖·m/‖m‖, so a gate value
    # is the memory's share of the vector v's length; "centered" does the same with m minus the
    # bank's mean slot (what uniform attention would recall, the same for every item); "raw"
    # adds g ⊙ m as recalled (‖m‖ is ~1 % of ‖v‖ with diffuse attention).
    member_memory: str = "relative"
    # The residual gates are this scale times their parameters: under Adam, which moves a
    # parameter by about lr a step whatever its gradient's size, the gates then open this many
    # times faster than the other weights move.
    member_gate_scale: float = 1.0
    # kmeans banks: each centroid moves to ema·centroid + (1−ema)·mean of its new fragments.
    member_ema: float = 0.99

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        choices = {
            "branch": BRANCHES,
            "attn_norm": ATTENTION_NORMS,
            "attn_sim": ATTENTION_SIMS,
            "aggregator": AGGREGATORS,
            "pooling": POOLINGS,
            "text_pool": TEXT_POOLS,
            "member_bank": MEMBER_BANKS,
            "member_pool": MEMBER_POOLS,
            "member_fusion": MEMBER_FUSIONS,
            "member_memory": MEMBER_MEMORIES,
            "text_encoder": TEXT_ENCODERS,
            "image_tower": IMAGE_TOWERS,
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"model.{key}={value!r} is not one of {', '.join(allowed)}")
        positive = (
            "vocab_size",
            "word_dim",
            "img_dim",
            "embed_dim",
            "gru_layers",
            "steps",
            "member_bank_size",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}={value!r} must be a positive integer")
        for key in ("lambda_softmax", "lambda_lse"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} must be > 0")
        if self.word_vectors not in WORD_VECTORS:
            raise ConfigError(
                f"model.word_vectors={self.word_vectors!r} is not one of "
                + ", ".join(repr(w) for w in WORD_VECTORS)
            )
        if self.word_vectors and self.text_encoder != "gru":
            raise ConfigError(
                f"model.word_vectors={self.word_vectors} feeds the GRU's word embeddings; "
                f"model.text_encoder={self.text_encoder} reads word pieces (set word_vectors '')"
            )
        if self.freeze_words and self.text_encoder != "gru":
            raise ConfigError(
                f"model.freeze_words freezes the GRU's word embeddings; with "
                f"model.text_encoder={self.text_encoder} use model.freeze_text"
            )
        if self.word_vectors and self.word_dim != 50:
            raise ConfigError(
                f"model.word_vectors={self.word_vectors} gives 50-d vectors; "
                f"set model.word_dim=50 (got {self.word_dim})"
            )
        if not isinstance(self.text_tuned_layers, int) or self.text_tuned_layers < 0:
            raise ConfigError(
                f"model.text_tuned_layers={self.text_tuned_layers!r} must be an integer >= 0"
            )
        if self.text_tuned_layers and (self.text_encoder == "gru" or not self.freeze_text):
            raise ConfigError(
                "model.text_tuned_layers trains the top of a frozen pretrained text encoder: "
                "it needs model.text_encoder other than gru and model.freeze_text true"
            )
        if not 0 <= self.feature_dropout < 1:
            raise ConfigError(f"model.feature_dropout={self.feature_dropout!r} must lie in [0, 1)")
        self._validate_tower()
        if not self.member_gate_scale > 0:
            raise ConfigError(f"model.member_gate_scale={self.member_gate_scale!r} must be > 0")
        if not 0 <= self.member_ema < 1:
            raise ConfigError(f"model.member_ema={self.member_ema!r} must lie in [0, 1)")
        if self.lambda_image is not None and not self.lambda_image > 0:
            raise ConfigError(f"model.lambda_image={self.lambda_image!r} must be > 0 or null")

    def _validate_tower(self) -> None:
        from imram.features.efficientnet_lite import HEAD_CHANNELS, STAGES, VARIANTS

        stages = self.tower_stages
        if (
            isinstance(stages, bool)
            or not isinstance(stages, int)
            or not 1 <= stages <= len(STAGES)
        ):
            raise ConfigError(
                f"model.tower_stages={stages!r} must be an integer in [1, {len(STAGES)}]"
            )
        if self.tower_backbone not in VARIANTS:
            raise ConfigError(
                f"model.tower_backbone={self.tower_backbone!r} is not one of {', '.join(VARIANTS)}"
            )
        if self.image_tower == "tuned" and self.img_dim != HEAD_CHANNELS:
            raise ConfigError(
                f"model.image_tower: tuned outputs the backbone's {HEAD_CHANNELS}-d regions; "
                f"model.img_dim is {self.img_dim}"
            )

    @property
    def trunk_stages(self) -> int:
        """The stages whose input the model reads from a trunk cache; 0: region features."""
        return self.tower_stages if self.image_tower == "tuned" else 0

    @property
    def image_lambda(self) -> float:
        """λ of the image-query branch (regions attend over words)."""
        return self.lambda_softmax if self.lambda_image is None else self.lambda_image

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, refusing unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {', '.join(unknown)}; valid keys: "
                + ", ".join(sorted(known))
            )
        return cls(**values)
