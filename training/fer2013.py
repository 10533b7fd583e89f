"""FER-2013, the second dataset: its layout, class map, fetch and table.

The release's image-folder layout (``train/<class>/Training_<n>.jpg``, ``validation/...``
for PublicTest, ``test/...`` for PrivateTest). The public mirror that holds all three folders
filtered its images in place in later commits, so only files named ``<Usage>_<n>.jpg`` at the
pinned commit are taken, and each is checked against ``data/fer2013.SHA256SUMS`` (the SHA-256
of all 35,887 originals).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from service.signals import stops_taken_as_ctrl_c
from training.fetch import (
    ChecksumError,
    DataError,
    checkout_as_committed,
    fetch_commit,
    read_checksums,
    run_git,
    verify_dataset,
)

FER_REPOSITORY = "https://github.com/RecepTahirGunlu/Duygu-Tanima"
FER_COMMIT = "b98a817d62a3d301f244b16b7a57a86ac0b30c97"
FER_CITATION = ("Goodfellow et al., Challenges in Representation Learning: A report on three "
                "machine learning contests, ICML 2013 workshop, arXiv:1307.0414")
FER_TERMS = ("released for research through the ICML 2013 challenge on Kaggle; no licence file "
             "accompanies it")
# Folder of the layout -> the challenge's Usage, and the subset each plays in this project.
USAGE_OF_FOLDER = {"train": "Training", "validation": "PublicTest", "test": "PrivateTest"}
SUBSET_OF_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
CLASS_MAP = {"angry": "ANGER", "disgust": "DISGUST", "fear": "FEAR", "happy": "HAPPINESS",
             "neutral": "NEUTRAL", "sad": "SADNESS", "surprise": "SURPRISE"}
ORIGINAL = re.compile(r"(?P<folder>train|validation|test)/(?P<cls>[a-z]+)/"
                      r"(?P<usage>Training|PublicTest|PrivateTest)_\d+\.jpg")
TABLE_COLUMNS = ["image", "label", "usage", "subset", "sha256"]


def parse_original(path: str) -> dict | None:
    """The usage and class of a release path, or None for anything that is not an original."""
    match = ORIGINAL.fullmatch(path)
    if not match or USAGE_OF_FOLDER[match["folder"]] != match["usage"]:
        return None
    if match["cls"] not in CLASS_MAP:
        return None
    return {"usage": match["usage"], "label": CLASS_MAP[match["cls"]]}


def fer_table(fer_dir: Path, checksums_path: Path) -> pd.DataFrame:
    """One row per original image present under ``fer_dir`` (``image`` is its relative path).

    Files are matched by name against the checksum list; their bytes are checked when the
    decode cache is built.
    """
    rows = []
    for name, digest in read_checksums(checksums_path).items():
        facts = parse_original(name)
        if facts is None:
            raise DataError(f"{checksums_path}: {name!r} is not a FER-2013 release path")
        if (fer_dir / name).is_file():
            rows.append({"image": name, **facts, "subset": SUBSET_OF_USAGE[facts["usage"]],
                         "sha256": digest})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table.sort_values("image", kind="stable").reset_index(drop=True)


def missing_usages(table: pd.DataFrame, usages=("Training",)) -> list[str]:
    return [u for u in usages if not (table["usage"] == u).any()]


def partial_usages(table: pd.DataFrame, checksums_path: Path) -> list[str]:
    """"<Usage> has n of its N images" for each usage only part of which is here: a part of
    the release may be absent, but a part that is here must be here whole."""
    release = Counter(parse_original(name)["usage"] for name in read_checksums(checksums_path))
    here = Counter(table["usage"])
    return [f"{usage} has {here[usage]} of its {release[usage]} images"
            for usage in sorted(here) if here[usage] < release[usage]]


def is_full_release(table: pd.DataFrame, checksums_path: Path) -> bool:
    """Every image of every usage is here: a usage only partly here (a fetch stopped in its
    copy) was audited and written as the release."""
    return (not missing_usages(table, tuple(USAGE_OF_FOLDER.values()))
            and not partial_usages(table, checksums_path))


# How a command without (all of) FER-2013 says to get it: fetch's own --dest is refused when
# it holds other files, as the shared copy's README does (a review), so its default folder.
FER_FETCH_HINT = ("run `python -m training fetch fer2013` and point EMOTION_FER2013_DIR at the "
                  "folder it prints")


def require_usages(table: pd.DataFrame, fer_dir: Path, checksums_path: Path,
                   usages=("Training",)) -> None:
    """A one-line way out when a command needs a part of FER-2013 that is not here, or
    would train or score on part of a usage (a copy stopped half-way)."""
    missing = missing_usages(table, usages)
    if missing:
        raise SystemExit(
            f"FER-2013 {', '.join(missing)} is not in {fer_dir}: {FER_FETCH_HINT}")
    partial = partial_usages(table, checksums_path)
    if partial:
        raise SystemExit(f"{fer_dir}: {'; '.join(partial)}: a full run needs each usage whole "
                         "(`python -m training verify fer2013` checks a copy)")


@contextlib.contextmanager
def _alone_into(dest: Path) -> Iterator[None]:
    """One fetch at a time into ``dest``: two shared its staging folder and each deleted the
    other's files. The lock file goes with the fetch; one a killed fetch left is taken over
    (the lock itself went with its process)."""
    lock = dest.parent / f".{dest.name}.lock"
    while True:
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise SystemExit(f"another fetch into {dest} is running: wait for it") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                break
        os.close(descriptor)  # removed by the fetch that just ended: take a new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(descriptor)


def fetch_fer2013(dest: Path, checksums_path: Path, source: str = FER_REPOSITORY,
                  commit: str = FER_COMMIT) -> Path:
    """Clone ``source`` (a URL or a local repository) at ``commit``, keep only the originals,
    verify them and put them in ``dest``. Nothing else of the repository is kept."""
    wanted = read_checksums(checksums_path)
    # a fetch replaces dest whole: only ever a folder of FER-2013's own files (an earlier
    # fetch), never one such as --dest ~/data, which it would have wiped
    if dest.exists():
        foreign = next((p for p in sorted(dest.rglob("*")) if not p.is_dir()
                        and p.relative_to(dest).as_posix() not in wanted), None)
        if foreign is not None or not dest.is_dir():
            raise SystemExit(f"{dest} holds files that are not FER-2013's ({foreign or dest}); "
                             "name a new or empty folder, or an earlier fetch's")
    if os.path.ismount(dest):  # a volume cannot be set aside: said before the clone
        raise SystemExit(f"{dest} is a mount point, which a fetch cannot replace: name a new "
                         "folder inside it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(dest.parent, os.W_OK):  # said before the clone, not after it
        raise SystemExit(f"{dest.parent} is not writable: a fetch stages its files beside "
                         f"{dest.name} and renames them into place")
    staging = dest.parent / f".{dest.name}.partial"
    earlier = dest.parent / f".{dest.name}.earlier"
    # SIGTERM and SIGHUP (a closed terminal) clean up as Ctrl-C does: they ended the process
    # with its staging folder and clone left behind
    with _alone_into(dest), stops_taken_as_ctrl_c():
        try:
            with tempfile.TemporaryDirectory(prefix="fer2013-") as tmp:
                work = Path(tmp) / "repo"
                work.mkdir()
                run_git(work, "init", "--quiet")
                fetch_commit(work, str(source), commit, str(source),
                             given=source != FER_REPOSITORY)
                checkout_as_committed(work, "FETCH_HEAD")
                shutil.rmtree(staging, ignore_errors=True)
                for name in wanted:
                    src = work / name
                    if src.is_file():
                        target = staging / name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(src, target)
                try:
                    verify_dataset(staging, checksums_path)
                except ChecksumError as exc:  # named by its source: the staging folder goes
                    raise ChecksumError(str(exc).replace(
                        str(staging), f"{source} at commit {commit[:12]}", 1)) from None
                # an earlier fetch is set aside, not deleted, until the new one is in place:
                # a Ctrl-C during its deletion left it half there
                shutil.rmtree(earlier, ignore_errors=True)
                if dest.exists():
                    dest.rename(earlier)
                staging.rename(dest)
        finally:
            # the earlier fetch back first, then the removals (which a second Ctrl-C may cut
            # short): a failed or interrupted fetch leaves the user's copy, not its staging
            if earlier.exists() and not dest.exists():
                earlier.rename(dest)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(earlier, ignore_errors=True)
    return dest


def pixel_digests(fer_dir: Path, names: list[str]) -> list[str]:
    """SHA-256 of each image's decoded 8-bit gray pixels: equal for the same picture even when
    the JPEG bytes differ."""
    import hashlib

    import numpy as np
    from PIL import Image

    digests = []
    for name in names:
        try:
            with Image.open(fer_dir / name) as image:
                pixels = np.asarray(image.convert("L"))
        except (OSError, SyntaxError) as exc:  # Pillow's own message names no file
            raise DataError(f"{fer_dir / name}: cannot decode it ({exc}); `python -m training "
                            "verify fer2013` checks the copy") from None
        digests.append(hashlib.sha256(pixels.tobytes() + bytes(pixels.shape)).hexdigest())
    return digests
