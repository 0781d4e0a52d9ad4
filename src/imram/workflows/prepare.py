"""``imram prepare folder``: a folder of images and a caption file → a precomp folder.

Captions are read (``imram.data.formats``), grouped per image, given a split when the caption
file has none, and written per split with grid features of the images (``imram.features``).

Caption rule: every caption of every image is kept, whatever the number of captions an image
has (1, 3, 5, 7, ...). An image's captions are consecutive in ``{split}_caps.txt``, in the order
of the caption file, images in the order they first appear there, and ``{split}_cap2img.npy``
(int64, the feature row of each caption) is always written, so no split relies on the
five-per-image convention. ``max_captions_per_image`` keeps only the first captions of an image;
every image it cuts is listed in the report and in ``meta.json``.

Splits: an image without a split in the caption file goes to dev, test or train by a SHA-1 hash
of ``seed`` and its name (``hash_split``), so it lands in the same split whatever the order of
the file and whatever other images it holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

from imram.data.formats import SPLITS, CaptionRecord, DroppedImage, load_captions
from imram.data.precomp import (
    CAP2IMG_NAME,
    CAPTIONS_NAME,
    FEATURE_NAMES,
    FORMAT_VERSION,
    IDS_NAME,
    META_NAME,
    PrecompDataset,
)
from imram.errors import ConfigError, DataError
from imram.features.extract import ExtractorConfig, extract_features, extractor_meta
from imram.files import atomic_output, atomic_write_text

if TYPE_CHECKING:
    import torch

CAPTION_RULE = (
    "every caption of every image is kept (the first max_captions_per_image when set); an "
    "image's captions are consecutive in {split}_caps.txt, in caption-file order, images in "
    "first-seen order; {split}_cap2img.npy (int64, the image row of each caption) is always "
    "written"
)
# Files that mark a folder as a precomp; a folder holding any of them is not written over
# unless asked to.
_PRECOMP_PATTERNS = (
    "*_ims.npy",
    "*_feat.npy",
    "*_caps.txt",
    "*_cap2img.npy",
    "*_ids.txt",
    META_NAME,
)
_SPLIT_FILES = ("{split}_ims.npy", "{split}_feat.npy", CAPTIONS_NAME, CAP2IMG_NAME, IDS_NAME)
_LISTED = 10


@dataclass
class ImageEntry:
    """One image with all its captions and its split; ``source`` is where it first appears."""

    image: str
    captions: list[str]
    split: str | None
    source: str = ""


@dataclass(frozen=True)
class SkippedImage:
    """An image left out at writing (missing or unreadable file) with its captions."""

    image: str
    split: str
    path: str
    reason: str
    captions: int


@dataclass(frozen=True)
class CappedImage:
    """An image whose captions past ``max_captions_per_image`` were left out."""

    image: str
    split: str
    kept: int
    dropped: int


@dataclass(frozen=True)
class SplitCounts:
    """What one split of the written folder holds."""

    images: int
    captions: int


@dataclass
class PrepareReport:
    """What ``write_precomp`` wrote and everything it left out, for printing and for tests."""

    out: Path
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    skipped: list[SkippedImage] = field(default_factory=list)
    dropped: list[DroppedImage] = field(default_factory=list)
    capped: list[CappedImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal: counts per split, then every kind of loss, listed."""
        written = ", ".join(
            f"{split} {c.images} images / {c.captions} captions" for split, c in self.splits.items()
        )
        lines = [f"wrote {self.out}: {written}"]
        if self.skipped:
            n = sum(s.captions for s in self.skipped)
            lines.append(f"skipped {len(self.skipped)} image(s) and their {n} caption(s):")
            lines += _listed([f"{s.split}: {s.path}: {s.reason}" for s in self.skipped])
        if self.dropped:
            n = sum(d.captions for d in self.dropped)
            lines.append(
                f"dropped {len(self.dropped)} image(s) of the caption file ({n} captions):"
            )
            lines += _listed([f"{d.image}: {d.reason}" for d in self.dropped])
        if self.capped:
            n = sum(c.dropped for c in self.capped)
            lines.append(f"capped {len(self.capped)} image(s), {n} caption(s) left out:")
            lines += _listed([f"{c.image}: kept {c.kept}, left {c.dropped}" for c in self.capped])
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _listed(items: Sequence[str]) -> list[str]:
    shown = [f"  {item}" for item in items[:_LISTED]]
    if len(items) > _LISTED:
        shown.append(f"  ... and {len(items) - _LISTED} more (all in {META_NAME})")
    return shown


