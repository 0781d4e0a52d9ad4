"""Caption files in the layouts datasets ship with, read into one list of caption records.

Five formats are understood (``FORMATS``):

- ``flickr8k``: ``Flickr8k.token.txt``, lines ``name.jpg#k<TAB>caption``. When the standard split
  files lie beside it (``Flickr_8k.trainImages.txt``, ``Flickr_8k.devImages.txt``,
  ``Flickr_8k.testImages.txt``, one image name per line) they give the splits, and images named
  in none of them are dropped and listed in ``CaptionFile.dropped``.
- ``csv``: a header naming the columns ``image`` and ``caption`` (an optional ``split`` column,
  others ignored), standard CSV quoting.
- ``karpathy``: ``dataset_*.json`` with ``images[*].sentences[*].raw`` and a split per image
  (``val`` → dev, ``restval`` → train); the image path is ``filepath/filename``.
- ``coco``: ``captions_*.json`` with ``images[*].{id, file_name}`` and
  ``annotations[*].{image_id, caption}``; it carries no split.
- ``tsv``: ``image<TAB>caption`` per line (a first line ``image<TAB>caption`` is a header).

Files are strict UTF-8 (a leading byte-order mark is dropped, ``\\r\\n`` is accepted). Captions
are whitespace-normalised (runs of spaces, tabs and newlines become one space, ends stripped);
a caption empty after that is an error, as is anything malformed: every error names the file
and the line (or the JSON path) and what was expected there.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imram.errors import ConfigError, DataError

FORMATS = ("flickr8k", "csv", "karpathy", "coco", "tsv")
SPLITS = ("train", "dev", "test")
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Split names as datasets spell them → ours (Karpathy's ``restval`` is extra training data).
SPLIT_ALIASES = {
    "train": "train",
    "restval": "train",
    "dev": "dev",
    "val": "dev",
    "valid": "dev",
    "validation": "dev",
    "test": "test",
}
_BOM = "\ufeff"


@dataclass(frozen=True)
class CaptionRecord:
    """One caption of one image; ``source`` (``file:line`` or ``file:json.path``) is for errors."""

    image: str
    caption: str
    split: str | None
    source: str


@dataclass(frozen=True)
class DroppedImage:
    """An image the caption file names but that is left out, with how many captions it had."""

    image: str
    captions: int
    reason: str


@dataclass
class CaptionFile:
    """What a caption file yields: its records, the images it left out, and remarks on it."""

    path: Path
    format: str
    records: list[CaptionRecord]
    dropped: list[DroppedImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def normalise_caption(text: str, source: str) -> str:
    """Collapse whitespace (newlines and tabs included) to single spaces; empty is an error.

    Caption files of a precomp folder hold one caption per line, so a caption may not keep a
    newline; an empty caption is refused rather than dropped so that no caption vanishes unseen.
    """
    caption = " ".join(text.split())
    if not caption:
        raise DataError(f"{source}: empty caption (after whitespace normalisation); expected text")
    return caption


def _decode(path: Path, what: str) -> str:
    """The text of a strict UTF-8 file, without a leading BOM; errors name the file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; expected a {what}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
            f"{column}); expected a UTF-8 {what}"
        ) from None
    return text[1:] if text.startswith(_BOM) else text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines, ``\\r\\n`` or ``\\n`` endings."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _image_name(name: str, source: str) -> str:
    image = name.strip()
    if not image:
        raise DataError(f"{source}: empty image name; expected an image file name")
    if "\n" in image or "\r" in image:
        raise DataError(f"{source}: image name {image!r} holds a line break; expected a file name")
    return image


def _split_name(value: str, source: str) -> str | None:
    """Our split name for a dataset's (``val`` → dev, ``restval`` → train); blank is no split."""
    key = value.strip().lower()
    if not key:
        return None
    if key not in SPLIT_ALIASES:
        raise DataError(
            f"{source}: unknown split {value.strip()!r}; expected one of "
            f"{', '.join(SPLIT_ALIASES)} (or blank)"
        )
    return SPLIT_ALIASES[key]


def _source(path: Path, where: int | str) -> str:
    return f"{path}:{where}"


