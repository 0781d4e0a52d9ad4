"""VSE++ baseline (Faghri et al., BMVC 2018): one vector per image and per caption, dot product."""

from __future__ import annotations

from torch import Tensor

from imram.models.encoders import l2norm, length_mask, masked_mean
from imram.models.interface import EmbeddingModel
from imram.models.registry import register_model
from imram.models.towers import build_encoders
from imram.schema import ModelConfig


class VSEPP(EmbeddingModel):
    """Image = L2(mean of projected regions); caption = L2(final Bi-GRU state, or word mean)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder, self.text_encoder = build_encoders(config)

    def encode_images(self, features: Tensor) -> Tensor:
        """``[N, R, img_dim]`` → ``[N, d]`` unit image vectors."""
        return l2norm(self.image_encoder.project(features).mean(dim=1))

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[B, L]`` token ids → ``[B, d]`` unit caption vectors."""
        words, sentence = self.text_encoder(tokens, lengths)
        if self.config.text_pool == "last":
            return l2norm(sentence)
        return l2norm(masked_mean(words, length_mask(lengths.to(words.device), words.shape[1])))


register_model("vsepp", VSEPP)
