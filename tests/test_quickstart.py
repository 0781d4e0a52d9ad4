"""The main job end to end at a small size: Tux Paint → three models → report; and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from imram.cli import main
from imram.data import PrecompDataset
from imram.features.extract import ExtractorConfig
from imram.prepare import prepare_tuxpaint
from imram.quickstart import MODELS, run_quickstart

SMALL = ["model.embed_dim=32", "train.epochs=1", "train.batch_size=64", "data.vocab_glove_top=500"]


def test_quickstart_writes_a_report_of_three_models_beside_chance(tmp_path):
    out = tmp_path / "quick"
    report = prepare_tuxpaint(
        out / "tuxpaint_precomp", ExtractorConfig(input_size=64, batch_size=64), progress=False
    )
    counts = {split: c.images for split, c in report.splits.items()}
    assert counts["train"] > 600 and 50 < counts["test"] < 150 and 50 < counts["dev"] < 150
    test = PrecompDataset(out / "tuxpaint_precomp", "test", None)
    assert test.num_regions == 4 and test.feature_dim == 1280  # 64 px -> a 2x2 grid
    meta = json.loads((out / "tuxpaint_precomp" / "meta.json").read_text())
    assert meta["source"]["format"] == "tuxpaint"
    files = meta["splits"]["test"]["files"]  # the pictures behind the rows, for serving
    assert len(files) == test.num_images and all(Path(f).is_file() for f in files)
    assert files[0].endswith(".png") and meta["splits"]["test"]["images"][0] in files[0]
    assert any("rasterise" in d["reason"] for d in meta["dropped"])  # an SVG cairosvg refuses

    result = run_quickstart(out, overrides=SMALL, progress=False)
    payload = json.loads(result.report_json.read_text())
    assert [m["model"] for m in payload["models"]] == [label for label, _ in MODELS]
    assert payload["test_images"] == test.num_images
    for model in payload["models"]:
        assert 0 <= model["metrics"]["rsum"] <= 600 and model["curve"][0]["epoch"] == 1
    text = result.report_md.read_text()
    assert text.count("\n| ") == 5 and "| chance |" in text  # header, 3 models, chance
    # A second run reuses the data and the finished runs.
    again = json.loads(run_quickstart(out, overrides=SMALL, progress=False).report_json.read_text())
    for first, second in zip(payload["models"], again["models"], strict=True):
        assert (first["metrics"], first["curve"]) == (second["metrics"], second["curve"])
        assert second["train_seconds"] < 5


def test_prepare_folder_command(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        lines += [f"{i}.png\tpicture {i} one", f"{i}.png\tpicture {i} two"]
    (images / "broken.png").write_bytes(b"not a png")
    lines.append("broken.png\ta broken picture")
    captions = tmp_path / "captions.tsv"
    captions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "precomp"
    argv = ["prepare", "folder", "--images", str(images), "--captions", str(captions)]
    argv += ["--out", str(out), "--input-size", "32", "--test-fraction", "0.3", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed
    total = 0
    for split in ("train", "dev", "test"):
        if (out / f"{split}_caps.txt").is_file():
            data = PrecompDataset(out, split, None)
            assert data.num_captions == 2 * data.num_images
            total += data.num_images
    assert total == 12
    assert main(argv) == 2  # the folder holds a precomp now: refused without --overwrite
    assert "overwrite" in capsys.readouterr().err
