"""Grid features of image files: decode, resize, run EfficientNet-Lite, stream rows to a .npy.

Each kept image becomes one ``[h*w, 1280]`` float32 row of regions in row-major grid order,
the layout of a precomp folder's ``{split}_ims.npy``. Files that cannot be used are skipped
with a reason instead of stopping the run; the output holds the kept rows in input order.
"""

from __future__ import annotations

import logging
import struct
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from imram.devices import resolve_device
from imram.errors import ConfigError, DataError
from imram.features.efficientnet_lite import (
    HEAD_CHANNELS,
    VARIANTS,
    EfficientNetLite,
    grid_shape,
    load_efficientnet_lite,
)
from imram.files import atomic_output

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
NORMALISATION = "(rgb-127)/128"
RESIZE_MODES = ("pad", "stretch", "center_crop")
MIN_INPUT_SIZE = 32
ORIENTATION_TAG = 0x0112
_RESAMPLE = Image.Resampling.BICUBIC
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(DataError):
    """An image file cannot be used: unreadable, not an image, truncated, empty or too large."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        return type(self), (self.path, self.reason)


Decoded = tuple[int, torch.Tensor | ImageError]


@dataclass
class ExtractorConfig:
    """How images become grid features.

    ``resize``: ``"pad"`` pads to a square with the background colour, then resizes (the whole
    picture, undistorted); ``"stretch"`` resizes to a square ignoring the aspect ratio;
    ``"center_crop"`` resizes the shorter side then keeps the central square. Images with more
    than ``max_pixels`` pixels are skipped before they are decoded (decompression bombs).
    """

    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    batch_size: int = 32
    resize: str = "pad"
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        if self.backbone not in VARIANTS:
            raise ConfigError(
                f"extractor backbone {self.backbone!r} is unknown; valid: {', '.join(VARIANTS)}"
            )
        if self.resize not in RESIZE_MODES:
            raise ConfigError(
                f"extractor resize {self.resize!r} is unknown; valid: {', '.join(RESIZE_MODES)}"
            )
        for name, low in (
            ("input_size", MIN_INPUT_SIZE),
            ("batch_size", 1),
            ("max_pixels", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"extractor {name} must be an integer >= {low}, got {value!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of the region grid an image becomes."""
        return grid_shape(self.input_size, self.input_size)


@dataclass
class ExtractResult:
    """What ``extract_features`` wrote: indices of the kept paths (one output row each, in
    order), the skipped paths with reasons, the region grid and the feature dimension."""

    kept: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    dim: int = HEAD_CHANNELS


def extractor_meta(config: ExtractorConfig) -> dict[str, Any]:
    """The ``extractor`` entry of a precomp folder's ``meta.json``: enough to reproduce the rows."""
    return {
        "backbone": config.backbone,
        "input_size": config.input_size,
        "resize": config.resize,
        "normalisation": NORMALISATION,
        "grid": list(config.grid),
        "feature_dim": HEAD_CHANNELS,
        "background": list(BACKGROUND),
    }


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, with any transparency composited onto the background colour."""
    if image.mode in _WIDE_GRAY_MODES:
        gray = np.asarray(image).astype(np.float32)
        scale = 257.0 if image.mode != "I" or gray.max() > 255 else 1.0
        image = Image.fromarray(np.clip(gray / scale + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    """A ``size`` x ``size`` picture made by ``mode`` (see ``ExtractorConfig``)."""
    width, height = image.size
    if mode == "stretch":
        return image.resize((size, size), _RESAMPLE, reducing_gap=3.0)
    if mode == "center_crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        return image.resize((size, size), _RESAMPLE, box=box, reducing_gap=3.0)
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(inner, _RESAMPLE, reducing_gap=3.0)
    if inner == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(resized, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas


def _decode(path: Path, config: ExtractorConfig) -> Image.Image:
    """Open, check the header's size against the limit, decode, orient and convert to RGB."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(path, f"zero-size image ({width}x{height})")
        if width * height > config.max_pixels:
            raise ImageError(
                path,
                f"too many pixels ({width}x{height} = {width * height:,} > "
                f"max_pixels {config.max_pixels:,})",
            )
        if image.format == "JPEG":
            image.draft(None, (config.input_size, config.input_size))
        image.load()
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def extractor_from_record(entry: Any, img_dim: int, source: str) -> ExtractorConfig:
    """The extractor a prepared folder's ``meta.json`` ``extractor`` record describes, so that a
    query image is turned into features the same way; a DataError naming ``source`` and the
    field when there is no record or it does not fit a model taking ``img_dim``-d regions."""
    if not isinstance(entry, dict):
        raise DataError(
            f"{source}: no extractor entry (features not made by imram prepare), so an image "
            "file cannot be turned into features the same way"
        )
    if entry.get("normalisation") != NORMALISATION:
        raise DataError(
            f"{source}: extractor.normalisation {entry.get('normalisation')!r} is not this "
            f"imram's {NORMALISATION!r}"
        )
    if entry.get("feature_dim") != img_dim:
        raise DataError(
            f"{source}: extractor.feature_dim is {entry.get('feature_dim')!r}, the model takes "
            f"{img_dim}-d regions"
        )
    try:
        return ExtractorConfig(
            backbone=entry.get("backbone"),
            input_size=entry.get("input_size"),
            batch_size=1,
            resize=entry.get("resize"),
        )
    except ConfigError as err:
        raise DataError(f"{source}: extractor.{err}") from None


