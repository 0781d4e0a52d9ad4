"""A tuned image tower end to end on real image files: the trunk cache a prepared folder gains,
the model over it equal to the frozen grid at the start, training, and the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imram.checkpoint import load_checkpoint
from imram.config import load_config
from imram.data import PrecompDataset
from imram.errors import ConfigError, DataError
from imram.evaluation import evaluate_model
from imram.features import ExtractorConfig, load_efficientnet_lite, load_image
from imram.models import build_model
from imram.training.trainer import train
from imram.workflows.prepare import prepare_folder
from imram.workflows.trunk import add_trunk_cache

pytestmark = pytest.mark.slow

CONFIG = ExtractorConfig(input_size=64, batch_size=8)
WORDS = ["red", "blue", "green", "round", "square", "small", "large", "striped"]
TUNED = [
    "model.img_dim=1280",
    "model.embed_dim=32",
    "model.word_dim=32",
    "model.image_tower=tuned",
    "model.tower_stages=2",
    "train.batch_size=16",
    "train.epochs=1",
    "train.tower_lr=1e-3",
    "data.vocab_threshold=1",
    "train.log_every=1",
]


def _picture(path, seed: int) -> None:
    """A picture of two coloured blocks on noise: something a caption can describe."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
    pixels[8:30, 6:30] = rng.integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A prepared folder of 40 pictures (train 24 / dev 8 / test 8), each with 3 captions."""
    root = tmp_path_factory.mktemp("tower")
    (root / "images").mkdir()
    rows = ["image,caption,split"]
    for i in range(40):
        name = f"p{i:02d}.png"
        _picture(root / "images" / name, i)
        split = "train" if i < 24 else "dev" if i < 32 else "test"
        for k in range(3):
            words = " ".join(WORDS[(i + k * j) % len(WORDS)] for j in range(1, 4))
            rows.append(f"{name},a {words} picture {i},{split}")
    (root / "caps.csv").write_text("\n".join(rows) + "\n")
    out = root / "data"
    prepare_folder(root / "images", root / "caps.csv", None, out, CONFIG, progress=False)
    add_trunk_cache(out, 2, "float32", progress=False)
    return out


def test_the_cache_holds_the_trunk_of_each_listed_picture(folder):
    meta = json.loads((folder / "meta.json").read_text())
    record = meta["towers"]["2"]
    assert record["backbone"] == "efficientnet_lite0" and record["shape"] == [112, 4, 4]
    assert set(record["splits"]) == {"train", "dev", "test"}
    lite0 = load_efficientnet_lite("efficientnet_lite0")
    dev = PrecompDataset(folder, "dev", None, 2)
    files = meta["splits"]["dev"]["files"]
    with torch.no_grad():
        expected = lite0.forward_trunk(torch.stack([load_image(f, CONFIG) for f in files]), 2)
    assert torch.allclose(dev.images(range(len(files))), expected, rtol=1e-5, atol=1e-4)
    before = (folder / "dev_trunk2.npy").stat().st_mtime_ns
    add_trunk_cache(folder, 2, "float32", progress=False)
    assert (folder / "dev_trunk2.npy").stat().st_mtime_ns == before  # kept, not redone


def test_a_fresh_tuned_model_scores_as_the_frozen_grid(folder):
    """At the start the tower on the cached trunk is the backbone on the photo: a tuned
    model's embeddings equal a frozen model's with the same projection on the region grid."""
    tuned_config = load_config("vsepp", TUNED).model
    frozen_config = load_config("vsepp", [*TUNED, "model.image_tower=frozen"]).model
    torch.manual_seed(0)
    tuned = build_model(tuned_config, vocab_size=50).eval()
    frozen = build_model(frozen_config, vocab_size=50).eval()
    frozen.load_state_dict(
        {k: v for k, v in tuned.state_dict().items() if ".tower." not in k}, strict=True
    )
    trunk = PrecompDataset(folder, "dev", None, 2)
    grid = PrecompDataset(folder, "dev", None)
    with torch.no_grad():
        got = tuned.encode_images(trunk.images(range(8)))
        expected = frozen.encode_images(grid.images(range(8)))
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tuned_run(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("tuned") / "run"
    train(load_config("vsepp", TUNED), folder, run, progress=False)
    return run


def test_training_moves_the_tower_and_the_checkpoint_scores_the_same(folder, tuned_run):
    run = tuned_run
    trained = load_file(run / "last" / "model.safetensors")
    pretrained = build_model(load_config("vsepp", TUNED).model, vocab_size=50).state_dict()
    head = "image_encoder.tower.conv_head.weight"
    assert not torch.equal(trained[head], pretrained[head])  # the tower learned
    stats = "image_encoder.tower.bn.running_mean"
    assert torch.equal(trained[stats], pretrained[stats])  # its statistics did not
    manifest = json.loads((run / "manifest.json").read_text())
    assert any(name.endswith("train_trunk2.npy") for name in manifest["files"])
    checkpoint = load_checkpoint(run / "last")
    dev = checkpoint.open_split(folder, "dev")
    first = evaluate_model(checkpoint.model, dev)[1]
    again = load_checkpoint(run / "last")
    assert np.array_equal(evaluate_model(again.model, again.open_split(folder, "dev"))[1], first)
    with pytest.raises(DataError, match="opened with region features, but the checkpoint"):
        PrecompDataset(folder, "dev", checkpoint.vocab).require_input(
            checkpoint.config.model, f"the checkpoint {checkpoint.path}"
        )


def test_a_missing_cache_and_bad_settings_are_named(folder, tmp_path):
    with pytest.raises(DataError, match=r"dev_trunk3\.npy: no trunk cache for 3 tower stage"):
        PrecompDataset(folder, "dev", None, 3)
    with pytest.raises(ConfigError, match=r"model.tower_stages=9 must be an integer in \[1, 7\]"):
        load_config("vsepp", [*TUNED, "model.tower_stages=9"])
    with pytest.raises(ConfigError, match="model.img_dim is 32"):
        load_config("vsepp", [*TUNED, "model.img_dim=32"])
    with pytest.raises(ConfigError, match="train.tower_lr"):
        load_config("vsepp", [*TUNED, "train.tower_lr=0"])


def test_prepare_cli_adds_the_cache_to_a_prepared_folder(folder, tmp_path):
    copy = tmp_path / "data"
    copy.mkdir()
    for path in folder.iterdir():
        if "trunk" not in path.name:
            (copy / path.name).write_bytes(path.read_bytes())
    command = [sys.executable, "-m", "imram", "prepare", "folder", "--out", str(copy)]
    done = subprocess.run(
        [*command, "--tower-stages", "1", "--no-progress"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "trunk cache for 1 tower stage(s) of efficientnet_lite0" in done.stdout
    assert np.load(copy / "train_trunk1.npy").shape == (24, 192, 2, 2)
    assert (copy / "train_ims.npy").read_bytes() == (folder / "train_ims.npy").read_bytes()