def group_captions(records: Iterable[CaptionRecord]) -> list[ImageEntry]:
    """Captions per image, images in first-seen order; one image with two splits is an error."""
    entries: dict[str, ImageEntry] = {}
    for record in records:
        entry = entries.get(record.image)
        if entry is None:
            entries[record.image] = ImageEntry(
                record.image, [record.caption], record.split, record.source
            )
        elif record.split != entry.split:
            raise DataError(
                f"{record.source}: image {record.image!r} is in split {record.split or 'none'} "
                f"here but in split {entry.split or 'none'} at {entry.source}; "
                "expected one split per image"
            )
        else:
            entry.captions.append(record.caption)
    return list(entries.values())


def _split_value(image: str, seed: str) -> float:
    digest = hashlib.sha1(f"{seed}\n{image}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fractions(dev_fraction: float, test_fraction: float) -> None:
    if not (0 <= dev_fraction < 1 and 0 <= test_fraction < 1 and dev_fraction + test_fraction < 1):
        raise ConfigError(
            f"dev_fraction={dev_fraction} and test_fraction={test_fraction}: expected each in "
            "[0, 1) and their sum below 1, so that train keeps images"
        )


def hash_split(image: str, dev_fraction: float, test_fraction: float, seed: str) -> str:
    """dev, test or train for ``image`` from a SHA-1 hash of ``seed`` and the name alone.

    The hash maps the name to u in [0, 1): dev when u < dev_fraction, test when
    u < dev_fraction + test_fraction, train otherwise.
    """
    _check_fractions(dev_fraction, test_fraction)
    u = _split_value(image, seed)
    if u < dev_fraction:
        return "dev"
    return "test" if u < dev_fraction + test_fraction else "train"


def assign_splits(
    entries: Sequence[ImageEntry],
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: str = "imram",
    max_dev_images: int | None = None,
    max_test_images: int | None = None,
) -> list[ImageEntry]:
    """Entries with a split each: theirs when given, else ``hash_split``'s.

    A cap keeps in dev (test) the hashed images with the smallest hash values and sends the rest
    to train, so adding images can move an image out of a capped split but never into one.
    Entries that already have a split count towards no cap.
    """
    _check_fractions(dev_fraction, test_fraction)
    for name, cap in (("max_dev_images", max_dev_images), ("max_test_images", max_test_images)):
        if cap is not None and cap < 0:
            raise ConfigError(f"{name}={cap}: expected a count of at least 0 or None")
    out = list(entries)
    chosen: dict[str, list[tuple[float, int]]] = {"dev": [], "test": []}
    for index, entry in enumerate(out):
        if entry.split is None:
            split = hash_split(entry.image, dev_fraction, test_fraction, seed)
            out[index] = replace(entry, split=split)
            if split in chosen:
                chosen[split].append((_split_value(entry.image, seed), index))
    for split, cap in (("dev", max_dev_images), ("test", max_test_images)):
        if cap is not None:
            for _, index in sorted(chosen[split])[cap:]:
                out[index] = replace(out[index], split="train")
    return out


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _existing_precomp(out: Path) -> list[str]:
    return sorted({p.name for pattern in _PRECOMP_PATTERNS for p in out.glob(pattern)})


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``, or refuse one holding a precomp unless ``overwrite``; then clear ours.

    With ``overwrite`` the old ``meta.json`` goes first (a folder without it is unfinished) and
    every train/dev/test file with it, so no stale split survives beside the new ones.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; expected a folder for the precomp")
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_precomp(out)
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise DataError(
            f"{out}: already holds a precomp folder ({shown}); choose an empty folder or "
            "overwrite it (overwrite=True, --overwrite)"
        )
    (out / META_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        for name in _SPLIT_FILES:
            (out / name.format(split=split)).unlink(missing_ok=True)


def _cap_captions(
    entries: list[ImageEntry], max_captions: int | None
) -> tuple[list[ImageEntry], list[CappedImage]]:
    if max_captions is None:
        return entries, []
    if max_captions < 1:
        raise ConfigError(f"max_captions_per_image={max_captions}: expected at least 1 or None")
    capped = []
    for index, entry in enumerate(entries):
        if len(entry.captions) > max_captions:
            assert entry.split is not None
            capped.append(
                CappedImage(
                    entry.image, entry.split, max_captions, len(entry.captions) - max_captions
                )
            )
            entries[index] = replace(entry, captions=entry.captions[:max_captions])
    return entries, capped


def _check_entries(entries: Sequence[ImageEntry]) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.split not in SPLITS:
            raise DataError(
                f"{entry.source or entry.image}: image {entry.image!r} has split "
                f"{entry.split!r}; expected one of {', '.join(SPLITS)} (see assign_splits)"
            )
        if not entry.captions:
            raise DataError(f"{entry.source or entry.image}: image {entry.image!r} has no caption")
        if entry.image in seen:
            raise DataError(
                f"{entry.source}: image {entry.image!r} is listed twice (also at "
                f"{seen[entry.image]}); expected one entry per image (see group_captions)"
            )
        seen[entry.image] = entry.source


def _write_split(
    split: str,
    entries: list[ImageEntry],
    paths: list[Path],
    out: Path,
    extractor: ExtractorConfig,
    progress: bool,
    device: str | torch.device | None,
    report: PrepareReport,
) -> dict[str, Any]:
    """Features, captions, cap2img and ids of one split; returns its ``meta.json`` entry."""
    on_disk = [path.is_file() for path in paths]
    present = [i for i, found in enumerate(on_disk) if found]
    lost: dict[int, str] = {i: "no such file" for i, found in enumerate(on_disk) if not found}
    kept: list[int] = []
    features: dict[str, Any] = {}
    if present:
        result = extract_features(
            [paths[i] for i in present],
            out / FEATURE_NAMES[0].format(split=split),
            extractor,
            progress=progress,
            device=device,
        )
        kept = [present[k] for k in result.kept]
        reasons = {str(path): reason for path, reason in result.skipped}
        for i in sorted(set(present) - set(kept)):
            lost[i] = reasons.get(str(paths[i]), "skipped by the feature extractor")
        grid = result.grid
        features = {"grid": list(grid), "regions": grid[0] * grid[1], "dim": result.dim}
    for i in sorted(lost):
        entry = entries[i]
        report.skipped.append(
            SkippedImage(entry.image, split, str(paths[i]), lost[i], len(entry.captions))
        )
    if not kept:
        first = report.skipped[-len(lost)]
        raise DataError(
            f"split {split}: none of its {len(entries)} image(s) could be read (first: "
            f"{first.path}: {first.reason}); expected readable image files"
        )
    captions = [caption for i in kept for caption in entries[i].captions]
    cap2img = np.repeat(
        np.arange(len(kept), dtype=np.int64), [len(entries[i].captions) for i in kept]
    )
    atomic_write_text(out / CAPTIONS_NAME.format(split=split), "\n".join(captions) + "\n")
    _atomic_save_npy(out / CAP2IMG_NAME.format(split=split), cap2img)
    names = [entries[i].image for i in kept]
    atomic_write_text(out / IDS_NAME.format(split=split), "\n".join(names) + "\n")
    report.splits[split] = SplitCounts(len(kept), len(captions))
    per_image = np.bincount([len(entries[i].captions) for i in kept])
    return {
        "num_images": len(kept),
        "num_captions": len(captions),
        "captions_per_image": {str(n): int(c) for n, c in enumerate(per_image) if c},
        "features": features,
        "images": names,
        "files": [str(Path(paths[i]).resolve()) for i in kept],
    }


def write_precomp(
    entries: Sequence[ImageEntry],
    out: str | Path,
    resolve_image: Callable[[str], Path],
    extractor: ExtractorConfig,
    source: dict[str, Any],
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    overwrite: bool = False,
    max_captions_per_image: int | None = None,
    dropped: Sequence[DroppedImage] = (),
    notes: Sequence[str] = (),
    split_rule: dict[str, Any] | None = None,
) -> PrepareReport:
    """Write split entries as a precomp folder ``out`` that ``PrecompDataset`` opens.

    Per split (train, dev, test; an empty dev is skipped with a note, an empty train or test is
    an error): ``{split}_ims.npy`` features of the images, ``{split}_caps.txt``,
    ``{split}_cap2img.npy`` and ``{split}_ids.txt`` (image names), then ``meta.json`` last.
    Caption rule: every caption of every image is kept, an image's captions consecutive, and
    ``{split}_cap2img.npy`` is always written, so any number of captions per image loads; with
    ``max_captions_per_image`` only an image's first captions are kept, and the cut is reported.
    Images whose file is missing or that the extractor cannot read are left out with their
    captions and listed (report and meta.json). ``dropped`` and ``notes`` (from reading the
    caption file) and ``split_rule`` are carried into the report and meta.json. A folder that
    already holds a precomp is refused unless ``overwrite``.
    """
    out = Path(out)
    entries = list(entries)
    _check_entries(entries)
    entries, capped = _cap_captions(entries, max_captions_per_image)
    paths = [Path(resolve_image(entry.image)) for entry in entries]
    by_split = {split: [i for i, e in enumerate(entries) if e.split == split] for split in SPLITS}
    for split in ("train", "test"):
        if not by_split[split]:
            raise DataError(
                f"no image in split {split!r} ({len(entries)} images in all); expected train and "
                "test to hold images: give splits in the caption file or raise the fractions"
            )
    report = PrepareReport(out, capped=capped, dropped=list(dropped), notes=list(notes))
    _prepare_out(out, overwrite)
    splits_meta: dict[str, Any] = {}
    for split, indices in by_split.items():
        if not indices:
            report.notes.append(f"split {split} has no image; {split} files not written")
            continue
        splits_meta[split] = _write_split(
            split,
            [entries[i] for i in indices],
            [paths[i] for i in indices],
            out,
            extractor,
            progress,
            device,
            report,
        )
    for split, counts in report.splits.items():
        opened = PrecompDataset(out, split, None)
        if (opened.num_images, opened.num_captions) != (counts.images, counts.captions):
            raise DataError(
                f"{out}: split {split} reads back as {opened.num_images} images and "
                f"{opened.num_captions} captions; {counts.images} and {counts.captions} written"
            )
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "extractor": extractor_meta(extractor),
        "caption_rule": {"rule": CAPTION_RULE, "max_captions_per_image": max_captions_per_image},
        "split_rule": split_rule,
        "splits": splits_meta,
        "skipped": [vars(s) for s in report.skipped],
        "dropped": [vars(d) for d in report.dropped],
        "capped": [vars(c) for c in report.capped],
        "notes": report.notes,
    }
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return report


def _check_relative(entry: ImageEntry, images: Path) -> None:
    """Refuse an image name that would leave ``images`` (absolute, a drive, or ``..``)."""
    name = entry.image
    windows = PureWindowsPath(name)
    if (
        PurePosixPath(name).is_absolute()
        or windows.is_absolute()
        or windows.drive
        or windows.root
        or ".." in windows.parts
    ):
        raise DataError(
            f"{entry.source}: image name {name!r} leads outside the images folder {images}; "
            "expected a path relative to it"
        )


def prepare_folder(
    images: str | Path,
    captions: str | Path,
    fmt: str | None,
    out: str | Path,
    extractor: ExtractorConfig | None = None,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: str = "imram",
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    max_dev_images: int | None = None,
    max_test_images: int | None = None,
    max_captions_per_image: int | None = None,
    overwrite: bool = False,
) -> PrepareReport:
    """Read ``captions`` (format ``fmt``, detected when None), group, split, and write ``out``.

    Image names in the caption file are paths relative to ``images``. Images without a split
    in the caption file are split by ``hash_split`` (``dev_fraction``, ``test_fraction``,
    ``seed``, optionally capped by ``max_dev_images``/``max_test_images``). Caption rule, from
    ``write_precomp``: every caption of every image is kept, consecutive, with
    ``{split}_cap2img.npy`` always written (``max_captions_per_image`` keeps the first ones and
    reports the cut).
    """
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: images folder not found")
    _check_fractions(dev_fraction, test_fraction)
    loaded = load_captions(captions, fmt)
    if not loaded.records:
        raise DataError(f"{loaded.path}: no caption found; expected at least one")
    entries = group_captions(loaded.records)
    for entry in entries:
        _check_relative(entry, images)
    unsplit = sum(entry.split is None for entry in entries)
    entries = assign_splits(
        entries, dev_fraction, test_fraction, seed, max_dev_images, max_test_images
    )
    notes = list(loaded.notes)
    if unsplit:
        notes.append(
            f"{unsplit} of {len(entries)} image(s) had no split in the caption file and were "
            f"split by hash (seed {seed!r}, dev {dev_fraction}, test {test_fraction})"
        )
    split_rule = {
        "given": len(entries) - unsplit,
        "hashed": unsplit,
        "dev_fraction": dev_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "max_dev_images": max_dev_images,
        "max_test_images": max_test_images,
    }
    source = {
        "format": loaded.format,
        "captions": str(loaded.path.resolve()),
        "images": str(images.resolve()),
    }
    return write_precomp(
        entries,
        out,
        lambda name: images / name,
        extractor or ExtractorConfig(),
        source,
        progress,
        device,
        overwrite=overwrite,
        max_captions_per_image=max_captions_per_image,
        dropped=loaded.dropped,
        notes=notes,
        split_rule=split_rule,
    )


def prepare_tuxpaint(
    out: str | Path,
    extractor: ExtractorConfig | None = None,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: str = "imram",
    cache: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    overwrite: bool = False,
) -> PrepareReport:
    """The Tux Paint stamps as a precomp folder: one human description per picture.

    The package comes from :func:`imram.data.tuxpaint.stamps_root` (installed, cached, or
    fetched into ``cache``). SVG-only stamps are rasterised into the cache (a PNG is preferred
    where both exist); an SVG that cannot be rendered, and a description without a picture,
    is dropped and listed. Splits are the deterministic ``hash_split`` of each stamp's path.
    """
    from imram.data.tuxpaint import PACKAGE, cache_dir, rasterise_svg, read_stamps, stamps_root

    root = stamps_root(cache)
    stamps, missing = read_stamps(root)
    pictures = Path(cache) if cache is not None else cache_dir()
    dropped = [DroppedImage(name, 1, reason) for name, reason in missing]
    records, paths = [], {}
    for stamp in stamps:
        picture = stamp.picture
        if picture.suffix == ".svg":
            try:
                picture = rasterise_svg(picture, pictures / "tuxpaint-png" / f"{stamp.name}.png")
            except DataError as err:
                dropped.append(DroppedImage(stamp.name, 1, str(err)))
                continue
        paths[stamp.name] = picture
        records.append(CaptionRecord(stamp.name, stamp.caption, None, f"{root / stamp.name}"))
    entries = assign_splits(group_captions(records), dev_fraction, test_fraction, seed)
    source = {"format": "tuxpaint", "package": PACKAGE, "stamps": str(root)}
    split_rule = {
        "given": 0,
        "hashed": len(entries),
        "dev_fraction": dev_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    return write_precomp(
        entries,
        out,
        paths.__getitem__,
        extractor or ExtractorConfig(),
        source,
        progress,
        device,
        overwrite=overwrite,
        dropped=dropped,
        split_rule=split_rule,
    )
