"""Precomp folders: the caption→image rules, memory mapping, collation and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram.data import PrecompDataset, Vocabulary, collate, pad_captions
from imram.errors import DataError

VOCAB = Vocabulary.build(["a dog runs on grass", "a cat"], threshold=1)


def make_folder(root, split="test", n_images=3, per_image=5, regions=4, dim=6, name="ims"):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_images, regions, dim)).astype(np.float32)
    np.save(root / f"{split}_{name}.npy", features)
    lines = [f"a dog runs {j}" for j in range(n_images * per_image)]
    (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    return features


def test_five_captions_per_image(tmp_path):
    features = make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert (ds.num_images, ds.num_captions, ds.num_regions, ds.feature_dim) == (3, 15, 4, 6)
    assert ds.cap2img.tolist() == [j // 5 for j in range(15)]
    image, tokens, j, i = ds[7]
    assert (j, i) == (7, 1)
    assert torch.equal(image, torch.from_numpy(features[1]))
    assert tokens.tolist() == VOCAB.encode("a dog runs 7")
    assert isinstance(ds.features, np.memmap)
    assert ds.ids is None


def test_one_caption_per_image_and_feat_name_and_ids(tmp_path):
    make_folder(tmp_path, per_image=1, name="feat")
    (tmp_path / "test_ids.txt").write_text("11\n22\n33\n")
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert ds.features_path.name == "test_feat.npy"
    assert ds.cap2img.tolist() == [0, 1, 2]
    assert ds.ids == ["11", "22", "33"]


def test_cap2img_override(tmp_path):
    make_folder(tmp_path, per_image=3)
    np.save(tmp_path / "test_cap2img.npy", np.repeat(np.arange(3), 3)[::-1].copy())
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert ds.cap2img.tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert ds[0][3] == 2


def test_collate_pads_and_keeps_order(tmp_path):
    make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    ds.tokens[3] = [1, 4, 2]
    batch = collate([ds[3], ds[0], ds[14]])
    assert batch.images.shape == (3, 4, 6)
    assert batch.lengths.tolist() == [3, 6, 6]
    assert batch.tokens[0].tolist() == [1, 4, 2, 0, 0, 0]
    assert batch.caption_index.tolist() == [3, 0, 14]
    assert batch.image_index.tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="no empty caption"):
        pad_captions([[1, 2], []])


def _error(tmp_path, split="test"):
    with pytest.raises(DataError) as err:
        PrecompDataset(tmp_path, split, VOCAB)
    return str(err.value)


def test_missing_split(tmp_path):
    make_folder(tmp_path)
    message = _error(tmp_path, "dev")
    assert "split 'dev' has no captions (dev_caps.txt not found)" in message
    (tmp_path / "test_ims.npy").unlink()
    message = _error(tmp_path)
    assert "test_ims.npy or test_feat.npy not found" in message and str(tmp_path) in message


@pytest.mark.parametrize("n_captions", [7, 9])
def test_counts_that_do_not_match_a_rule(tmp_path, n_captions):
    make_folder(tmp_path)
    (tmp_path / "test_caps.txt").write_text("a dog\n" * n_captions)
    message = _error(tmp_path)
    assert "test_caps.txt" in message and f"{n_captions} captions for 3 images" in message
    assert "test_cap2img.npy" in message


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((3, 4, 6), dtype=np.float64), "features must be float32, found float64"),
        (
            np.zeros((3, 24), dtype=np.float32),
            "must be 3-D [images, regions, dim], found shape (3, 24)",
        ),
    ],
)
def test_bad_feature_arrays(tmp_path, array, message):
    make_folder(tmp_path)
    np.save(tmp_path / "test_ims.npy", array)
    text = _error(tmp_path)
    assert "test_ims.npy" in text and message in text


def test_truncated_npy(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "test_ims.npy"
    path.write_bytes(path.read_bytes()[:100])
    assert "test_ims.npy: not a readable .npy array" in _error(tmp_path)


def test_ids_count_mismatch(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test_ids.txt").write_text("1\n2\n")
    assert "test_ids.txt: 2 ids for 3 images" in _error(tmp_path)


@pytest.mark.parametrize(
    "cap2img,message",
    [
        (np.array([0] * 5 + [1] * 5 + [7] * 5), "caption 10 points to image 7, outside [0, 3)"),
        (np.arange(14) // 5, "expected int64 of shape (15,)"),
        ((np.arange(15) // 5).astype(np.int32), "found int32"),
        (np.array([0] * 10 + [2] * 5), "image 1 has no caption"),
    ],
)
def test_bad_cap2img(tmp_path, cap2img, message):
    make_folder(tmp_path)
    np.save(tmp_path / "test_cap2img.npy", cap2img)
    text = _error(tmp_path)
    assert message in text
    assert "test_cap2img.npy" in text or "test_caps.txt" in text


def test_bad_caption_line_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test_caps.txt").write_bytes(b"a\nb\n\xff\xfe\n")
    assert "test_caps.txt, line 3: not valid UTF-8" in _error(tmp_path)


def test_nan_features_are_caught_when_read(tmp_path):
    features = make_folder(tmp_path)
    features[2, 1, 3] = np.nan
    np.save(tmp_path / "test_ims.npy", features)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert ds[0][0].shape == (4, 6)
    with pytest.raises(DataError, match=r"test_ims.npy: image 2 has NaN or inf"):
        ds[12]
    with pytest.raises(DataError, match=r"test_ims.npy: image 2 has NaN or inf"):
        ds.images([0, 2])
    with pytest.raises(DataError, match=r"test_ims.npy: image 2 has NaN or inf"):
        ds.check_finite(chunk_images=2)
    features[2, 1, 3] = np.inf
    np.save(tmp_path / "test_ims.npy", features)
    with pytest.raises(DataError, match="image 2"):
        PrecompDataset(tmp_path, "test", VOCAB).check_finite()
