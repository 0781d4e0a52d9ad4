"""The two encoders every model starts from, chosen and sized by its config: regions through
:class:`~imram.models.encoders.ImageEncoder`, captions through the GRU or a pretrained
transformer (``model.text_encoder``)."""

from __future__ import annotations

from imram.models.encoders import ImageEncoder, TextEncoder
from imram.models.text_transformer import TransformerTextEncoder
from imram.schema import ModelConfig


def build_encoders(
    config: ModelConfig,
) -> tuple[ImageEncoder, TextEncoder | TransformerTextEncoder]:
    """The region and word encoders every model starts from, sized by its config: the text
    side a :class:`TextEncoder` or, for ``model.text_encoder`` other than ``gru``, a
    pretrained :class:`~imram.models.text_transformer.TransformerTextEncoder`. A GRU, itself
    trained, gets no residual MLP (``model.fragment_mlp`` adds one to the regions only). A
    tuned image tower (``model.image_tower``) starts from the installed ImageNet weights."""
    tower = None
    if config.image_tower == "tuned":
        from imram.features.tower import ImageTower

        tower = ImageTower(config.tower_backbone, config.tower_stages)
    image = ImageEncoder(
        config.img_dim, config.embed_dim, config.fragment_mlp, config.feature_dropout, tower
    )
    if config.text_encoder != "gru":
        return image, TransformerTextEncoder(
            config.text_encoder,
            config.embed_dim,
            config.freeze_text,
            config.fragment_mlp,
            config.text_tuned_layers,
            config.feature_dropout,
        )
    text = TextEncoder(config.vocab_size, config.word_dim, config.embed_dim, config.gru_layers)
    return image, text
