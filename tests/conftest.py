"""Shared fixtures: a small precomp dataset whose captions a model can learn to match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CONCEPTS = ["dog", "cat", "car", "tree", "ball", "boat", "bird", "horse", "house", "bike"]
TEMPLATES = [
    "a {a} and a {b}",
    "the {b} near the {a}",
    "{a} with {b}",
    "a photo of a {a} and a {b}",
    "there is a {b} and a {a}",
]


def make_toy_precomp(root: Path, sizes=(120, 25, 25), regions=6, dim=32, seed=0) -> Path:
    """Each image shows two concepts (two regions carry their vectors, the rest is noise);
    its five captions name both. Splits train/dev/test with the given image counts."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(CONCEPTS), dim)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    for split, n_images in zip(("train", "dev", "test"), sizes, strict=True):
        feats = 0.3 * rng.standard_normal((n_images, regions, dim)).astype(np.float32)
        captions = []
        for i in range(n_images):
            a, b = rng.choice(len(CONCEPTS), size=2, replace=False)
            slots = rng.choice(regions, size=2, replace=False)
            feats[i, slots[0]] += vectors[a]
            feats[i, slots[1]] += vectors[b]
            captions += [t.format(a=CONCEPTS[a], b=CONCEPTS[b]) for t in TEMPLATES]
        np.save(root / f"{split}_ims.npy", feats)
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return root


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    return make_toy_precomp(tmp_path_factory.mktemp("toy") / "toy_precomp")
