"""What the benchmarks share: random inputs of a given shape, peak memory, thread settings."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from imram.evaluation import encode_in_batches
from imram.models import build_model


def peak_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_inputs(name: str, steps: int, n_images: int, n_captions: int, regions: int, dim: int):
    """A seeded model and random fragments of the given shape, encoded as evaluation does."""
    torch.manual_seed(0)
    model = build_model(name, steps=steps, embed_dim=dim).eval()
    lengths = torch.randint(8, 21, (n_captions,))
    tokens = torch.randint(4, 1000, (n_captions, 20))
    with torch.no_grad():  # in batches of 128, as evaluation encodes
        img = encode_in_batches(
            lambda s: model.encode_images(
                torch.randn(s.stop - s.start, regions, model.config.img_dim)
            ),
            n_images,
        )
        cap = encode_in_batches(
            lambda s: model.encode_captions(tokens[s], lengths[s]), n_captions, length=20
        )
    return model, img, cap, lengths


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (None: as set), then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
