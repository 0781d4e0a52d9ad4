"""Files that are never half-written: atomic files, directory swaps, content hashes.

Readers see an old file or directory or the new one, never part of either. A file is written
beside its target and renamed over it; a directory (a checkpoint, an index) is built in a hidden
sibling and swapped in by two renames, the old one parked at :func:`swapped_out` in between, so
a crash between the renames leaves it there for :func:`recover_swap` to put back.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imram.errors import DataError

CHUNK = 8 << 20  # bytes read at a time when hashing


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` for the caller to write; on success it is
    fsynced and renamed over ``path``, on any error removed.

    The temporary file is created empty (exclusively, with the usual umask-derived
    permissions), so writers may open it with any mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_path(path: Path) -> None:
    """Flush a file to disk, or a directory's entries where the platform allows it."""
    is_dir = path.is_dir()
    try:
        handle = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError:
        if not is_dir:
            raise


def sibling_dir(target: Path) -> Path:
    """A new empty hidden directory beside ``target`` to build its replacement in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=_build_prefix(target.name)))


def _build_prefix(target_name: str) -> str:
    """The name prefix of :func:`sibling_dir`'s build directories for ``target_name``."""
    return f".{target_name}.tmp-"


def is_sibling_of(name: str, target_name: str) -> bool:
    """Whether ``name`` is one of the hidden files or directories that :func:`atomic_output`,
    :func:`sibling_dir` and :func:`swap_in` make beside a target called ``target_name``."""
    atomic = name.startswith(f".{target_name}.") and name.endswith(".tmp")
    return atomic or name.startswith(_build_prefix(target_name)) or name == f".{target_name}.old"


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove the build directories of ``target`` that a killed writer left (``.NAME.tmp-*``);
    call only when no other process writes ``target``. Returns what was removed."""
    removed = []
    if target.parent.is_dir():
        for child in target.parent.glob(f"{_build_prefix(target.name)}*"):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def swapped_out(target: Path) -> Path:
    """Where :func:`swap_in` parks the previous ``target`` while it renames the new one in."""
    return target.parent / f".{target.name}.old"


def swap_in(built: Path, target: Path) -> None:
    """Replace the directory ``target`` by the finished directory ``built``: every file of
    ``built`` is fsynced, the old ``target`` is parked, ``built`` renamed, the old one removed."""
    for child in built.iterdir():
        if child.is_file():
            fsync_path(child)
    old = swapped_out(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(built, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(target: Path, marker: str) -> Path | None:
    """After a crash between the two renames of :func:`swap_in`: the parked directory holding
    ``marker`` when ``target`` lacks it (None when there is nothing to recover)."""
    old = swapped_out(target)
    if not (target / marker).is_file() and (old / marker).is_file():
        return old
    return None


PAYLOAD_KEY = "payload_sha256"


def payload_sha256(record: dict) -> str:
    """SHA-256 of a JSON record without its own :data:`PAYLOAD_KEY`, in a canonical form
    (sorted keys, no spaces), so that whitespace changes do not count and edits do."""
    body = {k: v for k, v in record.items() if k != PAYLOAD_KEY}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sealed(record: dict) -> dict:
    """``record`` with its :func:`payload_sha256` added, for writing."""
    return {**record, PAYLOAD_KEY: payload_sha256(record)}


def check_sealed(record: dict, source: Path | str) -> None:
    """Refuse a record whose payload changed since :func:`sealed` (records written before
    seals existed carry none and pass)."""
    stored = record.get(PAYLOAD_KEY)
    if stored is not None and stored != payload_sha256(record):
        raise DataError(
            f"{source}: its contents changed after it was written ({PAYLOAD_KEY} does not "
            "match); restore the original or rebuild it"
        )


def read_bytes(path: Path) -> bytes:
    """A file's bytes; an unreadable file is a DataError naming it."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def check_sha256(path: Path, data: bytes, sha256: str | None) -> None:
    """Refuse ``data`` (read from ``path``) unless its SHA-256 is ``sha256`` (None: nothing
    recorded, as in files written before hashes were)."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{path}: its contents changed after it was written (its SHA-256 differs from the "
            "one recorded beside it)"
        )


def sha256_file(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in chunks; an unreadable file is a DataError
    naming it."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest(), size
