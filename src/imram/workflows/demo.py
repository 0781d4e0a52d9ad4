"""A self-contained first run: build a model at the paper's size, score a random block, check it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from imram.metrics import chance_metrics, evaluate_sims
from imram.models import build_model
from imram.scoring import reference_similarity


@dataclass
class DemoResult:
    model: str
    n_images: int
    n_captions: int
    seconds: float
    pairs_per_second: float
    max_reference_diff: float
    metrics: dict
    chance: dict


def run_demo(
    model_name: str = "imram_full",
    n_images: int = 16,
    captions_per_image: int = 5,
    regions: int = 36,
    seed: int = 0,
) -> DemoResult:
    """Score random features with a freshly built model and compare a few pairs with the reference.

    Random weights and features carry no signal, so the recalls sit at chance level; the point is
    that the full pipeline (encoders → batched similarity → metrics) runs and is exact.
    """
    torch.manual_seed(seed)
    model = build_model(model_name).eval()
    cfg = model.config
    n_captions = n_images * captions_per_image
    features = torch.randn(n_images, regions, cfg.img_dim)
    lengths = torch.randint(8, 21, (n_captions,))
    tokens = torch.randint(4, cfg.vocab_size, (n_captions, int(lengths.max())))
    with torch.no_grad():
        start = time.perf_counter()
        img = model.encode_images(features)
        cap = model.encode_captions(tokens, lengths)
        sims = model.similarity(img, cap, lengths)
        seconds = time.perf_counter() - start
        check = reference_similarity(model, img[:2], cap[:3], lengths[:3])
    cap2img = torch.arange(n_captions) // captions_per_image
    return DemoResult(
        model=model_name,
        n_images=n_images,
        n_captions=n_captions,
        seconds=seconds,
        pairs_per_second=n_images * n_captions / seconds,
        max_reference_diff=(sims[:2, :3] - check).abs().max().item(),
        metrics=evaluate_sims(sims, cap2img.numpy(), "1k"),
        chance=chance_metrics(n_images, n_captions, cap2img.numpy()),
    )
