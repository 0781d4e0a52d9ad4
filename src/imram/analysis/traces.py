"""The text branch of a cross-attention checkpoint, step by step: what ``analyze attention`` draws
and ``analyze salient`` counts (the paper analyses Text-IMRAM: words attend over regions).

Everything comes from the model's own :meth:`IMRAM.explain`; nothing here recomputes a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imram.checkpoint import Checkpoint, load_checkpoint
from imram.data import pad_captions
from imram.data.text import merge_words
from imram.errors import ConfigError, DataError


@dataclass
class TextTrace:
    """How one caption matched one image in the text branch. ``attention``: ``[K, n, R]``
    weights of each token over the regions at each step; ``word_scores``: ``[K, n]`` each
    token's cosine with its attended regions (the paper's word-based score, Eq. 11);
    ``step_scores``: ``[K]`` the branch's F_k. ``n`` counts ``<start>`` and ``<end>``."""

    attention: np.ndarray
    word_scores: np.ndarray
    step_scores: np.ndarray


def load_text_checkpoint(path: str | Path, device: str | torch.device) -> Checkpoint:
    """A checkpoint whose model has a text branch to explain (IMRAM full/text, SCAN t-i), on
    ``device``; anything else is refused with the reason."""
    checkpoint = load_checkpoint(path)
    model, name = checkpoint.model, checkpoint.config.model.name
    if not hasattr(model, "explain"):
        raise ConfigError(
            f"{checkpoint.path}: model {name!r} has no cross-attention to analyse (it scores "
            "whole-item embeddings); use an IMRAM (imram_full, imram_text) or scan_t2i checkpoint"
        )
    if not model.uses("text"):
        raise ConfigError(
            f"{checkpoint.path}: model {name!r} has no text branch (regions attend over words); "
            "these analyses follow words attending over regions: use imram_full, imram_text or "
            "scan_t2i"
        )
    if checkpoint.vocab is None:
        raise DataError(f"{checkpoint.path}: the checkpoint has no vocabulary")
    checkpoint.model = model.to(device).eval()
    return checkpoint


def check_regions(checkpoint: Checkpoint, dim: int, source: str | Path) -> None:
    """Refuse region features whose size the checkpoint's model does not take."""
    expected = checkpoint.config.model.img_dim
    if dim != expected:
        raise DataError(
            f"{source}: regions are {dim}-d but the checkpoint {checkpoint.path} takes "
            f"{expected}-d (model.img_dim)"
        )


@torch.no_grad()
def text_traces(
    model: torch.nn.Module,
    features: torch.Tensor,
    token_lists: Sequence[Sequence[int]],
    device: str | torch.device,
    groups: Sequence[list[list[int]]] | None = None,
) -> list[TextTrace]:
    """The text-branch trace of one image (``[R, D]`` raw region features) with each caption
    (token ids with ``<start>``/``<end>``), one :class:`TextTrace` per caption; ``groups``
    (per caption, the tokenizer's ``word_groups``) merges word pieces into words, each word
    attending and scoring as the mean of its pieces."""
    tokens, lengths = pad_captions(token_lists)
    on_device = lengths.to(device)
    image = model.encode_images(features[None].to(device))
    captions = model.encode_captions(tokens.to(device), on_device)
    trace = model.explain(image, captions, on_device)["text"]
    attention = torch.stack([a[:, 0] for a in trace.attention], dim=1).float().cpu().numpy()
    scores = trace.fragment_scores[:, 0].float().cpu().numpy()
    steps = trace.step_scores[:, 0].float().cpu().numpy()
    traces = []
    for q, n in enumerate(lengths.tolist()):
        trace = TextTrace(attention[q, :, :n], scores[q, :, :n], steps[q])
        if groups is not None:
            merged = merge_words(torch.from_numpy(trace.attention), groups[q], 1, "mean")
            words = merge_words(torch.from_numpy(trace.word_scores), groups[q], 1, "mean")
            trace = TextTrace(merged.numpy(), words.numpy(), trace.step_scores)
        traces.append(trace)
    return traces
