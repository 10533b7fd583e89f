"""Decode every image once into a memory-mapped uint8 array.

Training reads pixels from here instead of decoding JPEGs each epoch. The cache lives
outside the repository (``EMOTION_CACHE_DIR``) under a key made of the preprocessing
version and the clean table's file checksums, so a change to either builds a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from service.preprocessing import (
    INPUT_SIZE,
    PREPROCESSING_VERSION,
    pixels_to_input,
    preprocess_image_uint8,
)
from service.signals import STOPPING_SIGNALS, signals_held, stops_taken_as_ctrl_c
from training.fetch import ChecksumError, DataError

PIXELS_FILE = "pixels.u8"
INDEX_FILE = "index.json"
BUILDING_FILE = ".building"  # a claim on a staging folder, locked while its build runs


@dataclass(frozen=True)
class DecodedImages:
    names: tuple[str, ...]
    pixels: np.ndarray  # uint8 (N, 350, 350), read-only memory map
    key: str

    def rows_of(self, images) -> np.ndarray:
        position = {name: row for row, name in enumerate(self.names)}
        return np.fromiter((position[name] for name in images), dtype=np.int64)

    def inputs(self, rows: np.ndarray) -> np.ndarray:
        """The model input (float32 ``[n, 350, 350]`` in [0, 1]) of these cache rows."""
        return pixels_to_input(np.asarray(self.pixels[rows]))


def cache_key(table: pd.DataFrame) -> str:
    digest = hashlib.sha256(f"preprocessing={PREPROCESSING_VERSION}\n".encode())
    for name, sha in sorted(zip(table["image"], table["sha256"], strict=True)):
        digest.update(f"{sha}  {name}\n".encode())
    return digest.hexdigest()[:20]


def load_decoded_images(table: pd.DataFrame, images_dir: Path, cache_dir: Path,
                        workers: int | None = None, *, listed_in: str = "the clean table",
                        hint: str = "") -> DecodedImages:
    """The cache for ``table``, built first if it does not exist yet (``listed_in`` and
    ``hint`` as for :func:`build_cache`)."""
    key = cache_key(table)
    folder = cache_dir / key
    if not (folder / INDEX_FILE).is_file():
        build_cache(table, images_dir, cache_dir, workers, listed_in=listed_in, hint=hint)
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
        pixels = np.memmap(folder / PIXELS_FILE, dtype=np.uint8, mode="r",
                           shape=(len(index["names"]), INPUT_SIZE, INPUT_SIZE))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        # a cut index or pixel file (a full disk, a copy stopped half-way) was a traceback in
        # every command that reads it, and nothing said that a rebuild repairs it (a review)
        raise DataError(f"the decode cache {folder} is damaged ({type(exc).__name__}: {exc}); "
                        "`python -m training cache --rebuild` builds it again") from None
    return DecodedImages(tuple(index["names"]), pixels, key)


def build_cache(table: pd.DataFrame, images_dir: Path, cache_dir: Path,
                workers: int | None = None, replace: bool = False, *,
                listed_in: str = "the clean table", hint: str = "") -> Path:
    """Decode ``table`` into ``cache_dir/<key>``; ``replace`` puts the new build in place of
    one that exists (``cache --rebuild``), which is otherwise kept. ``listed_in`` names the
    file the table's SHA-256 come from, and ``hint`` how to point the command at the images,
    for the errors."""
    missing = [name for name in table["image"] if not (images_dir / name).is_file()]
    if missing:  # before any work, and in one line: a folder not the dataset, or part of it
        raise DataError(f"{images_dir}: {len(missing)} of the {len(table)} images "
                        f"{listed_in} names are missing (e.g. {missing[:3]})"
                        + (f"; {hint}" if hint else ""))
    key = cache_key(table)
    final = cache_dir / key
    if final.exists() and not final.is_dir():  # found before the decode, not after it
        raise DataError(f"{final}, where this decode cache goes, is not a folder: remove it")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder and rename it into place, so a crash or a concurrent
    # builder never leaves a half-written cache that looks complete.
    for left in cache_dir.glob(f".{key}.*"):
        # a build killed outright (SIGKILL, out of memory) left its staging: 1.6 GB each;
        # an old cache set aside by a rebuild is never read again
        if left.name.startswith(f".{key}.old.") or _abandoned(left):
            shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.build.", dir=cache_dir))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 kept other users out of the cache
    # Claimed by a lock held while this build runs, not by a process id, which says nothing
    # from another pid namespace (a container sharing the cache took a live build's staging
    # for a dead one's; a diff review). Locked before it is in place: never seen unlocked. A
    # POSIX record lock, which forked decode workers do not inherit: an flock they shared
    # outlived a build killed outright (the diff review).
    claim = open(staging / f"{BUILDING_FILE}.new", "w")  # noqa: SIM115  closed at the end
    fcntl.lockf(claim, fcntl.LOCK_EX)
    os.rename(staging / f"{BUILDING_FILE}.new", staging / BUILDING_FILE)
    names = list(table["image"])
    # a changed image: how to check the copy, after which image it was
    which = " fer2013" if "fer2013" in listed_in else ""  # the list the SHA-256 come from
    checking = (f"`python -m training verify{which}` checks the whole copy"
                + (f"; {hint}" if hint else ""))
    jobs = [(str(images_dir / name), sha, listed_in, checking)
            for name, sha in zip(names, table["sha256"], strict=True)]
    array = np.memmap(staging / PIXELS_FILE, dtype=np.uint8, mode="w+",
                      shape=(len(names), INPUT_SIZE, INPUT_SIZE))
    pool = ProcessPoolExecutor(max_workers=workers or os.cpu_count(),
                               initializer=_stopping_left_to_the_parent)
    # Everything up to the rename in the try: a failure after the decode (a concurrent
    # rebuild's rename) left the staging, 1.6 GB, behind (a review).
    try:  # a SIGTERM or a closed terminal as Ctrl-C, so that the staging goes here too
        with stops_taken_as_ctrl_c():
            decoded = pool.map(_decode_verified, jobs, chunksize=64)
            for row, image in enumerate(tqdm(decoded, total=len(jobs), desc="decode cache",
                                             unit="img", mininterval=2.0)):
                array[row] = image
            pool.shutdown()
            array.flush()
            array = None  # closes the map
            index = {"key": key, "preprocessing_version": PREPROCESSING_VERSION,
                     "shape": [len(names), INPUT_SIZE, INPUT_SIZE], "names": names}
            (staging / INDEX_FILE).write_text(json.dumps(index))
        with signals_held(*STOPPING_SIGNALS):
            (staging / BUILDING_FILE).unlink()  # not part of the cache
            _put_in_place(staging, final, replace)
    except BaseException:  # a file that fails its checksum, Ctrl-C: no staging left behind
        # a second stop waits for the clean-up: one that cut it left the staging and the
        # workers, or hung (the diff review)
        with signals_held(*STOPPING_SIGNALS):
            pool.shutdown(wait=True, cancel_futures=True)  # not the decodes still queued
            array = None
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        claim.close()
    return final


def _put_in_place(staging: Path, final: Path, replace: bool) -> None:
    """``staging`` renamed to ``final``; with ``replace``, in place of a cache already
    there. Another builder of the same cache may finish, or set the old one aside, first."""
    aside = None
    if replace:
        # Aside first, as a rename does not replace a folder that has files; open memory maps
        # of the old files stay valid until they are closed. A name of its own each time: an
        # earlier rebuild may have been stopped before removing its own.
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        # none yet, or a concurrent rebuild set it aside first
        with contextlib.suppress(FileNotFoundError):
            final.rename(aside)  # onto the empty folder just made
    try:
        staging.rename(final)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(staging, ignore_errors=True)
    if aside is not None:  # after the rename: readers find a cache all along
        shutil.rmtree(aside, ignore_errors=True)


def _abandoned(staging: Path) -> bool:
    """Whether a build's staging folder has lost its builder: its claim is held by no one.
    Without a claim (an aside folder of a rebuild, or a build finishing), it is left."""
    try:
        descriptor = os.open(staging / BUILDING_FILE, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (EAGAIN or EACCES, by system)
        return False
    finally:
        os.close(descriptor)
    return True


def _stopping_left_to_the_parent() -> None:
    """In each decode worker: a SIGTERM or SIGHUP to the whole group stops the parent, which
    then ends the pool. Taken in the workers too, it went back to the parent as an error
    that broke the pool's own thread, and the command never exited (a diff review)."""
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)


def _decode_verified(job: tuple[str, str, str, str]) -> np.ndarray:
    path, expected, listed_in, checking = job
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual} differs from {listed_in}'s {expected}; "
                            + checking)
    return preprocess_image_uint8(data)
