"""``prepare_folder`` end to end on real tiny images: alignment, losses, splits and safety."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from imram.data import PrecompDataset
from imram.data.formats import CaptionRecord, DroppedImage
from imram.errors import ConfigError, DataError
from imram.features.extract import ExtractorConfig, extract_features, extractor_meta
from imram.workflows.prepare import (
    FORMAT_VERSION,
    ImageEntry,
    PrepareReport,
    SplitCounts,
    assign_splits,
    group_captions,
    hash_split,
    prepare_folder,
)

CONFIG = ExtractorConfig(input_size=64, batch_size=4)


def _image(path, seed: int, size=(40, 30)) -> None:
    """A noise picture (distinct per seed) saved as PNG or JPEG by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _captions(image: str, n: int) -> list[str]:
    return [f"{image} caption {k}" for k in range(n)]


# (image, split, number of captions, how it is stored: png/jpg, corrupt, truncated, missing)
IMAGES = [
    ("a.png", "train", 5, "ok"),
    ("sub/b.jpg", "train", 5, "ok"),
    ("c.png", "train", 3, "ok"),
    ("d.jpg", "train", 7, "ok"),
    ("corrupt.png", "train", 5, "corrupt"),
    ("missing.jpg", "train", 2, "missing"),
    ("e.png", "dev", 5, "ok"),
    ("f.jpg", "test", 5, "ok"),
    ("trunc.jpg", "test", 4, "truncated"),
    ("g.png", "test", 1, "ok"),
]


def _make_images(root) -> None:
    for seed, (name, _, _, kind) in enumerate(IMAGES):
        path = root / name
        if kind == "ok":
            _image(path, seed, size=(40 + 3 * seed, 30))
        elif kind == "corrupt":
            path.write_bytes(b"this is not a picture")
        elif kind == "truncated":
            _image(path, seed, size=(96, 96))
            path.write_bytes(path.read_bytes()[:1500])


