"""Precomp folders: the caption→image rules, memory mapping, collation and every bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from imram.data import PrecompDataset, Vocabulary, collate, find_features, pad_captions
from imram.errors import DataError

WORDS = ["a", "dog", "runs", "on", "grass", "cat"]
VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *WORDS])


def caption(j: int) -> str:
    """Caption j: 1 + j % 4 known words then an unknown one, so lengths differ."""
    return " ".join(WORDS[: 1 + j % 4]) + f" w{j}"


def make_folder(root, split="test", n_images=3, per_image=5, regions=4, dim=6, name="ims"):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_images, regions, dim)).astype(np.float32)
    np.save(root / f"{split}_{name}.npy", features)
    lines = [caption(j) for j in range(n_images * per_image)]
    (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    return features


def _error(tmp_path, split="test"):
    with pytest.raises(DataError) as err:
        PrecompDataset(tmp_path, split, VOCAB)
    return str(err.value)


def test_five_captions_per_image(tmp_path):
    features = make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert (ds.num_images, ds.num_captions, ds.num_regions, ds.feature_dim) == (3, 15, 4, 6)
    assert len(ds) == 15 and ds.root == tmp_path and ds.split == "test"
    assert ds.captions_path == tmp_path / "test_caps.txt"
    assert ds.features_path == tmp_path / "test_ims.npy"
    assert ds.cap2img.dtype == np.int64
    assert ds.cap2img.tolist() == [j // 5 for j in range(15)]
    assert ds.captions[7] == caption(7) and ds.ids is None
    for j in range(15):
        image, tokens, index, i = ds[j]
        assert (index, i) == (j, j // 5)
        assert image.dtype == torch.float32 and tokens.dtype == torch.long
        assert torch.equal(image, torch.from_numpy(features[j // 5]))
        assert tokens.tolist() == VOCAB.encode(caption(j)) == ds.caption_tokens(j)
    assert ds.caption_tokens(7) == [1, 4, 5, 6, 7, 3, 2]
    assert torch.equal(ds.image(2), torch.from_numpy(features[2]))
    assert torch.equal(ds.images([2, 0]), torch.from_numpy(features[[2, 0]]))


def test_items_are_copies_and_negative_indices_resolve(tmp_path):
    features = make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    image, _, j, i = ds[-1]
    assert (j, i) == (14, 2)
    image += 1.0
    assert torch.equal(ds.image(2), torch.from_numpy(features[2]))
    with pytest.raises(IndexError):
        ds[15]
    with pytest.raises(IndexError):
        ds.image(3)
    with pytest.raises(IndexError):
        ds.images([0, 3])
    assert ds[np.int64(5)][2] == 5 and ds[torch.tensor(6)][2] == 6


def test_features_are_memory_mapped(tmp_path):
    make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert isinstance(ds.features, np.memmap)
    assert not ds.features.flags.owndata and not ds.features.flags.writeable


def test_one_caption_per_image_and_feat_name_and_ids(tmp_path):
    features = make_folder(tmp_path, per_image=1, name="feat")
    (tmp_path / "test_ids.txt").write_text("11\n22\r\n 33 \n")
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert ds.features_path == tmp_path / "test_feat.npy"
    assert ds.cap2img.tolist() == [0, 1, 2]
    assert ds.ids == ["11", "22", "33"]
    assert torch.equal(ds[1][0], torch.from_numpy(features[1]))


def test_ims_preferred_over_feat(tmp_path):
    features = make_folder(tmp_path, name="ims")
    np.save(tmp_path / "test_feat.npy", np.zeros((3, 2, 2), dtype=np.float32))
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert find_features(tmp_path, "test") == ds.features_path == tmp_path / "test_ims.npy"
    assert torch.equal(ds.image(0), torch.from_numpy(features[0]))


def test_cap2img_override(tmp_path):
    make_folder(tmp_path, per_image=3)  # 9 captions for 3 images: no rule applies
    np.save(tmp_path / "test_cap2img.npy", np.array([2, 2, 2, 1, 1, 1, 0, 0, 0], dtype=np.int64))
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    assert ds.cap2img.tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert ds[0][3] == 2 and ds[8][3] == 0
    assert torch.equal(ds[0][0], ds.image(2))


def test_cap2img_overrides_a_matching_rule(tmp_path):
    make_folder(tmp_path, per_image=1)
    np.save(tmp_path / "test_cap2img.npy", np.array([1, 2, 0], dtype=np.int64))
    assert PrecompDataset(tmp_path, "test", VOCAB).cap2img.tolist() == [1, 2, 0]


def test_collate_pads_and_keeps_order(tmp_path):
    features = make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    batch = collate([ds[3], ds[0], ds[14]])
    assert batch.images.shape == (3, 4, 6) and batch.images.dtype == torch.float32
    assert torch.equal(batch.images[2], torch.from_numpy(features[2]))
    assert batch.lengths.tolist() == [7, 4, 6]
    assert batch.tokens.shape == (3, 7) and batch.tokens.dtype == torch.long
    assert batch.tokens[0].tolist() == ds.caption_tokens(3)
    assert batch.tokens[1].tolist() == [*ds.caption_tokens(0), 0, 0, 0]
    assert batch.tokens[2].tolist() == [*ds.caption_tokens(14), 0]
    assert batch.caption_index.tolist() == [3, 0, 14]
    assert batch.image_index.tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="at least one item"):
        collate([])


def test_pad_captions():
    tokens, lengths = pad_captions([[1, 9, 2], [1, 2], torch.tensor([1, 5, 6, 2])])
    assert tokens.tolist() == [[1, 9, 2, 0], [1, 2, 0, 0], [1, 5, 6, 2]]
    assert lengths.tolist() == [3, 2, 4] and lengths.dtype == torch.long
    with pytest.raises(ValueError, match="caption 1 has no tokens"):
        pad_captions([[1, 2], []])
    with pytest.raises(ValueError, match="at least one caption"):
        pad_captions([])


def test_layout_without_vocabulary(tmp_path):
    make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", None)
    assert ds.num_captions == 15 and ds.cap2img[-1] == 2
    with pytest.raises(RuntimeError, match="without a vocabulary"):
        ds[0]


def test_pickles_without_the_features(tmp_path):
    make_folder(tmp_path, n_images=50, regions=8, dim=64)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.features.nbytes // 4
    copy = pickle.loads(blob)
    assert isinstance(copy.features, np.memmap)
    assert torch.equal(copy[17][0], ds[17][0]) and torch.equal(copy[17][1], ds[17][1])


def test_dataloader_batches(tmp_path):
    make_folder(tmp_path)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batches = list(loader)
    assert [len(b.caption_index) for b in batches] == [4, 4, 4, 3]
    assert torch.cat([b.image_index for b in batches]).tolist() == ds.cap2img.tolist()


# Bad inputs: each error names the file (full path) and the line or index where it applies.


def test_missing_captions(tmp_path):
    make_folder(tmp_path)
    message = _error(tmp_path, "dev")
    assert message.startswith(f"{tmp_path}: split 'dev' not found")
    assert "dev_caps.txt and dev_ims.npy or dev_feat.npy missing" in message


def test_missing_features(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test_ims.npy").unlink()
    message = _error(tmp_path)
    assert message == f"{tmp_path}: split 'test' not found: test_ims.npy or test_feat.npy missing"
    with pytest.raises(DataError, match="test_ims.npy or test_feat.npy missing"):
        find_features(tmp_path, "test")


def test_missing_folder(tmp_path):
    message = _error(tmp_path / "nowhere")
    assert message.startswith(f"{tmp_path / 'nowhere'} (no such folder): split 'test'")


@pytest.mark.parametrize("n_captions", [0, 2, 7, 9, 12, 30])
def test_counts_that_do_not_match_a_rule(tmp_path, n_captions):
    make_folder(tmp_path)
    (tmp_path / "test_caps.txt").write_text("a dog\n" * n_captions)
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'test_caps.txt'}: {n_captions} captions for 3 images")
    assert "test_cap2img.npy" in message


def test_bad_caption_line_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test_caps.txt").write_bytes(b"a\nb\n\xff\xfe\n")
    assert _error(tmp_path).startswith(f"{tmp_path / 'test_caps.txt'}, line 3: not valid UTF-8")
    (tmp_path / "test_caps.txt").write_bytes(b"a\n \nc\n")
    assert _error(tmp_path).startswith(f"{tmp_path / 'test_caps.txt'}, line 2: empty caption")


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((3, 4, 6), dtype=np.float64), "features must be float32, found float64"),
        (np.zeros((3, 4, 6), dtype=np.float16), "features must be float32, found float16"),
        (np.zeros((3, 4, 6), dtype=">f4"), "features must be float32, found >f4"),
        (
            np.zeros((3, 24), dtype=np.float32),
            "must be 3-D [images, regions, dim], found shape (3, 24)",
        ),
        (
            np.zeros((3, 0, 6), dtype=np.float32),
            "at least one image, region and dimension, found shape (3, 0, 6)",
        ),
        (np.array(["x"], dtype=object), "not a readable .npy array"),
    ],
)
def test_bad_feature_arrays(tmp_path, array, message):
    make_folder(tmp_path)
    np.save(tmp_path / "test_ims.npy", array, allow_pickle=True)
    text = _error(tmp_path)
    assert text.startswith(f"{tmp_path / 'test_ims.npy'}: ") and message in text


def test_truncated_npy(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "test_ims.npy"
    path.write_bytes(path.read_bytes()[:100])
    assert _error(tmp_path).startswith(f"{path}: not a readable .npy array")
    path.write_bytes(b"")
    assert _error(tmp_path).startswith(f"{path}: not a readable .npy array")


def test_npz_in_place_of_npy(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "test_ims.npy"
    with path.open("wb") as handle:
        np.savez(handle, x=np.zeros((3, 4, 6), dtype=np.float32))
    assert _error(tmp_path).startswith(f"{path}: expected a single .npy array")


def test_ids_count_mismatch(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test_ids.txt").write_text("1\n2\n")
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'test_ids.txt'}: 2 ids but test_ims.npy has 3 images")


def test_ids_empty_line(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test_ids.txt").write_text("1\n\n3\n")
    assert _error(tmp_path).startswith(f"{tmp_path / 'test_ids.txt'}, line 2: empty id")


@pytest.mark.parametrize(
    "cap2img,message",
    [
        (np.array([0] * 5 + [1] * 5 + [7] * 5), "caption 10 points to image 7, outside [0, 3)"),
        (np.array([0] * 5 + [-1] + [1] * 4 + [2] * 5), "caption 5 points to image -1"),
        (np.arange(14) // 5, "expected int64 of shape (15,)"),
        (np.arange(16) // 6, "found int64 (16,)"),
        ((np.arange(15) // 5).astype(np.int32), "found int32 (15,)"),
        (np.arange(15, dtype=np.float64) // 5, "found float64 (15,)"),
        ((np.arange(15) // 5).reshape(15, 1), "found int64 (15, 1)"),
        (np.array([0] * 10 + [2] * 5), "image 1 has no caption"),
    ],
)
def test_bad_cap2img(tmp_path, cap2img, message):
    make_folder(tmp_path)
    np.save(tmp_path / "test_cap2img.npy", cap2img)
    text = _error(tmp_path)
    assert text.startswith(f"{tmp_path / 'test_cap2img.npy'}: ") and message in text


def test_truncated_cap2img(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "test_cap2img.npy"
    np.save(path, np.arange(15) // 5)
    path.write_bytes(path.read_bytes()[:-8])
    assert _error(tmp_path).startswith(f"{path}: not a readable .npy array")


@pytest.fixture
def nan_folder(tmp_path):
    features = make_folder(tmp_path, n_images=5)
    features[2, 1, 3] = np.nan
    np.save(tmp_path / "test_ims.npy", features)
    return tmp_path


def test_nan_features_are_caught_when_read(nan_folder):
    ds = PrecompDataset(nan_folder, "test", VOCAB)  # opening does not scan the file
    expected = f"{nan_folder / 'test_ims.npy'}: image 2 has NaN or inf features"
    assert ds[9][0].shape == (4, 6) and ds[15][0].shape == (4, 6)
    for read in (lambda: ds[10], lambda: ds[14], lambda: ds.image(2), lambda: ds.images([4, 2])):
        with pytest.raises(DataError) as err:
            read()
        assert str(err.value) == expected


@pytest.mark.parametrize("chunk", [1, 2, 3, 1024])
def test_check_finite_names_first_bad_image(nan_folder, chunk):
    features = np.load(nan_folder / "test_ims.npy")
    features[4, 0, 0] = -np.inf
    np.save(nan_folder / "test_ims.npy", features)
    ds = PrecompDataset(nan_folder, "test", VOCAB)
    with pytest.raises(DataError) as err:
        ds.check_finite(chunk_images=chunk)
    assert str(err.value) == f"{nan_folder / 'test_ims.npy'}: image 2 has NaN or inf features"


def test_check_finite_inf_and_clean(tmp_path):
    features = make_folder(tmp_path, n_images=4)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    ds.check_finite(chunk_images=3)
    features[3, 3, 5] = np.inf
    np.save(tmp_path / "test_ims.npy", features)
    ds = PrecompDataset(tmp_path, "test", VOCAB)
    with pytest.raises(DataError, match="image 3 has NaN or inf"):
        ds.check_finite(chunk_images=3)
    with pytest.raises(ValueError, match="chunk_images"):
        ds.check_finite(chunk_images=0)
