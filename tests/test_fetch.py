"""The fetch command's path, against a local repository standing in for upstream."""

import contextlib
import hashlib
import os
import subprocess

import pytest

from tests.images import git_repository, later_commit, png_bytes
from training.fetch import FETCH_MARK, ChecksumError, DataError, fetch_commit, fetch_dataset
from training.settings import UPSTREAM_REPOSITORY


@pytest.fixture
def upstream(tmp_path):
    repo = tmp_path / "upstream"
    files = {"data/legend.csv": b"user.id,image,emotion\n1,A_0001.png,happiness\n",
             "images/A_0001.png": png_bytes()}
    commit = git_repository(repo, files)
    later_commit(repo, {"images/A_0001.png": png_bytes(seed=1)})  # the tip: not ours
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items()))
    return repo, commit, sums


def at_commit(repo, commit: str, name: str) -> bytes:
    return subprocess.run(["git", "show", f"{commit}:{name}"], cwd=repo, check=True,
                          capture_output=True).stdout


def test_fetch_checks_out_the_pinned_commit_and_verifies_it(upstream, tmp_path):
    repo, commit, sums = upstream
    dest = fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)
    fetched = (dest / "images" / "A_0001.png").read_bytes()
    assert fetched == at_commit(repo, commit, "images/A_0001.png") != (
        repo / "images" / "A_0001.png").read_bytes()
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, check=True,
                          capture_output=True, text=True).stdout.strip() == commit


def test_fetch_writes_the_bytes_committed_whatever_the_users_line_endings(upstream, tmp_path,
                                                                           monkeypatch):
    """Git for Windows' core.autocrlf=true wrote legend.csv with CRLF: no checksum matched,
    and the rerun blamed the user for changing the fetch's files (the data review)."""
    repo, commit, sums = upstream
    config = tmp_path / "gitconfig"
    attributes = tmp_path / "gitattributes"  # a user's own, which re-encoded the text
    attributes.write_text("*.csv working-tree-encoding=UTF-16LE-BOM\n")
    config.write_text(f"[core]\n\tautocrlf = true\n\teol = crlf\n\tattributesFile = "
                      f"{attributes}\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    committed = at_commit(repo, commit, "data/legend.csv")
    dest = fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)
    assert (dest / "data" / "legend.csv").read_bytes() == committed
    # an earlier fetch, checked out before this was mended, is mended by the next one: git
    # took its converted files for unchanged (their size and time in its index)
    attributes.write_text("")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for args in (["init", "--quiet"], ["remote", "add", "origin", f"file://{repo}"],
                 ["fetch", "--quiet", "--depth", "1", "origin", commit],
                 ["checkout", "--quiet", "--force", commit]):
        subprocess.run(["git", *args], cwd=earlier, check=True, capture_output=True)
    (earlier / ".git" / FETCH_MARK).write_text("made by python -m training fetch\n")
    legend = earlier / "data" / "legend.csv"
    assert legend.read_bytes() == committed.replace(b"\n", b"\r\n")
    past = legend.stat().st_mtime - 10  # not "racily clean": git trusts the index
    for path in (legend, earlier / "images" / "A_0001.png"):
        os.utime(path, (past, past))
    subprocess.run(["git", "update-index", "--refresh"], cwd=earlier, capture_output=True)
    fetch_dataset(earlier, sums, f"file://{repo}", commit)
    assert legend.read_bytes() == committed


def test_a_fetch_at_a_moved_pin_removes_what_the_commit_no_longer_holds(upstream, tmp_path):
    """Every file of an earlier fetch is written again; a mend that dropped git's index
    first left a file the new commit removed behind, untracked (found on rereading it)."""
    repo, first, sums = upstream
    dest = fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", first)
    subprocess.run(["git", "rm", "-q", "images/A_0001.png"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m",
                    "moved"], cwd=repo, check=True)
    moved = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout.strip()
    legend_only = tmp_path / "LEGEND_ONLY"
    legend_only.write_text(sums.read_text().splitlines()[0] + "\n")
    fetch_dataset(dest, legend_only, f"file://{repo}", moved)
    assert sorted(p.name for p in dest.rglob("*") if ".git" not in p.parts) == [
        "data", "legend.csv"]


