"""A fine-grained teacher for an embedding model (``train.distill_from``).

A trained cross-attention model (Full-IMRAM, SCAN) scores each training batch without autograd
on its fast inference path, and the student's dot products learn its ranking: a KL term between
the teacher's and the student's softmax over each row (an image's captions) and each column (a
caption's images), added to the hinge loss with weight ``train.distill_weight``. Retrieval stays
the student's dot product; the teacher is a training cost only.

Both sides' logits are their scores over ``train.distill_temperature``; the teacher's score is a
sum of ``score_terms()`` cosines (steps × branches), so it is divided by that count first, to be
on the student's cosine scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from imram.checkpoint import load_checkpoint
from imram.data.text import Tokenizer
from imram.errors import ConfigError, DataError
from imram.models.interface import CrossAttentionModel


def load_teacher(
    path: str | Path, vocab: Tokenizer, img_dim: int, device: torch.device
) -> CrossAttentionModel:
    """The cross-attention checkpoint at ``path``, frozen (eval, no gradient), refused unless it
    reads the run's tokens and regions."""
    teacher = load_checkpoint(path, map_location=device)
    model = teacher.model
    if not isinstance(model, CrossAttentionModel):
        raise ConfigError(
            f"train.distill_from={path}: a {teacher.config.model.name} checkpoint; the teacher "
            "must be a cross-attention model (IMRAM, SCAN)"
        )
    if teacher.vocab is None or teacher.vocab.fingerprint() != vocab.fingerprint():
        raise DataError(
            f"{teacher.path}: the teacher's vocabulary differs from this run's; train both "
            "with the same vocabulary (the same data and vocabulary settings, or --vocab)"
        )
    if teacher.config.model.img_dim != img_dim:
        raise DataError(
            f"{teacher.path}: the teacher takes {teacher.config.model.img_dim}-d regions, "
            f"this run {img_dim}-d (model.img_dim)"
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def distill_loss(student: Tensor, teacher: Tensor, terms: int, temperature: float) -> Tensor:
    """KL(teacher ‖ student) of the row softmaxes plus that of the column softmaxes of ``[B, B]``
    score matrices, summed over rows and columns (the hinge loss is a sum over the batch too)."""
    s = student.float() / temperature
    t = teacher.float() / (terms * temperature)
    rows = F.kl_div(
        F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="sum"
    )
    cols = F.kl_div(
        F.log_softmax(s, dim=0), F.log_softmax(t, dim=0), log_target=True, reduction="sum"
    )
    return rows + cols