def load_image(path: str | Path, config: ExtractorConfig) -> torch.Tensor:
    """One image file as a float32 ``[3, S, S]`` tensor normalised as (rgb - 127) / 128.

    Transparency goes onto white; grayscale, palette and CMYK become RGB; EXIF orientation is
    applied; resizing is bicubic (antialiased when shrinking). Raises ``ImageError`` with the
    reason a file cannot be used.
    """
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _decode(path, config)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        reason = f"too many pixels for Pillow's decompression-bomb guard ({err})"
        raise ImageError(path, reason) from None
    except OSError as err:
        if "truncated" in str(err).lower():
            raise ImageError(path, "truncated file") from None
        raise ImageError(path, f"unreadable ({err})") from None
    except (ValueError, SyntaxError, EOFError, struct.error, MemoryError) as err:
        raise ImageError(path, f"unreadable ({type(err).__name__}: {err})") from None
    pixels = np.asarray(_resize(image, config.input_size, config.resize), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).sub(127.0).div_(128.0).contiguous()


def _batches(paths: Sequence[str | Path], config: ExtractorConfig) -> Iterator[list[Decoded]]:
    """Decoded batches in input order: each path as its tensor or the error that stopped it.

    Decoding stays on the calling thread: a stamp-sized PNG takes about 2 ms against about
    40 ms of network per image on two CPU cores, so overlapping them would gain little.
    """
    for start in range(0, len(paths), config.batch_size):
        batch: list[Decoded] = []
        for index in range(start, min(start + config.batch_size, len(paths))):
            try:
                batch.append((index, load_image(paths[index], config)))
            except ImageError as err:
                batch.append((index, err))
        yield batch