def _csv(path) -> None:
    """image,caption,split rows; d.jpg's captions come in two runs to test the grouping."""
    rows = []
    for name, split, n, _ in IMAGES:
        captions = _captions(name, n)
        if name == "d.jpg":
            rows.insert(2, (name, captions[0], split))
            captions = captions[1:]
        rows += [(name, caption, split) for caption in captions]
    lines = ["image,caption,split"] + [f'{n},"{c}, quoted",{s}' for n, c, s in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    _make_images(root / "images")
    _csv(root / "caps.csv")
    report = prepare_folder(
        root / "images", root / "caps.csv", None, root / "out", CONFIG, progress=False
    )
    return root, report


def test_counts_and_skipped_images(prepared):
    root, report = prepared
    assert report.out == root / "out"
    assert report.splits == {
        "train": SplitCounts(4, 20),
        "dev": SplitCounts(1, 5),
        "test": SplitCounts(2, 6),
    }
    skipped = {(s.image, s.split, s.captions): s.reason for s in report.skipped}
    assert skipped == {
        ("corrupt.png", "train", 5): "not an image (unrecognised or corrupt format)",
        ("missing.jpg", "train", 2): "no such file",
        ("trunc.jpg", "test", 4): "truncated file",
    }
    assert {s.path for s in report.skipped} == {
        str(root / "images" / n) for n in ("corrupt.png", "missing.jpg", "trunc.jpg")
    }
    assert report.dropped == [] and report.capped == []
    summary = report.summary()
    assert summary.startswith(f"wrote {root / 'out'}: train 4 images / 20 captions, dev 1 images")
    assert "skipped 3 image(s) and their 11 caption(s):" in summary
    assert f"test: {root / 'images' / 'trunc.jpg'}: truncated file" in summary


def test_written_folder_loads_and_captions_align(prepared):
    root, _ = prepared
    expected = {name: [f"{c}, quoted" for c in _captions(name, n)] for name, _, n, _ in IMAGES}
    names = {
        "train": ["a.png", "d.jpg", "sub/b.jpg", "c.png"],
        "dev": ["e.png"],
        "test": ["f.jpg", "g.png"],
    }
    for split, images in names.items():
        ds = PrecompDataset(root / "out", split, None)
        assert ds.ids == images
        assert ds.features.shape == (len(images), CONFIG.grid[0] * CONFIG.grid[1], 1280)
        assert ds.captions == [c for image in images for c in expected[image]]
        assert ds.cap2img.tolist() == [i for i, im in enumerate(images) for _ in expected[im]]
    train = PrecompDataset(root / "out", "train", None)
    assert np.flatnonzero(train.cap2img == 1).tolist() == list(range(5, 12))  # d.jpg's 7, in a run


@pytest.mark.parametrize("split,image", [("train", "d.jpg"), ("train", "c.png"), ("test", "g.png")])
def test_feature_row_is_the_image_alone(prepared, tmp_path, split, image):
    root, _ = prepared
    ds = PrecompDataset(root / "out", split, None)
    alone = extract_features([root / "images" / image], tmp_path / "one.npy", CONFIG, False)
    assert alone.kept == [0]
    row = ds.features[ds.ids.index(image)]
    np.testing.assert_allclose(row, np.load(tmp_path / "one.npy")[0], rtol=1e-4, atol=1e-4)
    for j in np.flatnonzero(ds.cap2img == ds.ids.index(image)):
        assert ds.captions[j].startswith(f"{image} caption")


def test_meta_json(prepared):
    root, report = prepared
    meta = json.loads((root / "out" / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["source"] == {
        "format": "csv",
        "captions": str((root / "caps.csv").resolve()),
        "images": str((root / "images").resolve()),
    }
    assert meta["extractor"] == extractor_meta(CONFIG)
    assert "always written" in meta["caption_rule"]["rule"]
    assert meta["split_rule"]["given"] == 10 and meta["split_rule"]["hashed"] == 0
    train = meta["splits"]["train"]
    assert train["images"] == ["a.png", "d.jpg", "sub/b.jpg", "c.png"]
    assert train["captions_per_image"] == {"3": 1, "5": 2, "7": 1}
    assert (train["num_images"], train["num_captions"]) == (4, 20)
    assert train["features"] == {"grid": list(CONFIG.grid), "regions": 4, "dim": 1280}
    assert [(s["image"], s["reason"]) for s in meta["skipped"]] == [
        (s.image, s.reason) for s in report.skipped
    ]
    assert {s["image"] for s in meta["skipped"]} == {"corrupt.png", "missing.jpg", "trunc.jpg"}


def test_overwrite_flickr8k_then_hashed_tsv(tmp_path):
    """A Flickr8k folder with split files, refused without overwrite, then replaced."""
    images = tmp_path / "images"
    names = ["p.jpg", "q.jpg", "r.png", "s.png"]
    for seed, name in enumerate(names):
        _image(images / name, 100 + seed)
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("".join(f"{n}#{k}\t{n} says {k}\n" for n in names for k in range(2)))
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("p.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("q.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("r.png\n")
    out = tmp_path / "out"
    report = prepare_folder(images, token, None, out, CONFIG, progress=False)
    reason = (
        "in no Flickr8k split file (Flickr_8k.devImages.txt, Flickr_8k.testImages.txt, "
        "Flickr_8k.trainImages.txt)"
    )
    assert report.dropped == [DroppedImage("s.png", 2, reason)]
    assert "dropped 1 image(s) of the caption file (2 captions):" in report.summary()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dropped"] == [{"image": "s.png", "captions": 2, "reason": reason}]
    assert PrecompDataset(out, "dev", None).ids == ["q.jpg"]

    tsv = tmp_path / "caps.tsv"
    tsv.write_text("".join(f"{n}\t{n} is {k}\n" for n in names for k in range(3)))
    with pytest.raises(DataError) as err:
        prepare_folder(images, tsv, None, out, CONFIG, progress=False)
    assert str(err.value).startswith(f"{out}: already holds a precomp folder (dev_cap2img.npy")
    assert json.loads((out / "meta.json").read_text()) == meta  # nothing touched

    splits = {n: hash_split(n, 0.0, 0.5, "s1") for n in names}
    assert set(splits.values()) == {"train", "test"}  # this seed puts images in both
    report = prepare_folder(
        images, tsv, "tsv", out, CONFIG, 0.0, 0.5, "s1", False,
        overwrite=True, max_captions_per_image=2,
    )  # fmt: skip
    assert not any(out.glob("dev_*")) and "split dev has no image; dev files not written" in (
        report.notes
    )
    assert [(c.image, c.kept, c.dropped) for c in report.capped] == [(n, 2, 1) for n in names]
    for split in ("train", "test"):
        ds = PrecompDataset(out, split, None)
        assert ds.ids == [n for n in names if splits[n] == split]
        assert ds.captions == [f"{n} is {k}" for n in ds.ids for k in range(2)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["format"] == "tsv" and meta["dropped"] == []
    assert meta["caption_rule"]["max_captions_per_image"] == 2
    assert meta["split_rule"]["hashed"] == 4 and meta["split_rule"]["seed"] == "s1"
    assert len(meta["capped"]) == 4 and "capped 4 image(s), 4 caption(s)" in report.summary()


@pytest.mark.parametrize("name", ["../x.png", "/etc/x.png", "a/../../x.png", "C:\\x.png", "\\x"])
def test_names_outside_the_images_folder(tmp_path, name):
    (tmp_path / "images").mkdir()
    caps = tmp_path / "caps.csv"
    caps.write_text(f'image,caption,split\nok.png,fine,train\n"{name}",bad,test\n')
    with pytest.raises(DataError) as err:
        prepare_folder(tmp_path / "images", caps, "csv", tmp_path / "out", CONFIG)
    assert str(err.value).startswith(f"{caps}:3: image name {name!r} leads outside the images")
    assert not (tmp_path / "out").exists()


def test_empty_test_split_and_unreadable_split(tmp_path):
    (tmp_path / "images").mkdir()
    _image(tmp_path / "images" / "t.png", 1)
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption,split\na.png,x,train\nb.png,y,dev\n")
    with pytest.raises(DataError, match="no image in split 'test' \\(2 images in all\\)"):
        prepare_folder(tmp_path / "images", caps, None, tmp_path / "out", CONFIG)
    caps.write_text("image,caption,split\na.png,x,train\nt.png,y,test\n")
    with pytest.raises(DataError) as err:
        prepare_folder(tmp_path / "images", caps, None, tmp_path / "out", CONFIG)
    assert str(err.value) == (
        f"split train: none of its 1 image(s) could be read (first: "
        f"{tmp_path / 'images' / 'a.png'}: no such file); expected readable image files"
    )
    assert not (tmp_path / "out" / "meta.json").exists()
    with pytest.raises(DataError, match="images folder not found"):
        prepare_folder(tmp_path / "nowhere", caps, None, tmp_path / "out", CONFIG)
    with pytest.raises(ConfigError, match="max_captions_per_image=0"):
        prepare_folder(
            tmp_path / "images", caps, None, tmp_path / "o2", CONFIG, max_captions_per_image=0
        )


# grouping and splitting, without images


def _record(image, caption, split, line):
    return CaptionRecord(image, caption, split, f"caps.csv:{line}")


def test_group_captions_keeps_first_seen_order():
    records = [
        _record("b", "b0", None, 2),
        _record("a", "a0", None, 3),
        _record("b", "b1", None, 4),
    ]
    assert group_captions(records) == [
        ImageEntry("b", ["b0", "b1"], None, "caps.csv:2"),
        ImageEntry("a", ["a0"], None, "caps.csv:3"),
    ]


def test_group_captions_refuses_two_splits():
    records = [_record("a", "x", "train", 2), _record("b", "y", None, 3)]
    records.append(_record("a", "z", "test", 9))
    with pytest.raises(DataError) as err:
        group_captions(records)
    assert str(err.value) == (
        "caps.csv:9: image 'a' is in split test here but in split train at caps.csv:2; "
        "expected one split per image"
    )
    with pytest.raises(DataError, match="caps.csv:3: image 'b' is in split train here but in"):
        group_captions([_record("b", "y", None, 2), _record("b", "y", "train", 3)])


def _unsplit(names):
    return [ImageEntry(n, ["c"], None) for n in names]


def test_hash_split_is_stable_under_order_and_other_images():
    names = [f"img_{i:05d}.jpg" for i in range(3000)]
    full = {e.image: e.split for e in assign_splits(_unsplit(names))}
    counts = {s: sum(v == s for v in full.values()) for s in ("train", "dev", "test")}
    assert 240 < counts["dev"] < 360 and 240 < counts["test"] < 360
    subset = random.Random(0).sample(names, 500) + ["new_1.jpg", "new_2.png"]
    assert all(full[e.image] == e.split for e in assign_splits(_unsplit(subset)) if e.image in full)
    assert all(hash_split(n, 0.1, 0.1, "imram") == full[n] for n in names[:50])
    other = {e.image: e.split for e in assign_splits(_unsplit(names), seed="other")}
    assert sum(other[n] != full[n] for n in names) > 500


def test_given_splits_kept_and_caps():
    entries = [ImageEntry("given", ["c"], "dev"), *_unsplit(f"n{i}" for i in range(400))]
    uncapped = assign_splits(entries, 0.2, 0.2, "s")
    capped = assign_splits(entries, 0.2, 0.2, "s", max_dev_images=3, max_test_images=0)
    assert uncapped[0].split == capped[0].split == "dev"
    dev = [e.image for e in capped[1:] if e.split == "dev"]
    assert len(dev) == 3 and not any(e.split == "test" for e in capped)
    assert set(dev) <= {e.image for e in uncapped if e.split == "dev"}
    for bad in [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)]:
        with pytest.raises(ConfigError, match="expected each in"):
            assign_splits(entries, *bad)
    with pytest.raises(ConfigError, match="max_dev_images=-1"):
        assign_splits(entries, max_dev_images=-1)


def test_report_summary_lists_at_most_ten(tmp_path):
    from imram.workflows.prepare import SkippedImage

    report = PrepareReport(tmp_path, {"train": SplitCounts(1, 5), "test": SplitCounts(1, 1)})
    report.skipped = [SkippedImage(f"i{k}", "train", f"/x/i{k}", "bad", 1) for k in range(12)]
    report.notes.append("split dev has no image; dev files not written")
    lines = report.summary().splitlines()
    assert lines[0] == f"wrote {tmp_path}: train 1 images / 5 captions, test 1 images / 1 captions"
    assert lines[1] == "skipped 12 image(s) and their 12 caption(s):"
    assert lines[2:12] == [f"  train: /x/i{k}: bad" for k in range(10)]
    assert lines[12] == "  ... and 2 more (all in meta.json)"
    assert lines[13] == "note: split dev has no image; dev files not written"