def _read_flickr8k(path: Path) -> CaptionFile:
    pairs: list[tuple[str, str, str]] = []
    for number, line in _lines(_decode(path, "Flickr8k token file")):
        where = f"{path}, line {number}"
        key, tab, caption = line.partition("\t")
        if not tab:
            raise DataError(f"{where}: expected 'image.jpg#k<TAB>caption', found no tab")
        name, hash_, k = key.strip().rpartition("#")
        image = _image_name(name if hash_ and k.isdigit() else key, where)
        source = _source(path, number)
        pairs.append((image, normalise_caption(caption, source), source))
    result = CaptionFile(path, "flickr8k", [])
    splits = _read_flickr8k_splits(path.parent)
    if not splits:
        result.records = [CaptionRecord(image, c, None, s) for image, c, s in pairs]
        return result
    counts: dict[str, int] = {}
    for image, caption, source in pairs:
        split = splits.get(image)
        if split is None:
            counts[image] = counts.get(image, 0) + 1
        else:
            result.records.append(CaptionRecord(image, caption, split[0], source))
    present = [name for name in FLICKR8K_SPLIT_FILES.values() if (path.parent / name).is_file()]
    files = ", ".join(sorted(present))
    reason = f"in no Flickr8k split file ({files})"
    result.dropped = [DroppedImage(image, n, reason) for image, n in counts.items()]
    captioned = {image for image, _, _ in pairs}
    uncaptioned = [image for image in splits if image not in captioned]
    if uncaptioned:
        result.notes.append(
            f"{len(uncaptioned)} image(s) listed in the split files have no caption in "
            f"{path.name} (first: {uncaptioned[0]})"
        )
    return result


def _read_flickr8k_splits(folder: Path) -> dict[str, tuple[str, Path, int]]:
    """Image name → (split, split file, line) from the Flickr8k split files present in folder."""
    splits: dict[str, tuple[str, Path, int]] = {}
    for split, name in FLICKR8K_SPLIT_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        for number, line in _lines(_decode(path, "Flickr8k split file")):
            image = line.strip()
            if image in splits:
                other, other_path, other_line = splits[image]
                raise DataError(
                    f"{path}, line {number}: image {image!r} is already in split {other!r} "
                    f"({other_path}, line {other_line}); expected each image in one split file"
                )
            splits[image] = (split, path, number)
    return splits


def _read_csv(path: Path) -> CaptionFile:
    reader = csv.reader(io.StringIO(_decode(path, "CSV caption file"), newline=""), strict=True)
    header: list[str] | None = None
    columns: dict[str, int] = {}
    records: list[CaptionRecord] = []
    start = 1
    try:
        for row in reader:
            number, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}, line {number}"
            if header is None:
                header = [cell.strip().lower() for cell in row]
                columns = _csv_columns(header, where)
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{where}: {len(row)} fields but the header has {len(header)}; quote a "
                    'caption that holds a comma or a quote ("a dog, running")'
                )
            source = _source(path, number)
            split = row[columns["split"]] if "split" in columns else ""
            records.append(
                CaptionRecord(
                    _image_name(row[columns["image"]], where),
                    normalise_caption(row[columns["caption"]], source),
                    _split_name(split, where),
                    source,
                )
            )
    except csv.Error as err:
        raise DataError(f"{path}, line {start}: malformed CSV ({err})") from None
    if header is None:
        raise DataError(f"{path}: empty CSV file; expected a header with columns image,caption")
    return CaptionFile(path, "csv", records)


def _csv_columns(header: list[str], where: str) -> dict[str, int]:
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        if name in ("image", "caption", "split"):
            if name in columns:
                raise DataError(f"{where}: column {name!r} appears twice in the header")
            columns[name] = index
    missing = [name for name in ("image", "caption") if name not in columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; expected a header with columns "
            f"image,caption (split optional), found {','.join(header)}"
        )
    return columns


def _read_tsv(path: Path) -> CaptionFile:
    records: list[CaptionRecord] = []
    for number, line in _lines(_decode(path, "TSV caption file")):
        where = f"{path}, line {number}"
        name, tab, caption = line.partition("\t")
        if not tab:
            raise DataError(f"{where}: expected 'image<TAB>caption', found no tab")
        if not records and (name.strip().lower(), caption.strip().lower()) == ("image", "caption"):
            continue
        source = _source(path, number)
        records.append(
            CaptionRecord(
                _image_name(name, where), normalise_caption(caption, source), None, source
            )
        )
    return CaptionFile(path, "tsv", records)


def _load_json(path: Path) -> Any:
    text = _decode(path, "JSON caption file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}, line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
        ) from None


