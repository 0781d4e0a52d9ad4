"""Evaluate a model on a precomp split under a published protocol (design §protocols)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from imram.data import PrecompDataset, pad_captions
from imram.errors import DataError
from imram.metrics import evaluate_sims
from imram.precision import autocast, resolve_precision
from imram.scoring import distributed_similarity, score_gallery


def encode_in_batches(
    encode: Callable[[slice], Tensor],
    n_items: int,
    batch_size: int = 128,
    length: int | None = None,
) -> Tensor:
    """``encode(batch range)`` over ``0..n_items``, written into one preallocated tensor.

    Writing in place avoids holding every batch and their concatenation at once (twice the
    embeddings' memory). ``length`` zero-pads dimension 1 of 3-d outputs (caption words).
    """
    out: Tensor | None = None
    for start in range(0, n_items, batch_size):
        part = encode(slice(start, min(start + batch_size, n_items)))
        if out is None:
            shape = list(part.shape)
            shape[0] = n_items
            if part.dim() == 3 and length is not None:
                shape[1] = length
            out = part.new_zeros(shape)
        if part.dim() == 3:
            out[start : start + part.shape[0], : part.shape[1]] = part
        else:
            out[start : start + part.shape[0]] = part
    if out is None:
        raise ValueError("nothing to encode")
    return out


@torch.no_grad()
def encode_split(
    model: nn.Module,
    dataset: PrecompDataset,
    image_indices: Sequence[int],
    caption_indices: Sequence[int],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode each listed image once and each listed caption once → (images, captions, lengths).

    Caption embeddings are padded to the longest caption of the whole set.
    """
    image_indices, caption_indices = list(image_indices), list(caption_indices)
    images = encode_in_batches(
        lambda s: model.encode_images(dataset.images(image_indices[s]).to(device)),
        len(image_indices),
        batch_size,
    )
    token_lists = [dataset.caption_tokens(j) for j in caption_indices]
    lengths = torch.tensor([len(t) for t in token_lists])

    def captions(s: slice) -> Tensor:
        tokens, lens = pad_captions(token_lists[s])
        return model.encode_captions(tokens.to(device), lens.to(device))

    longest = int(lengths.max()) if len(token_lists) else 0
    caption_emb = encode_in_batches(captions, len(token_lists), batch_size, longest)
    return images, caption_emb, lengths.to(device)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: PrecompDataset,
    protocol: str = "1k",
    max_captions: int | None = None,
    batch_size: int = 128,
    budget_mb: float = 1024.0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    against_fp32: bool = False,
    progress: bool = False,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Score the split (or its first ``max_captions`` captions and their images), scoring under
    ``precision`` (``fp32``, ``bf16`` or ``fp16`` autocast, or ``auto``: bf16 where the
    hardware has bf16 matrix units; fragments are encoded in fp32).

    ``against_fp32`` (with a low precision) scores the split a second time in fp32 and adds
    ``fp32_rsum``, ``rsum_vs_fp32`` (this rsum minus fp32's) and ``max_score_diff_vs_fp32``
    to the metrics: what the low precision costs in accuracy, on the data at hand.
    ``progress`` shows a bar with pairs/s while a single process scores.
    Returns the metrics, the ``[n_images, n_captions]`` float32 matrix and its cap2img.
    """
    dataset.require_input(model.config, f"the model ({model.config.name})")
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    n_cap = (
        dataset.num_captions if max_captions is None else min(max_captions, dataset.num_captions)
    )
    caption_indices = np.arange(n_cap)
    image_indices, cap2img = np.unique(dataset.cap2img[:n_cap], return_inverse=True)
    # Fragments are encoded in fp32 (a small share of the cost) and only the pair scoring runs
    # under autocast: fragments rounded to bf16 flip rankings that bf16 scoring alone does not.
    img, cap, lengths = encode_split(
        model, dataset, image_indices.tolist(), caption_indices.tolist(), batch_size, device
    )
    with autocast(precision, device):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sims = distributed_similarity(model, img, cap, lengths, budget_mb).float().cpu().numpy()
        else:
            sims = np.empty((len(image_indices), n_cap), dtype=np.float32)
            score_gallery(
                model, img, cap, lengths, out=sims, budget_mb=budget_mb, progress=progress
            )
    model.train(was_training)
    metrics = evaluate_sims(sims, cap2img, protocol)
    if against_fp32 and precision != "fp32":
        exact, exact_sims, _ = evaluate_model(
            model, dataset, protocol, max_captions, batch_size, budget_mb, device, "fp32"
        )
        metrics["fp32_rsum"] = exact["rsum"]
        metrics["rsum_vs_fp32"] = metrics["rsum"] - exact["rsum"]
        metrics["max_score_diff_vs_fp32"] = float(np.abs(sims - exact_sims).max())
    return metrics, sims, cap2img


def ensemble(
    matrices: Sequence[str | Path], dataset: PrecompDataset, protocol: str
) -> dict[str, Any]:
    """Average saved similarity matrices (SCAN-style ensembles) and evaluate the mean."""
    total = None
    for path in matrices:
        try:
            sims = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npy matrix ({err})") from None
        expected = (dataset.num_images, dataset.num_captions)
        if sims.shape != expected:
            raise DataError(
                f"{path}: shape {sims.shape} does not match split {dataset.split!r} {expected}"
            )
        total = np.array(sims, dtype=np.float64) if total is None else total + sims
    if total is None:
        raise DataError("ensemble needs at least one similarity matrix")
    return evaluate_sims(total / len(matrices), dataset.cap2img, protocol)
