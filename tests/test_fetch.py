"""The fetch command's path, against a local repository standing in for upstream."""

import hashlib

import pytest

from tests.images import git_repository, png_bytes
from training.fetch import ChecksumError, fetch_dataset


@pytest.fixture
def upstream(tmp_path):
    repo = tmp_path / "upstream"
    files = {"data/legend.csv": b"user.id,image,emotion\n1,A_0001.png,happiness\n",
             "images/A_0001.png": png_bytes()}
    commit = git_repository(repo, files)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items()))
    return repo, commit, sums


def test_fetch_checks_out_the_pinned_commit_and_verifies_it(upstream, tmp_path):
    repo, commit, sums = upstream
    dest = fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)
    fetched = (dest / "images" / "A_0001.png").read_bytes()
    assert fetched == (repo / "images" / "A_0001.png").read_bytes()


def test_fetch_refuses_files_that_differ_from_the_checksums(upstream, tmp_path):
    repo, commit, sums = upstream
    sums.write_text(sums.read_text().replace(sums.read_text()[:8], "00000000", 1))
    with pytest.raises(ChecksumError, match="differ"):
        fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)