def test_a_checksum_list_that_is_empty_or_absent_is_said_before_the_clone(upstream, tmp_path):
    """An emptied list verified nothing and passed; a missing one was said only after the
    whole upstream had been cloned (the data review)."""
    repo, commit, _ = upstream
    empty = tmp_path / "EMPTY"
    empty.write_text("\n")
    for sums, says in ((empty, "lists no file"), (tmp_path / "nowhere", "no such file")):
        with pytest.raises(DataError, match=f"^{sums}: {says}"):
            fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)
        assert not (tmp_path / "clone").exists()


def test_fetch_refuses_files_that_differ_from_the_checksums(upstream, tmp_path):
    repo, commit, sums = upstream
    sums.write_text(sums.read_text().replace(sums.read_text()[:8], "00000000", 1))
    with pytest.raises(ChecksumError, match="differ"):
        fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)


def test_a_fetch_that_failed_takes_the_next_runs_source(upstream, tmp_path):
    """The first try's remote (unreachable) stayed, and a later --source was ignored."""
    repo, commit, sums = upstream
    dest = tmp_path / "clone"
    with pytest.raises(SystemExit, match="did not give commit .*: --source must be a URL or "
                                         "a path of a git repository that holds it"):
        fetch_dataset(dest, sums, f"file://{tmp_path / 'nowhere'}", commit)
    assert (dest / ".git").is_dir()
    # with no --source given, the advice is the upstream's, not --source's (a review)
    with pytest.raises(SystemExit, match="check this machine reaches it, or give --source"):
        fetch_commit(dest, f"file://{tmp_path / 'nowhere'}", commit, "the upstream",
                     given=False)
    fetch_dataset(dest, sums, f"file://{repo}", commit)
    assert (dest / "images" / "A_0001.png").read_bytes() == at_commit(
        repo, commit, "images/A_0001.png")


def test_fetch_never_checks_out_over_a_folder_of_other_files(upstream, tmp_path):
    repo, commit, sums = upstream
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "README.md").write_text("my notes")
    with pytest.raises(SystemExit, match="holds files and is not an earlier fetch"):
        fetch_dataset(dest, sums, f"file://{repo}", commit)
    assert [p.name for p in dest.iterdir()] == ["README.md"]
    assert (dest / "README.md").read_text() == "my notes"


@pytest.mark.parametrize("origin", ["https://example.invalid/project", UPSTREAM_REPOSITORY])
def test_fetch_never_checks_out_over_a_repository_it_did_not_make(upstream, tmp_path, origin):
    """`--dest .` in the project: its own repository was taken for an earlier fetch, its
    remote replaced and the dataset checked out over its files. A user's own clone of the
    dataset (its origin the upstream's address) is refused too: it is not shallow."""
    repo, commit, sums = upstream
    project = tmp_path / "project"
    git_repository(project, {"notes.md": b"committed"})
    subprocess.run(["git", "remote", "add", "origin", origin], cwd=project, check=True)
    (project / "notes.md").write_text("an edit in progress")
    with pytest.raises(SystemExit, match="holds files and is not an earlier fetch"):
        fetch_dataset(project, sums, f"file://{repo}", commit)
    assert (project / "notes.md").read_text() == "an edit in progress"
    assert not (project / "images").exists()
    assert subprocess.run(["git", "remote", "get-url", "origin"], cwd=project, check=True,
                          capture_output=True, text=True).stdout.strip() == origin


@pytest.mark.parametrize("stopped_after", ["git init", "the mark"])
def test_a_first_fetch_stopped_halfway_is_taken_up_again(upstream, tmp_path, stopped_after):
    repo, commit, sums = upstream
    dest = tmp_path / "clone"
    dest.mkdir()
    subprocess.run(["git", "init", "--quiet"], cwd=dest, check=True)
    if stopped_after == "the mark":  # and before its remote was added
        (dest / ".git" / FETCH_MARK).write_text("made by python -m training fetch\n")
    fetch_dataset(dest, sums, f"file://{repo}", commit)
    assert (dest / "images" / "A_0001.png").is_file()


