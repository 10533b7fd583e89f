"""Files the next command reads, written whole or not at all: a full disk or a stop midway
leaves the earlier file, never a cut one taken for whole (a cut clean table was read as 5,372
of its 13,681 rows, and a cut manifest stopped the service and the command that rewrites it;
a review)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from service.signals import STOPPING_SIGNALS, signals_held


def write_synced(path: Path, text: str) -> None:
    """``text`` in ``path``, on the disk before it returns (so a rename after it is safe)."""
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def sync(path: Path) -> None:
    """A file another writer made (``torch.onnx.export``'s), on the disk before a rename."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def readable_as_before(new: Path, old: Path) -> None:
    """``new`` with ``old``'s mode, or readable by all (0644) where there is no ``old``: a
    file written under a strict umask (077) came in as 0600, which the container's own user
    could not read (two reviews). Models and data are not secrets."""
    if old.exists():
        shutil.copymode(old, new)
    else:
        os.chmod(new, 0o644)


def rename_into_place(moves: list[tuple[Path, Path]]) -> None:
    """Each ``(written, place)``: the file renamed over its place, in order (a manifest
    last), readable as the one it replaces. A stop that arrives among the renames is taken
    once they are all done: one between them left new models beside the old manifest, which
    the service then refused (a review)."""
    for written, place in moves:
        readable_as_before(written, place)
    with signals_held(*STOPPING_SIGNALS):
        for written, place in moves:
            os.replace(written, place)


def replace_text(path: Path, text: str) -> None:
    """``text`` as ``path``'s content, by a temporary file beside it renamed over it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write_synced(partial, text)
        readable_as_before(partial, path)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