def _json_format(data: Any) -> str | None:
    """``karpathy`` or ``coco`` from the top-level keys of a parsed JSON file, else None."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None
    if "annotations" in data:
        return "coco"
    first = next(iter(data["images"]), None)
    if isinstance(first, dict) and "sentences" in first:
        return "karpathy"
    return None


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` checked to be a ``kind``; errors name the JSON path."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}.{key}: expected {names}, found {type(value).__name__}")
    return value


def _read_karpathy(path: Path, data: Any) -> CaptionFile:
    result = CaptionFile(path, "karpathy", [])
    images = _field(data, "images", list, f"{path}, top level")
    for i, entry in enumerate(images):
        where = f"{path}, images[{i}]"
        name = _field(entry, "filename", str, where)
        folder = entry.get("filepath") if isinstance(entry, dict) else None
        if folder is not None and not isinstance(folder, str):
            raise DataError(f"{where}.filepath: expected str, found {type(folder).__name__}")
        image = _image_name(f"{folder.rstrip('/')}/{name}" if folder else name, f"{where}.filename")
        split = _split_name(_field(entry, "split", str, where), f"{where}.split")
        sentences = _field(entry, "sentences", list, where)
        if not sentences:
            result.dropped.append(DroppedImage(image, 0, "no sentences"))
        for k, sentence in enumerate(sentences):
            at = f"images[{i}].sentences[{k}]"
            raw = _field(sentence, "raw", str, f"{path}, {at}")
            source = _source(path, at)
            result.records.append(
                CaptionRecord(image, normalise_caption(raw, source), split, source)
            )
    return result


def _read_coco(path: Path, data: Any) -> CaptionFile:
    result = CaptionFile(path, "coco", [])
    images = _field(data, "images", list, f"{path}, top level")
    annotations = _field(data, "annotations", list, f"{path}, top level")
    names: dict[Any, tuple[int, str]] = {}
    for i, entry in enumerate(images):
        where = f"{path}, images[{i}]"
        image_id = _field(entry, "id", (int, str), where)
        if image_id in names:
            raise DataError(
                f"{where}.id: {image_id!r} is also the id of images[{names[image_id][0]}]; "
                "expected unique image ids"
            )
        names[image_id] = (i, _image_name(_field(entry, "file_name", str, where), where))
    captions: dict[Any, list[CaptionRecord]] = {image_id: [] for image_id in names}
    for k, annotation in enumerate(annotations):
        where = f"{path}, annotations[{k}]"
        image_id = _field(annotation, "image_id", (int, str), where)
        if image_id not in names:
            raise DataError(
                f"{where}.image_id: {image_id!r} is not the id of any entry of images; expected "
                "every annotation to point to a listed image"
            )
        source = _source(path, f"annotations[{k}]")
        caption = normalise_caption(_field(annotation, "caption", str, where), source)
        captions[image_id].append(CaptionRecord(names[image_id][1], caption, None, source))
    for image_id, (_, image) in names.items():
        if not captions[image_id]:
            result.dropped.append(DroppedImage(image, 0, "no annotation"))
        result.records.extend(captions[image_id])
    return result


def detect_format(path: str | Path) -> str:
    """The format of a caption file from its name (``*.token.txt``, ``.csv``, ``.tsv``) or, for
    JSON and other text, from its content; raise when it cannot be told."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".token.txt", ".token")):
        return "flickr8k"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".json"):
        found = _json_format(_load_json(path))
        if found is None:
            raise DataError(
                f"{path}: a JSON caption file needs images[*].sentences (karpathy) or "
                "images and annotations (coco); found neither"
            )
        return found
    first = next(_lines(_decode(path, "caption file")), None)
    if first is not None and "\t" in first[1]:
        key = first[1].partition("\t")[0].strip()
        return "flickr8k" if key.rpartition("#")[2].isdigit() and "#" in key else "tsv"
    raise DataError(
        f"{path}: cannot tell the caption format from its name or content; "
        f"name one of {', '.join(FORMATS)}"
    )


def load_captions(path: str | Path, fmt: str | None = None) -> CaptionFile:
    """Read a caption file (format ``fmt``, or detected when None) with what it left out."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown caption format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt in ("karpathy", "coco") or (fmt is None and path.name.lower().endswith(".json")):
        data = _load_json(path)
        fmt = fmt or _json_format(data) or detect_format(path)
        if fmt == "karpathy":
            return _read_karpathy(path, data)
        if fmt == "coco":
            return _read_coco(path, data)
    fmt = fmt or detect_format(path)
    readers = {"flickr8k": _read_flickr8k, "csv": _read_csv, "tsv": _read_tsv}
    return readers[fmt](path)


def read_records(path: str | Path, fmt: str) -> list[CaptionRecord]:
    """The caption records of a file in format ``fmt`` (one of ``FORMATS``), in file order.

    Images the file leaves out (Flickr8k images in no split file, JSON images without a
    caption) are not records; ``load_captions`` lists them.
    """
    return load_captions(path, fmt).records