def test_a_fetch_never_undoes_changes_to_an_earlier_one(upstream, tmp_path):
    repo, commit, sums = upstream
    dest = fetch_dataset(tmp_path / "clone", sums, f"file://{repo}", commit)
    (dest / "data" / "legend.csv").write_text("my relabelling in progress")
    with pytest.raises(SystemExit, match="have been changed") as refused:
        fetch_dataset(dest, sums, f"file://{repo}", commit)
    assert (dest / "data" / "legend.csv").read_text() == "my relabelling in progress"
    # The way out it names works; "move them away" did not: a moved file is a deleted one.
    # Also after a `git mv` of theirs, and pasted into a shell, with a space in the folder.
    subprocess.run(["git", "mv", "images/A_0001.png", "images/B.png"], cwd=dest, check=True)
    restore = str(refused.value).split("`")[3]
    assert restore.startswith("git -C ") and restore.endswith(" checkout -- .")
    subprocess.run(restore, shell=True, check=True)
    assert fetch_dataset(dest, sums, f"file://{repo}", commit) == dest
    spaced = fetch_dataset(tmp_path / "my data" / "clone", sums, f"file://{repo}", commit)
    (spaced / "images" / "A_0001.png").unlink()
    with pytest.raises(SystemExit, match="have been changed or removed") as refused:
        fetch_dataset(spaced, sums, f"file://{repo}", commit)
    subprocess.run(str(refused.value).split("`")[3], shell=True, check=True)
    assert fetch_dataset(spaced, sums, f"file://{repo}", commit) == spaced


def test_a_relative_source_is_taken_from_where_the_command_runs(upstream, tmp_path,
                                                                monkeypatch, capsys):
    """git ran in --dest, where a relative --source named nothing (a review)."""
    import training.__main__ as cli
    from training.settings import TrainingSettings

    repo, commit, sums = upstream
    data = tmp_path / "data"
    data.mkdir()
    sums.rename(data / "SHA256SUMS")
    monkeypatch.setattr(cli, "get_training_settings", lambda: TrainingSettings(data_dir=data))
    monkeypatch.setattr(fetch_dataset, "__defaults__", (UPSTREAM_REPOSITORY, commit))  # pin
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fetch", "--source", "upstream", "--dest", "clone"]) == 0, capsys.readouterr()
    assert (tmp_path / "clone" / "images" / "A_0001.png").is_file()


def test_a_fetch_stopped_by_sigterm_leaves_no_git_process(tmp_path):
    """A SIGTERM to the command alone, as a supervisor sends it, left git's network helpers
    (git remote-http) waiting on their socket for good (a review): a server that accepts
    and never answers holds the fetch there."""
    import signal
    import socket
    import sys
    import time

    import psutil

    from tests.server import REPO

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/repo"
    said = tmp_path / "stderr"  # a file: helpers left alive would hold a pipe open for good
    with open(said, "w") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "training", "fetch", "--dest",
                                str(tmp_path / "clone"), "--source", url], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=stderr,
                               start_new_session=True)
    try:
        held, deadline = None, time.monotonic() + 60
        while held is None and time.monotonic() < deadline:
            time.sleep(0.2)
            server.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                held, _ = server.accept()  # git's helper is connected: it waits here
        assert held is not None, "git never connected"
        helpers = [p for p in psutil.Process(run.pid).children(recursive=True)]
        assert helpers
        run.send_signal(signal.SIGTERM)
        status = run.wait(30)
        gone, alive = psutil.wait_procs(helpers, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert status == 143, said.read_text()
        assert said.read_text().strip().splitlines()[-1] == (
            "python -m training fetch: stopped by SIGTERM; what it had finished stays")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for process in psutil.process_iter(["cmdline"]):
            if url in " ".join(process.info["cmdline"] or []):
                process.kill()
        server.close()


GIT_HOLDING_A_LOCK = """#!/bin/sh
# git as it checks out: its lock file, removed on a SIGTERM as git's own handler does
touch index.lock
trap 'rm -f index.lock; exit 143' TERM
touch started
while :; do sleep 0.1; done
"""

STOPPED_WHILE_GIT_RUNS = """
import os, signal, sys, threading, time
from pathlib import Path
from service.signals import stops_taken_as_ctrl_c
from training.fetch import run_git

here = Path(sys.argv[1])

def stop_once_started():
    while not (here / "started").exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop_once_started, daemon=True).start()
with stops_taken_as_ctrl_c():
    try:
        run_git(here, "checkout")
    except KeyboardInterrupt:
        print("stopped")
"""


def test_a_stopped_git_gets_to_remove_its_lock_files(tmp_path):
    """git was ended by SIGKILL: a stop during its checkout left .git/index.lock, which
    refused every later fetch into that folder (the diff review). It gets a SIGTERM first."""
    import sys

    from tests.server import REPO

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(GIT_HOLDING_A_LOCK)
    (bin_dir / "git").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, "-c", STOPPED_WHILE_GIT_RUNS, str(work)],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.stdout.strip() == "stopped", result.stderr
    assert (work / "started").exists() and not (work / "index.lock").exists()
