"""Fragment encoders (design §encoders): image regions and caption words → unit d-vectors."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from imram.precision import at_least_fp32

EPS = 1e-8


def l2norm(x: Tensor, dim: int = -1, eps: float = EPS) -> Tensor:
    """``x / (‖x‖ + eps)``; zero vectors (padding) stay zero and get zero gradient."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def dot_scores(image_emb: Tensor, caption_emb: Tensor) -> Tensor:
    """``[n_images, n_captions]`` dot products of one vector per item, in fp32 even under
    autocast: they are the final scores, and bf16's 8-bit mantissa would tie scores ~1e-3 apart."""
    with torch.autocast(image_emb.device.type, enabled=False):
        return at_least_fp32(image_emb) @ at_least_fp32(caption_emb).T


def pair_dot_scores(image_emb: Tensor, caption_emb: Tensor) -> Tensor:
    """``[P]`` dot products of image p with caption p, in fp32 as :func:`dot_scores`."""
    with torch.autocast(image_emb.device.type, enabled=False):
        return (at_least_fp32(image_emb) * at_least_fp32(caption_emb)).sum(dim=-1)


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Boolean ``[B, max_len]`` mask, True at the first ``lengths[b]`` positions of row b."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, L, d]`` over the positions where ``mask [B, L]`` is True → ``[B, d]``."""
    summed = (x * mask[..., None]).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).to(x.dtype)


def xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear map with Xavier-uniform weights and zero bias (design §encoders)."""
    fc = nn.Linear(in_dim, out_dim)
    bound = math.sqrt(6.0) / math.sqrt(in_dim + out_dim)
    nn.init.uniform_(fc.weight, -bound, bound)
    nn.init.zeros_(fc.bias)
    return fc


def residual_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → ReLU → Linear, added beside a fragment projection (``model.fragment_mlp``);
    its output layer starts at zero, so at the start the projection is the linear map's."""
    mlp = nn.Sequential(xavier_linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class FragmentProjection(nn.Module):
    """What maps a fragment's features into the joint space, shared by the region and the
    pretrained word encoders: ``fc`` (plus the residual ``mlp`` with ``model.fragment_mlp``),
    reading features partly dropped while training (``model.feature_dropout``)."""

    def __init__(self, in_dim: int, out_dim: int, mlp: bool, dropout: float) -> None:
        super().__init__()
        self.fc = xavier_linear(in_dim, out_dim)
        self.mlp = residual_mlp(in_dim, out_dim) if mlp else None
        self.dropout = nn.Dropout(dropout) if dropout else None

    def project(self, features: Tensor) -> Tensor:
        """``[..., in_dim]`` → ``[..., d]`` projected fragments, before normalisation."""
        if self.dropout is not None:
            features = self.dropout(features)
        out = self.fc(features)
        return out if self.mlp is None else out + self.mlp(features)


class ImageEncoder(FragmentProjection):
    """One linear map per region (plus a residual MLP with ``mlp``), then L2 per region; raw
    features are not normalised first (``dropout``: only dropped while training). With a
    ``tower`` (a tuned image tower) the input is the cached trunk output it turns into regions.
    """

    def __init__(
        self,
        img_dim: int,
        embed_dim: int,
        mlp: bool = False,
        dropout: float = 0.0,
        tower: nn.Module | None = None,
    ) -> None:
        super().__init__(img_dim, embed_dim, mlp, dropout)
        self.tower = tower

    def project(self, features: Tensor) -> Tensor:
        """``[N, R, img_dim]`` (with a tower: ``[N, C, h, w]``) → ``[N, R, d]`` projected
        regions, before normalisation."""
        if self.tower is not None:
            features = self.tower(features)
        return super().project(features)

    def forward(self, features: Tensor) -> Tensor:
        """Unit region vectors ``[N, R, d]`` of :meth:`project`."""
        return l2norm(self.project(features))


class TextEncoder(nn.Module):
    """Word embedding → bidirectional GRU → per word (forward + backward) / 2 → L2 per word."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.gru = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Return unit word vectors ``[B, L, d]`` (zeros past each length, L = tokens.shape[1])
        and the sentence vector ``[B, d]``: the mean of both directions' final states."""
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        if lengths_cpu.numel() and int(lengths_cpu.min()) < 1:
            raise ValueError("every caption needs at least one token")
        packed = pack_padded_sequence(
            self.embed(tokens), lengths_cpu, batch_first=True, enforce_sorted=False
        )
        out, hidden = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        d = self.embed_dim
        words = (out[..., :d] + out[..., d:]) / 2
        sentence = (hidden[-2] + hidden[-1]) / 2
        return l2norm(words), sentence
