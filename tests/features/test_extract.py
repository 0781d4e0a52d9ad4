"""Grid-feature extraction: image loading, skipped files with reasons, aligned atomic output."""

from __future__ import annotations

import pickle
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from imram.data.tuxpaint import stamps_root
from imram.errors import ConfigError, DataError
from imram.features import (
    ExtractorConfig,
    ImageError,
    extract_features,
    extractor_meta,
    load_efficientnet_lite,
    load_image,
)

# Real stamps of every kind the package holds: RGBA, gray+alpha, palette with a transparent
# index, RGB with a transparent colour, opaque palette. All under 60,000 pixels.
STAMPS = [
    "animals/mammals/dogs/dog.png",
    "animals/mammals/echidna.png",
    "clothes/t_shirt.png",
    "seasonal/easter/chick-hatched.png",
    "town/roadsigns/stoplight_01_red.png",
]
WHITE = (255 - 127) / 128
SMALL = ExtractorConfig(input_size=64, batch_size=3, max_pixels=60_000)


def _normalised(rgb):
    return torch.tensor(rgb, dtype=torch.float32).sub(127).div(128)


@pytest.fixture(scope="module")
def stamps():
    return stamps_root()


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size (CRC fixed, pixel data left as it was)."""
    data = bytearray(png)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _bad_files(root, dog_png):
    """Each kind of unusable file, with the words its reason must contain."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(2000))
    data = dog_png.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    Image.new("L", (60_001, 1), 128).save(root / "wide.png")
    return {
        root / "corrupt.png": "not an image",
        root / "truncated.png": "truncated",
        root / "empty.png": "empty file",
        root / "wide.png": "too many pixels",
        root / "missing.png": "no such file",
    }


def test_bad_files_are_skipped_and_rows_stay_aligned(stamps, tmp_path):
    good = [stamps / name for name in STAMPS]
    bad = _bad_files(tmp_path / "in", good[0])
    corrupt, truncated, empty, wide, missing = bad
    paths = [good[0], corrupt, good[1], truncated, empty, wide, good[2], good[3], good[4], missing]
    out = tmp_path / "out" / "test_ims.npy"
    result = extract_features(paths, out, SMALL, progress=False)

    assert result.kept == [0, 2, 6, 7, 8]
    assert result.grid == (2, 2) and result.dim == 1280
    assert [p for p, _ in result.skipped] == [str(p) for p in bad]
    for (_, reason), words in zip(result.skipped, bad.values(), strict=True):
        assert words in reason
    features = np.load(out)
    assert features.shape == (5, 4, 1280) and features.dtype == np.float32
    assert np.load(out, mmap_mode="r").shape == (5, 4, 1280)
    with open(out, "rb") as handle:  # the unused rows were cut off, the data stays aligned
        assert np.lib.format.read_magic(handle) == (1, 0)
        np.lib.format.read_array_header_1_0(handle)
        assert handle.tell() % 64 == 0
        assert out.stat().st_size == handle.tell() + features.nbytes
    for row, index in enumerate(result.kept):
        alone = tmp_path / f"alone{row}.npy"
        extract_features([paths[index]], alone, SMALL, progress=False)
        np.testing.assert_allclose(features[row], np.load(alone)[0], rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["test_ims.npy"]


def test_output_is_the_feature_grid_in_row_major_order(stamps, tmp_path):
    path = stamps / STAMPS[0]
    config = ExtractorConfig(input_size=96)
    result = extract_features([path], tmp_path / "f.npy", config, progress=False)
    assert result.grid == (3, 3) and result.kept == [0] and result.skipped == []
    model = load_efficientnet_lite(config.backbone)
    with torch.inference_mode():
        grid = model.forward_features(load_image(path, config)[None])[0]
    features = np.load(tmp_path / "f.npy")
    np.testing.assert_allclose(features[0, 1], grid[:, 0, 1].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features[0, 3], grid[:, 1, 0].numpy(), rtol=1e-4, atol=1e-4)


def test_no_readable_image_is_an_error_and_leaves_out_untouched(stamps, tmp_path):
    bad = _bad_files(tmp_path / "in", stamps / STAMPS[0])
    out = tmp_path / "out" / "feats.npy"
    out.parent.mkdir()
    out.write_bytes(b"old")
    with pytest.raises(DataError, match=f"{out}: none of the 5 images is readable"):
        extract_features(list(bad), out, SMALL, progress=False)
    assert out.read_bytes() == b"old"
    assert [p.name for p in out.parent.iterdir()] == ["feats.npy"]
    with pytest.raises(DataError, match="no image paths"):
        extract_features([], out, SMALL, progress=False)


def test_an_existing_output_is_replaced(stamps, tmp_path):
    out = tmp_path / "feats.npy"
    out.write_bytes(b"old")
    extract_features([stamps / STAMPS[1]], out, SMALL, progress=True)
    assert np.load(out).shape == (1, 4, 1280)


def test_header_sizes_are_refused_before_decoding(tmp_path):
    png = tmp_path / "small.png"
    Image.new("RGB", (4, 4)).save(png)
    claims = {"huge.png": (20_000, 3_000), "bomb.png": (100_000, 100_000)}
    for name, (width, height) in claims.items():
        (tmp_path / name).write_bytes(_with_ihdr_size(png.read_bytes(), width, height))
    with pytest.raises(ImageError, match=r"huge.png: too many pixels \(20000x3000"):
        load_image(tmp_path / "huge.png", ExtractorConfig())
    with pytest.raises(ImageError, match="bomb.png: too many pixels") as err:
        load_image(tmp_path / "bomb.png", ExtractorConfig())
    assert isinstance(err.value, DataError) and err.value.reason.startswith("too many pixels")
    roomy = ExtractorConfig(max_pixels=10**12)
    (tmp_path / "warn.png").write_bytes(_with_ihdr_size(png.read_bytes(), 10_000, 10_000))
    for name in ("bomb.png", "warn.png"):
        with pytest.raises(ImageError, match="decompression-bomb guard"):
            load_image(tmp_path / name, roomy)


def test_directory_is_refused_and_errors_pickle(tmp_path):
    with pytest.raises(ImageError, match="a directory") as err:
        load_image(tmp_path, ExtractorConfig())
    copy = pickle.loads(pickle.dumps(err.value))
    assert (copy.path, copy.reason, str(copy)) == (str(tmp_path), err.value.reason, str(err.value))


@pytest.mark.parametrize("mode", ["pad", "stretch", "center_crop"])
def test_resize_modes(tmp_path, mode):
    path = tmp_path / "wide.png"
    Image.new("RGB", (120, 40), (255, 0, 0)).save(path)
    image = load_image(path, ExtractorConfig(input_size=48, resize=mode))
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    red = _normalised((255, 0, 0))
    middle = image[:, 24, 24]
    assert torch.allclose(middle, red, atol=1e-2)
    top = image[:, 0, 24]
    expected_top = torch.full((3,), WHITE) if mode == "pad" else red
    assert torch.allclose(top, expected_top, atol=1e-2)


def test_modes_load_to_rgb_and_transparency_becomes_white(tmp_path):
    config = ExtractorConfig(input_size=32, resize="stretch")
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 10), 200).save(gray)
    palette = tmp_path / "palette.gif"
    Image.new("RGB", (10, 10), (0, 0, 255)).convert("P").save(palette)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(clear)
    wide_gray = tmp_path / "gray16.png"
    Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)).save(wide_gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(cmyk)
    for path, rgb in [
        (gray, (200, 200, 200)),
        (palette, (0, 0, 255)),
        (clear, (255, 255, 255)),
        (wide_gray, (255, 255, 255)),
        (cmyk, (255, 255, 255)),
    ]:
        image = load_image(path, config)
        assert image.shape == (3, 32, 32), path
        expected = _normalised(rgb)
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=2e-2), path