def _regions(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map's cells as regions, row-major: ``[B, h*w, channels]``."""
    return network.forward_features(x).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class TrunkOutput:
    """A trunk cache's rows: what enters the last ``stages`` stages, stored as ``dtype``, of
    the pictures or (``flip``) of their mirror images."""

    stages: int
    dtype: str = "float16"
    flip: bool = False


def trunk_shape(network: EfficientNetLite, config: ExtractorConfig, stages: int) -> tuple[int, ...]:
    """``(channels, rows, columns)`` of one picture's trunk output at the configured size."""
    device = next(network.parameters()).device
    probe = torch.zeros(1, 3, config.input_size, config.input_size, device=device)
    with torch.inference_mode():
        return tuple(network.forward_trunk(probe, stages).shape[1:])


def _trunk(network: EfficientNetLite, trunk: TrunkOutput, x: torch.Tensor) -> torch.Tensor:
    return network.forward_trunk(x.flip(-1) if trunk.flip else x, trunk.stages)


def _shrink_rows(path: Path, rows: int) -> None:
    """Cut a C-order .npy to its first ``rows`` rows in place: rewrite the header's shape,
    padded to the same length so the data offset is unchanged, then truncate the file."""
    with open(path, "r+b") as handle:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(handle)
        offset = handle.tell()
        new_shape = (rows, *shape[1:])
        header = repr(
            {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": new_shape}
        )
        magic = npy_format.magic(*version)
        length_format = "<H" if version == (1, 0) else "<I"
        room = offset - len(magic) - struct.calcsize(length_format)
        if len(header) + 1 > room:
            raise DataError(f"{path}: new header does not fit in place")
        text = (header + " " * (room - len(header) - 1) + "\n").encode("latin1")
        handle.seek(0)
        handle.write(magic + struct.pack(length_format, room) + text)
        handle.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _report(bar: tqdm, message: str) -> None:
    """A warning for the user: above the progress bar when there is one, else to the log."""
    if bar.disable:
        logger.warning(message)
    else:
        bar.write(message, file=sys.stderr)


def extract_features(
    paths: Sequence[str | Path],
    out: str | Path,
    config: ExtractorConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    trunk: TrunkOutput | None = None,
) -> ExtractResult:
    """Write the grid features of ``paths`` to ``out`` as float32 ``[kept, h*w, 1280]``, or
    with ``trunk`` what enters the backbone's last ``trunk.stages`` stages (``[kept, C, h,
    w]`` in ``trunk.dtype``, the pictures mirrored with ``trunk.flip``).

    Rows stream into a memory-mapped file beside ``out`` (memory stays bounded at any count)
    that replaces ``out`` only once complete. Unusable images are skipped and reported; their
    rows are simply not written, so row ``r`` belongs to ``paths[result.kept[r]]``. Raises
    DataError when no image is readable.
    """
    config = config if config is not None else ExtractorConfig()
    out = Path(out)
    if not paths:
        raise DataError(f"{out}: no image paths given")
    device = resolve_device(device)
    model = load_efficientnet_lite(config.backbone).to(device)
    grid = config.grid
    result = ExtractResult(grid=grid, dim=HEAD_CHANNELS)
    if trunk is None:
        shape, dtype = (grid[0] * grid[1], HEAD_CHANNELS), np.dtype(np.float32)
        run = partial(_regions, model)
    else:
        shape, dtype = trunk_shape(model, config, trunk.stages), np.dtype(trunk.dtype)
        run = partial(_trunk, model, trunk)
    bar = tqdm(total=len(paths), unit="img", desc="features", disable=not progress)
    with atomic_output(out) as tmp, bar:
        rows = npy_format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(paths), *shape))
        written = 0
        with torch.inference_mode():
            for batch in _batches(paths, config):
                images = []
                for index, item in batch:
                    if isinstance(item, ImageError):
                        result.skipped.append((str(paths[index]), item.reason))
                        _report(bar, f"skipped {paths[index]}: {item.reason}")
                    else:
                        result.kept.append(index)
                        images.append(item)
                if images:
                    x = torch.stack(images).to(device, non_blocking=True)
                    rows[written : written + len(images)] = run(x).float().cpu().numpy()
                    written += len(images)
                bar.update(len(batch))
        rows.flush()
        del rows
        if not written:
            first_path, first_reason = result.skipped[0]
            raise DataError(
                f"{out}: none of the {len(paths)} images is readable "
                f"(first: {first_path}: {first_reason})"
            )
        if written < len(paths):
            _shrink_rows(tmp, written)
    if result.skipped:
        _report(
            bar, f"{out}: wrote {written} of {len(paths)} images, skipped {len(result.skipped)}"
        )
    return result


@torch.inference_mode()
def image_features(
    paths: Sequence[str | Path],
    config: ExtractorConfig | None = None,
    device: str | torch.device | None = None,
    network: torch.nn.Module | None = None,
    trunk_stages: int = 0,
) -> torch.Tensor:
    """Grid features ``[len(paths), h*w, 1280]`` of a few image files, as ``extract_features``
    writes their rows, for queries (with ``trunk_stages``: what enters the last stages, the
    input of a model whose image tower is tuned); a file that cannot be used raises
    ``ImageError``.

    ``network`` (from ``load_efficientnet_lite(config.backbone)``) saves reloading it per call.
    """
    config = config if config is not None else ExtractorConfig()
    device = resolve_device(device)
    network = (network or load_efficientnet_lite(config.backbone)).to(device)
    parts = []
    for start in range(0, len(paths), config.batch_size):
        x = torch.stack([load_image(p, config) for p in paths[start : start + config.batch_size]])
        x = x.to(device)
        out = network.forward_trunk(x, trunk_stages) if trunk_stages else _regions(network, x)
        parts.append(out.float())
    if not parts:
        raise DataError("image_features needs at least one image path")
    return torch.cat(parts).cpu()
