"""The main job end to end at a small size: Tux Paint → three models → report; and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imram.cli import main
from imram.data import PrecompDataset
from imram.features.extract import ExtractorConfig
from imram.training.curves import best_by, seconds_to_reach, time_to_accuracy_section
from imram.workflows.prepare import prepare_tuxpaint
from imram.workflows.quickstart import MODELS, collapsed_loss, equal_time_section, run_quickstart

pytestmark = pytest.mark.slow

SMALL = ["model.embed_dim=32", "train.epochs=1", "train.batch_size=64", "data.vocab_glove_top=500"]


def test_quickstart_writes_a_report_of_four_models_beside_chance(tmp_path):
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
    lines = (out / "tuxpaint_precomp" / "train_caps.txt").read_text().splitlines()
    assert payload["train_data"] == {
        "images": counts["train"],
        "captions_per_image": len(lines) / counts["train"],
        "words_per_caption": sum(len(line.split()) for line in lines) / len(lines),
    }
    for model in payload["models"]:
        assert 0 <= model["metrics"]["rsum"] <= 600 and model["curve"][0]["epoch"] == 1
    text = result.report_md.read_text()
    assert "| chance |" in text and "Equal training time (Full-IMRAM against VSE++)" in text
    assert "Time to accuracy" in text
    # Results: header, 4 models, two-stage, chance; equal time, Full-IMRAM and MEMBER each
    # against VSE++: header, 2 models; time to accuracy: header, 4 models.
    assert text.count("\n| ") == 18
    assert "Equal training time (MEMBER against VSE++)" in text
    for model in payload["models"]:
        assert model["samples_per_second"] == model["train_samples"] / model["train_seconds"]
        assert model["query_ms"]["t2i"] > 0 and model["query_ms"]["i2t"] > 0
        assert model["query_ms"]["queries"] == 50
    two = payload["two_stage"]
    assert two["model"] == "MEMBER → Full-IMRAM (top 20)" and two["shortlist"] == 20
    assert 0 <= two["metrics"]["rsum"] <= 600 and 0 < two["in_shortlist"]["t2i"] <= 100
    by_name = {m["model"]: m for m in payload["models"]}
    assert two["train_seconds"] == (
        by_name["MEMBER"]["train_seconds"] + by_name["Full-IMRAM"]["train_seconds"]
    )
    assert f"| {two['model']} |" in text and "ms/query t→i / i→t" in text
    reach = payload["time_to_accuracy"]
    vsepp = next(m for m in payload["models"] if m["model"] == "VSE++")
    assert reach["dev_rsum"] == max(c["val_rsum"] for c in vsepp["curve"])
    assert reach["minutes"]["VSE++"] * 60 == seconds_to_reach(vsepp["curve"], reach["dev_rsum"])
    for model in payload["models"]:
        assert model["train_seconds"] == model["curve"][-1]["train_seconds"] > 0
    # A second run reuses the data and the finished runs.
    again = json.loads(run_quickstart(out, overrides=SMALL, progress=False).report_json.read_text())
    for first, second in zip(payload["models"], again["models"], strict=True):
        assert (first["metrics"], first["curve"]) == (second["metrics"], second["curve"])
        assert second["train_seconds"] == first["train_seconds"]  # from the log, not re-timed


def _run(model, seconds_and_rsum, samples=100):
    curve = [
        {"epoch": e + 1, "loss": 1.0, "hardest": True, "val_rsum": r, "train_seconds": t}
        for e, (t, r) in enumerate(seconds_and_rsum)
    ]
    return {"model": model, "curve": curve, "train_samples": samples * len(curve)}


def test_collapsed_loss_and_best_by():
    assert collapsed_loss(32, 0.2, negatives=1) == pytest.approx(12.8)
    assert collapsed_loss(32, 0.2, negatives=0) == pytest.approx(2 * 32 * 31 * 0.2)
    assert collapsed_loss(32, 0.2, negatives=4) == pytest.approx(2 * 32 * 4 * 0.2)
    assert collapsed_loss(4, 0.2, negatives=10) == pytest.approx(2 * 4 * 3 * 0.2)
    curve = _run("a", [(10, 100), (20, 150), (30, 120)])["curve"]
    assert best_by(curve, 5) is None
    assert best_by(curve, 20) == 150 and best_by(curve, 100) == 150
    assert best_by(curve, 15) == 100


def test_time_to_accuracy_against_the_reference_best():
    slow = _run("A", [(60, 200), (120, 300), (180, 310)])
    fast = _run("B", [(6, 250), (12, 280), (18, 270)])
    assert (
        seconds_to_reach(slow["curve"], 280) == 120 and seconds_to_reach(slow["curve"], 311) is None
    )
    assert seconds_to_reach(fast["curve"], 250) == 6
    lines = time_to_accuracy_section([slow, fast], "B")
    assert "reach B's best dev rsum (280.0)" in lines[0]
    assert lines[2].endswith("| min to 280 | min to 90% (252) |")
    assert lines[4] == "| A | 2 | 1.00: 200, 2.00: 300, 3.00: 310 | 310.0 (3.0) | 2.0 | 2.0 |"
    assert lines[5] == "| B | 17 | 0.10: 250, 0.20: 280, 0.30: 270 | 280.0 (0.2) | 0.2 | 0.2 |"
    worse = _run("A", [(60, 200), (120, 230)])
    assert time_to_accuracy_section([worse, fast], "B")[4].endswith(
        "| not reached in 2.0 | not reached in 2.0 |"
    )
    assert time_to_accuracy_section([worse], "B") == []  # no reference: no section


def test_equal_time_verdicts():
    slow_better = _run("A", [(60, 200), (120, 300)])  # 100 samples per 60 s
    fast = _run("B", [(6, 250), (12, 260)])  # 100 samples per 6 s
    lines = equal_time_section([slow_better, fast], "A", "B")
    table = [line for line in lines if line.startswith("| A") or line.startswith("| B")]
    assert table == ["| A | 2 | - | 300 |", "| B | 17 | 260 | 260 |"]
    assert lines[2].endswith("| by 0.20 min | by 2.00 min |")
    verdict = lines[-1]
    assert verdict.startswith("A is not ahead") and "10.0x fewer samples per second" in verdict
    assert "peaked at 300 against 260: it gets ahead, but only with 10x the time" in verdict
    assert "within B's 0.20 min it had not finished its first epoch (done at 1.00 min)" in verdict

    fast_worse = _run("B", [(6, 250), (12, 320)])
    verdict = equal_time_section([slow_better, fast_worse], "A", "B")[-1]
    assert verdict.endswith(
        "peaked at 300 against 320, so more time alone would not close the gap on this data."
    )
    data = {"images": 380, "captions_per_image": 1.0, "words_per_caption": 2.96}
    verdict = equal_time_section([slow_better, fast_worse], "A", "B", data)[-1]
    assert "this data. Its 380 training pictures have 1.0 descriptions each, 3.0 words" in verdict
    assert verdict.endswith("measured below a tuned VSE++ (docs/benchmarks.md, real photos).")

    fast_better = _run("A", [(6, 270), (12, 280)])
    assert equal_time_section([fast_better, fast], "A", "B")[-1] == (
        "A is ahead at equal training time."
    )
    assert equal_time_section([fast], "A", "B") == []  # a model missing: no section


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