def test_real_stamps_of_every_mode_load_onto_white(stamps):
    config = ExtractorConfig(input_size=64)
    for name in STAMPS:
        image = load_image(stamps / name, config)
        assert image.shape == (3, 64, 64), name
        assert torch.allclose(image[:, 0, 0], torch.full((3,), WHITE)), name


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (40, 20), (255, 0, 0))
    picture.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed after a quarter turn clockwise: the left side goes on top
    path = tmp_path / "turned.jpg"
    picture.save(path, exif=exif, quality=95)
    image = load_image(path, ExtractorConfig(input_size=32, resize="stretch"))
    red, blue = (_normalised(c) for c in [(255, 0, 0), (0, 0, 255)])
    assert torch.allclose(image[:, 4, 16], red, atol=0.1)
    assert torch.allclose(image[:, 28, 16], blue, atol=0.1)


def test_large_jpegs_are_drafted_and_still_sized_exactly(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (0, 128, 0)).save(path)
    for mode in ("pad", "stretch", "center_crop"):
        image = load_image(path, ExtractorConfig(input_size=64, resize=mode))
        assert image.shape == (3, 64, 64)
        assert abs(float(image[1, 32, 32]) - (128 - 127) / 128) < 0.05


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("backbone", "resnet50", "efficientnet_lite0, efficientnet_lite1"),
        ("resize", "squash", "pad, stretch, center_crop"),
        ("input_size", 16, "input_size must be an integer >= 32"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("batch_size", True, "batch_size must be an integer"),
        ("max_pixels", 1.5, "max_pixels must be an integer"),
    ],
)
def test_config_is_validated(field, value, words):
    with pytest.raises(ConfigError, match=words):
        ExtractorConfig(**{field: value})


def test_extractor_meta():
    meta = extractor_meta(ExtractorConfig(backbone="efficientnet_lite2", input_size=320))
    assert meta == {
        "backbone": "efficientnet_lite2",
        "input_size": 320,
        "resize": "pad",
        "normalisation": "(rgb-127)/128",
        "grid": [10, 10],
        "feature_dim": 1280,
        "background": [255, 255, 255],
    }


def test_extractor_from_record_round_trips_and_names_the_bad_field():
    from imram.errors import DataError
    from imram.features.extract import extractor_from_record

    config = ExtractorConfig(backbone="efficientnet_lite2", input_size=320, resize="stretch")
    record = extractor_meta(config)
    again = extractor_from_record(record, 1280, "meta.json")
    assert (again.backbone, again.input_size, again.resize) == (
        "efficientnet_lite2",
        320,
        "stretch",
    )
    cases = [
        (None, "meta.json: no extractor entry"),
        ({**record, "normalisation": "imagenet"}, "extractor.normalisation 'imagenet'"),
        ({**record, "feature_dim": 2048}, "extractor.feature_dim is 2048, the model takes 1280-d"),
        ({**record, "backbone": "resnet"}, "meta.json: extractor."),
    ]
    for entry, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            extractor_from_record(entry, 1280, "meta.json")
