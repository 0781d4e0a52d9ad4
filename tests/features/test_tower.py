"""The trainable tower over a cached trunk: at the start it is the backbone on the photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram.data.tuxpaint import stamps_root
from imram.errors import ConfigError
from imram.features import ExtractorConfig, extract_features, load_efficientnet_lite, load_image
from imram.features.extract import TrunkOutput
from imram.features.tower import ImageTower

PHOTOS = [
    "animals/mammals/dogs/dog.png",
    "clothes/t_shirt.png",
    "town/roadsigns/stoplight_01_red.png",
]
CONFIG = ExtractorConfig(input_size=96, batch_size=2)


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite("efficientnet_lite0")


@pytest.fixture(scope="module")
def pixels():
    return torch.stack([load_image(stamps_root() / p, CONFIG) for p in PHOTOS])


@pytest.mark.parametrize("stages", [1, 2, 3, 7])
def test_tower_on_the_trunk_is_the_backbone_on_the_photo(lite0, pixels, stages):
    tower = ImageTower("efficientnet_lite0", stages)
    with torch.no_grad():
        expected = lite0.forward_features(pixels).flatten(2).transpose(1, 2)
        got = tower(lite0.forward_trunk(pixels, stages))
    assert got.shape == expected.shape == (3, 9, 1280)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


def test_the_trunk_stops_where_the_tower_starts(lite0, pixels):
    with torch.no_grad():
        shapes = {n: tuple(lite0.forward_trunk(pixels[:1], n).shape[1:]) for n in (1, 2, 3)}
    assert shapes == {1: (192, 3, 3), 2: (112, 6, 6), 3: (80, 6, 6)}
    assert ImageTower("efficientnet_lite0", 2).input_channels == 112
    with pytest.raises(ConfigError, match=r"tower stages must be an integer in \[1, 7\], got 0"):
        lite0.first_tower_block(0)


def test_tower_trains_its_weights_but_never_its_batchnorm_statistics(lite0, pixels):
    tower = ImageTower("efficientnet_lite0", 1).train()
    stats = tower.bn.running_mean.clone()
    with torch.no_grad():
        trunk = lite0.forward_trunk(pixels, 1)
    tower(trunk).sum().backward()
    assert torch.equal(tower.bn.running_mean, stats) and not tower.bn.training
    assert tower.conv_head.weight.grad is not None and tower.conv_head.weight.grad.abs().sum() > 0


def test_a_trunk_cache_holds_the_trunk_rows(lite0, pixels, tmp_path):
    paths = [stamps_root() / p for p in PHOTOS]
    out = tmp_path / "train_trunk2.npy"
    result = extract_features(paths, out, CONFIG, progress=False, trunk=TrunkOutput(2))
    rows = np.load(out)
    assert result.kept == [0, 1, 2] and rows.dtype == np.float16 and rows.shape == (3, 112, 6, 6)
    with torch.no_grad():
        exact = lite0.forward_trunk(pixels, 2).numpy()
    assert np.allclose(rows, exact, rtol=1e-3, atol=1e-2)
    flipped = tmp_path / "flip.npy"
    extract_features(paths, flipped, CONFIG, False, trunk=TrunkOutput(2, "float32", flip=True))
    with torch.no_grad():
        mirrored = lite0.forward_trunk(pixels.flip(-1), 2).numpy()
    assert np.allclose(np.load(flipped), mirrored, rtol=0, atol=1e-5)
