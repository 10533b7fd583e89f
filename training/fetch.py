"""Fetch the upstream dataset at the pinned commit and verify it against ``data/SHA256SUMS``."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from training.settings import CHECKSUMS_FILE, UPSTREAM_COMMIT, UPSTREAM_REPOSITORY


class ChecksumError(RuntimeError):
    pass


def read_checksums(path: Path = CHECKSUMS_FILE) -> dict[str, str]:
    """``relative path -> sha256`` from a ``sha256sum``-format file."""
    checksums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            checksums[name.lstrip("*")] = digest
    return checksums


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_dataset(dataset_dir: Path, checksums_path: Path = CHECKSUMS_FILE) -> int:
    """Check the legend and every labelled image; returns how many files were verified."""
    checksums = read_checksums(checksums_path)
    missing, mismatched = [], []
    for name, digest in checksums.items():
        path = dataset_dir / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != digest:
            mismatched.append(name)
    if missing or mismatched:
        raise ChecksumError(
            f"{dataset_dir}: {len(missing)} files missing (e.g. {missing[:3]}), "
            f"{len(mismatched)} differ from {checksums_path.name} (e.g. {mismatched[:3]})"
        )
    return len(checksums)


def fetch_dataset(dest: Path, repository: str = UPSTREAM_REPOSITORY,
                  commit: str = UPSTREAM_COMMIT, checksums_path: Path = CHECKSUMS_FILE) -> Path:
    """Shallow-fetch ``repository`` at ``commit`` into ``dest`` and verify it."""
    if not (dest / ".git").exists():
        dest.mkdir(parents=True, exist_ok=True)
        _git(dest, "init", "--quiet")
        _git(dest, "remote", "add", "origin", repository)
    _git(dest, "fetch", "--quiet", "--depth", "1", "origin", commit)
    _git(dest, "checkout", "--quiet", "--force", commit)
    verify_dataset(dest, checksums_path)
    return dest


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True)
