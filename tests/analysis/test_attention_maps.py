"""``imram analyze attention``: the figure, the numbers behind it, and the inputs it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imram.analysis import attention_maps
from imram.analysis.attention_maps import HEADER_PX, PANEL_PX
from imram.analysis.pictures import picture_file
from imram.checkpoint import load_checkpoint, save_checkpoint
from imram.cli import main
from imram.config import load_config
from imram.data import PrecompDataset, Vocabulary, pad_captions, read_captions
from imram.data.text import tokenize
from imram.features.extract import ExtractorConfig, image_features
from imram.models import build_model
from imram.workflows.prepare import prepare_folder


def _png_size(path):
    with Image.open(path) as image:
        image.load()
        return image.format, image.size


def _similarity(checkpoint, features, caption):
    tokens, lengths = pad_captions([checkpoint.vocab.encode(caption)])
    model = checkpoint.model
    with torch.no_grad():
        img = model.encode_images(features[None])
        return float(model.similarity(img, model.encode_captions(tokens, lengths), lengths)[0, 0])


def _words(caption):
    return [t for t in tokenize(caption) if any(map(str.isalnum, t))]


def test_regions_without_a_grid_are_drawn_as_bars(text_run, toy_data, tmp_path):
    out = tmp_path / "attention"
    result = attention_maps(text_run, toy_data, out, "3", device="cpu")
    dataset = PrecompDataset(toy_data, "test", None)
    caption = dataset.captions[15]  # image 3's first caption (five per image)
    payload = json.loads((out / "attention.json").read_text())
    tokens = ["<start>", *tokenize(caption), "<end>"]
    assert payload["caption"] == caption and payload["tokens"] == tokens
    assert payload["grid"] is None and result.tokens == tokens
    attention = np.array(payload["attention"])
    assert attention.shape == (2, len(tokens), dataset.num_regions)  # K=2 steps
    assert np.allclose(attention.sum(-1), 1.0, atol=1e-5)
    scores = np.array(payload["word_scores"])
    assert np.allclose(scores.mean(axis=1), payload["step_scores"], atol=1e-6)  # avg pooling
    checkpoint = load_checkpoint(text_run)
    expected = _similarity(checkpoint, dataset.image(3), caption)
    assert sum(payload["step_scores"]) == pytest.approx(expected, abs=1e-5)  # Text-IMRAM
    rows = len(_words(caption))
    assert _png_size(result.figure) == ("PNG", (2 * PANEL_PX, rows * PANEL_PX + HEADER_PX))
    report = result.report_md.read_text()
    assert "regions as bars" in report and "![attention per step](attention.png)" in report


def test_a_grid_without_its_picture_is_drawn_on_a_blank_square(text_run, toy_data, tmp_path):
    data = tmp_path / "grid_precomp"
    data.mkdir()
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(toy_data / name, data / name)
    names = [f"pictures/{i}.png" for i in range(25)]
    (data / "test_ids.txt").write_text("\n".join(names) + "\n")
    meta = {"splits": {"test": {"features": {"grid": [2, 3]}, "images": names}}}
    (data / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "attention"
    argv = ["analyze", "attention", "--checkpoint", str(text_run), "--data", str(data)]
    argv += ["--image", "pictures/4.png", "--caption", "a dog near a cat", "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    payload = json.loads((out / "attention.json").read_text())
    assert payload["grid"] == [2, 3] and "blank square" in payload["note"]
    assert payload["image"] == "test image 4 (pictures/4.png)"
    size = (3 * PANEL_PX, 5 * PANEL_PX + HEADER_PX)  # picture + 2 steps; a, dog, near, a, cat
    assert _png_size(out / "attention.png") == ("PNG", size)


@pytest.fixture(scope="module")
def pictures_precomp(tmp_path_factory):
    """A prepared folder of twelve small pictures (2x2 grids of 1280-d regions) and an untrained
    Text-IMRAM checkpoint that takes its features."""
    root = tmp_path_factory.mktemp("pictures")
    images = root / "images"
    images.mkdir()
    lines = []
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        lines.append(f"{i}.png\ta red square number {i}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    data = root / "precomp"
    extractor = ExtractorConfig(input_size=64, batch_size=12)
    prepare_folder(
        images, root / "captions.tsv", None, data, extractor, test_fraction=0.3, progress=False
    )
    vocab = Vocabulary.build(read_captions(data / "train_caps.txt"), 1)
    sets = ["model.embed_dim=32", "model.word_dim=16", "model.img_dim=1280", "model.steps=3"]
    config = load_config("f30k_text_imram", [*sets, f"model.vocab_size={len(vocab)}"])
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "ckpt", build_model(config.model), config, vocab)
    return data, checkpoint, images


def test_an_image_file_is_read_as_the_folder_was_made(pictures_precomp, tmp_path):
    data, checkpoint, images = pictures_precomp
    picture = images / "5.png"
    caption = "a red square"
    result = attention_maps(checkpoint, data, tmp_path, str(picture), caption, device="cpu")
    payload = json.loads(result.report_json.read_text())
    assert payload["grid"] == [2, 2] and payload["regions"] == 4
    features = image_features([picture], ExtractorConfig(input_size=64), "cpu")[0]
    expected = _similarity(load_checkpoint(checkpoint), features, caption)
    assert sum(payload["step_scores"]) == pytest.approx(expected, abs=1e-5)
    rows = len(_words(caption))
    size = (4 * PANEL_PX, rows * PANEL_PX + HEADER_PX)  # picture + 3 steps
    assert _png_size(result.figure) == ("PNG", size)
    assert "a 2x2 grid" in result.report_md.read_text()


def test_a_split_image_is_drawn_over_its_recorded_picture(pictures_precomp, tmp_path):
    data, checkpoint, _ = pictures_precomp
    result = attention_maps(checkpoint, data, tmp_path, "0", device="cpu")
    meta = json.loads((data / "meta.json").read_text())
    file = meta["splits"]["test"]["files"][0]
    assert f"picture `{file}`" in result.report_md.read_text()
    payload = json.loads(result.report_json.read_text())
    assert payload["note"] is None
    assert payload["caption"] == PrecompDataset(data, "test", None).captions[0]


def test_tuxpaint_svg_pictures_are_found_in_the_cache(tmp_path, monkeypatch):
    stamps = tmp_path / "stamps"
    (stamps / "animals").mkdir(parents=True)
    (stamps / "animals" / "cat.png").write_bytes(b"png")
    monkeypatch.setenv("IMRAM_CACHE", str(tmp_path / "cache"))
    rasterised = tmp_path / "cache" / "tuxpaint-png" / "animals" / "dog.svg.png"
    rasterised.parent.mkdir(parents=True)
    rasterised.write_bytes(b"png")
    meta = {
        "source": {"format": "tuxpaint", "stamps": str(stamps)},
        "splits": {"test": {"images": ["animals/cat.png", "animals/dog.svg", "gone.png"]}},
    }
    assert picture_file(meta, "test", 0) == stamps / "animals" / "cat.png"
    assert picture_file(meta, "test", 1) == rasterised
    assert picture_file(meta, "test", 2) is None
    assert picture_file(None, "test", 0) is None


@pytest.mark.parametrize(
    ("preset", "image", "message"),
    [
        ("vsepp", "0", "has no cross-attention to analyse"),
        ("f30k_image_imram", "0", "has no text branch"),
        (None, "no-such-picture.png", "not an image file, not a row index"),
        (None, "25", "split 'test' has images 0..24"),
    ],
)
def test_refusals_are_one_line(
    text_run, untrained, toy_data, tmp_path, capsys, preset, image, message
):
    checkpoint = untrained(preset) if preset else text_run
    argv = ["analyze", "attention", "--checkpoint", str(checkpoint), "--data", str(toy_data)]
    assert main([*argv, "--image", image, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_an_image_file_needs_the_folder_extractor(
    text_run, toy_data, pictures_precomp, tmp_path, capsys
):
    _, _, images = pictures_precomp
    argv = ["analyze", "attention", "--checkpoint", str(text_run), "--data", str(toy_data)]
    argv += ["--image", str(images / "1.png"), "--caption", "a dog", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{toy_data / 'meta.json'}: no extractor entry" in err
