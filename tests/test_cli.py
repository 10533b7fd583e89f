"""``emotion-detect``: folders with broken files, an interrupted run resumed, a real server
behind ``--url``, a video the test encodes itself, and the same answers as ``/predict``."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.batch import COLUMNS
from service.classes import CLASS_NAMES, NUM_CLASSES
from service.cli import main
from service.settings import REPO_MODELS_DIR, Settings
from tests.images import assert_upright, encode, gray_image, jpeg_bytes, upright_marker
from tests.server import REPO, running_server

pytestmark = pytest.mark.dataset
COMMAND = [sys.executable, "-m", "service.cli"]


@pytest.fixture(scope="module")
def test_images(data_settings) -> list[tuple[str, bytes]]:
    from training.splits import read_split

    split = read_split(data_settings.splits_dir / "identity.csv")
    names = list(split[split["split"] == "test"]["image"].iloc[:24])
    return [(name, (data_settings.images_dir / name).read_bytes()) for name in names]


@pytest.fixture
def photo_folder(tmp_path, test_images):
    """Twelve real test images, plus what a real folder also holds."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name, data in test_images[:10]:
        (folder / name).write_bytes(data)
    for name, data in test_images[10:12]:
        (folder / "more" / name).write_bytes(data)
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(200, 200)[:300])
    (folder / "notes.jpg").write_text("not an image at all")
    (folder / "empty.png").write_bytes(b"")
    (folder / "drawing.png").write_bytes(encode(gray_image(90, 120)))
    (folder / ".hidden.jpg").write_bytes(test_images[0][1])
    return folder


def read_rows(path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_folder_with_broken_files_gives_a_row_each_and_exit_0(photo_folder, tmp_path,
                                                                 capsys):
    out = tmp_path / "rows.csv"
    status = main(["images", str(photo_folder), "--out", str(out), "--faces", "none",
                   "--workers", "1"])
    assert status == 0
    rows = {row["path"]: row for row in read_rows(out)}
    assert len(rows) == 10 + 4  # not the sub-folder, not the hidden file
    assert list(read_rows(out)[0]) == ["path", "face_x", "face_y", "face_width",
                                       "face_height", "label", *CLASS_NAMES, "error", "code"]
    codes = {name: rows[str(photo_folder / name)]["code"] for name in (
        "truncated.jpg", "notes.jpg", "empty.png")}
    assert codes == {"truncated.jpg": "corrupt_image", "notes.jpg": "not_an_image",
                     "empty.png": "not_an_image"}
    good = [r for r in rows.values() if not r["code"]]
    assert len(good) == 11 and all(r["label"] in CLASS_NAMES for r in good)
    for row in good:
        assert sum(float(row[c]) for c in CLASS_NAMES) == pytest.approx(1, abs=1e-5)
    assert "14 files (0 already in" in (said := capsys.readouterr().err)
    assert ", 14 rows, 3 files with an error, in " in said  # a mutant counted none

    deep = tmp_path / "deep.jsonl"
    assert main(["images", str(photo_folder), "--recursive", "--out", str(deep),
                 "--faces", "none", "--workers", "2", "--batch-size", "3"]) == 0
    deep_rows = read_rows(deep)
    assert len(deep_rows) == 16 and deep_rows[0]["face_x"] is None
    # Output follows the input order, whatever the workers' order of finishing.
    assert [r["path"] for r in deep_rows] == sorted(r["path"] for r in deep_rows)


@pytest.mark.parametrize(("files", "batch_size", "started"), [(3, 8, None), (9, 4, 3)])
def test_no_more_workers_start_than_there_are_batches(files, batch_size, started,
                                                      monkeypatch):
    """A worker per CPU started for 3 files: each loaded the models and took no batch, and
    the README's example took 2.1 s, not 0.3 (a README walkthrough)."""
    import service.batch as batch

    pools = []

    class CountedPool(batch.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(batch, "ProcessPoolExecutor", CountedPool)
    photos = sorted(str(p) for p in (REPO_MODELS_DIR.parent / "examples").glob("*.jpg"))
    paths = [photos[i % len(photos)] for i in range(files)]
    runner = batch.LocalRunner(REPO_MODELS_DIR, "cnn", "none", workers=4,
                               batch_size=batch_size)
    rows = [file_rows for chunk in runner.run(paths) for file_rows in chunk]
    assert [r[0].values["path"] for r in rows] == paths
    assert all(r[0].values["label"] in CLASS_NAMES for r in rows)
    assert pools == ([] if started is None else [started])


def test_a_list_file_and_an_unreadable_path(photo_folder, tmp_path):
    listing = tmp_path / "list.txt"
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    # a byte-order mark, as Windows editors write, made the first path unreadable
    # and a path between spaces, its line ended CRLF, and a line of a tab alone: trimmed,
    # as the README says, and the blank one skipped
    listing.write_text(f"\ufeff{photo_folder / 'drawing.png'}\n# a comment\n\n{link}\n"
                       f"  {photo_folder / 'drawing.png'}  \r\n\t\r\n")
    out = tmp_path / "rows.csv"
    assert main(["images", str(listing), "--out", str(out), "--workers", "1"]) == 1
    rows = read_rows(out)
    assert [r["code"] for r in rows] == ["", "unreadable"]
    assert "cannot read" in rows[1]["error"]
    assert rows[0]["path"] == str(photo_folder / "drawing.png")  # twice listed, once done


def test_the_services_image_limits_apply_in_process_too(photo_folder, tmp_path, monkeypatch,
                                                        request):
    from service.settings import load_settings

    monkeypatch.setenv("EMOTION_MAX_PIXELS", str(100 * 100))  # drawing.png is 90x120
    load_settings.cache_clear()  # read once per process: read again, and again after
    request.addfinalizer(load_settings.cache_clear)
    out = tmp_path / "rows.csv"
    assert main(["images", str(photo_folder / "drawing.png"), str(photo_folder / "empty.png"),
                 "--out", str(out), "--faces", "none", "--workers", "1"]) == 0
    rows = {Path(row["path"]).name: row for row in read_rows(out)}
    assert rows["drawing.png"]["code"] == "too_many_pixels" and not rows["drawing.png"]["label"]
    assert rows["empty.png"]["code"] == "not_an_image"


def test_a_file_over_the_byte_limit_is_refused_without_being_read_whole(tmp_path):
    """A 400 MB file took 638 MB to be refused: it is read one byte past the limit only."""
    import tracemalloc

    from service.batch import read_inputs

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(30_000_000))
    small = tmp_path / "small.png"
    small.write_bytes(encode(gray_image(), "PNG"))
    tracemalloc.start()
    try:
        (too_big, fine), unreadable = read_inputs([str(big), str(small)], max_bytes=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5e6, f"{peak / 1e6:.0f} MB"
    assert not unreadable
    assert too_big.data is None and too_big.error.code == "too_many_bytes"
    assert fine.data == small.read_bytes() and fine.error is None
    # the limit to the byte, as the service counts it (a mutant refused a file at the limit)
    size = small.stat().st_size
    [at], _ = read_inputs([str(small)], max_bytes=size)
    assert at.error is None and at.data == small.read_bytes()
    [over], _ = read_inputs([str(small)], max_bytes=size - 1)
    assert over.error.code == "too_many_bytes"


def test_usage_mistakes_exit_2_in_one_line(tmp_path):
    for argv in (["images", str(tmp_path), "--out", str(tmp_path / "rows.xlsx")],
                 ["images", str(tmp_path / "missing"), "--out", str(tmp_path / "r.csv")]):
        result = subprocess.run([*COMMAND, *argv], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2
        # the subcommand's usage line and name, not the top command's
        assert result.stderr.startswith("usage: emotion-detect images ")
        assert result.stderr.strip().splitlines()[-1].startswith(
            "emotion-detect images: error:")
    result = subprocess.run([*COMMAND, "images", str(tmp_path), "--out", str(tmp_path / "r.csv"),
                             "--model", "resnet"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "emotion-detect images: error: unknown model 'resnet'")
    # and before any work where the files take several batches on several workers: unchecked,
    # a worker's traceback, exit 1, and the output emptied (a review's mutant)
    photos, out = tmp_path / "photos", tmp_path / "kept.csv"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        (photos / name).write_bytes(encode(gray_image(), "PNG"))
    out.write_text("my own notes\n")
    result = subprocess.run([*COMMAND, "images", str(photos), "--out", str(out), "--model",
                             "resnet", "--workers", "2", "--batch-size", "1"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "emotion-detect images: error: unknown model 'resnet'"), result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == "my own notes\n"
    for command in (["images", str(tmp_path)], ["video", str(tmp_path / "clip.mp4")]):
        result = subprocess.run([*COMMAND, *command, "--out", str(tmp_path / "r.csv"),
                                 "--model", ""], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
            f"emotion-detect {command[0]}: error: argument --model: empty; name a model, "
            "such as cnn or knn")


def test_list_files_of_any_case_and_ndjson_output(tmp_path):
    """A list named LIST.TXT is a list, as list.txt is; .ndjson is JSON Lines (mutants of
    each passed every test)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        (photos / name).write_bytes(encode(gray_image(), "PNG"))
    listing = tmp_path / "LIST.TXT"
    listing.write_text(f"{photos / 'a.png'}\n{photos / 'b.png'}\n")
    out = tmp_path / "rows.ndjson"
    assert main(["images", str(listing), "--out", str(out), "--faces", "none",
                 "--workers", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(photos / "a.png"), str(photos / "b.png")]
    assert all(row["label"] in CLASS_NAMES and not row["code"] for row in rows)


def test_a_models_folder_with_a_broken_manifest_is_one_line_and_exit_1(tmp_path, capsys):
    from tests.api import models_copy

    folder = models_copy(tmp_path)
    (folder / "manifest.json").write_text("{")
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    assert main(["images", str(photo), "--out", str(tmp_path / "r.csv"), "--models-dir",
                 str(folder)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("emotion-detect: ") and "manifest" in line, line
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_each_files_rows_are_on_disk_before_the_next_file(tmp_path, suffix):
    """A run killed outright keeps every file's rows written so far, which --resume reads
    back (a mutant without the flush passed every test: rows waited in the buffer)."""
    from service.batch import Row, RowWriter

    out = tmp_path / f"rows{suffix}"
    writer = RowWriter(out, COLUMNS)
    try:
        writer.write([Row.error("a.png", "cannot read the file", "unreadable")])
        assert b"a.png" in out.read_bytes()  # read as another process would, before close
    finally:
        writer.close()


def test_resume_of_an_empty_folder_still_writes_the_header(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "rows.csv"
    empty.mkdir()
    assert main(["images", str(empty), "--out", str(out), "--resume", "--workers", "1"]) == 0
    assert out.read_bytes() == (",".join(COLUMNS) + "\r\n").encode()


def test_resume_after_an_interrupted_run_finishes_the_rest_once(test_images, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    copies = 32  # 768 files: after 40 rows, hundreds of milliseconds left to interrupt even
    for copy in range(copies):  # on a fast machine, where 192 left a margin of a few polls
        for name, data in test_images:
            (folder / f"{copy}-{name}").write_bytes(data)
    total = copies * len(test_images)
    out = tmp_path / "rows.csv"
    argv = [*COMMAND, "images", str(folder), "--out", str(out), "--faces", "none",
            "--workers", "1", "--batch-size", "4"]
    process = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_bytes().splitlines()) < 40:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with out.open("ab") as handle:
        handle.write(b"/cut/short/mid-write.jpg,12,3")  # what a kill mid-write leaves
    before = read_rows(out)
    assert 40 <= len(before) < total
    result = subprocess.run([*argv, "--resume"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == total
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())
    # The cut line is dropped, and the last complete file is done again in case its rows
    # were cut short too.
    assert f"({len(before) - 2} already in" in result.stderr


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_redoes_a_file_whose_rows_were_cut_short(tmp_path, suffix, monkeypatch):
    from service.batch import COLUMNS, Row, RowWriter, finished_paths

    out = tmp_path / f"rows{suffix}"
    writer = RowWriter(out, COLUMNS)

    def face(path, x):
        return Row({**dict.fromkeys(COLUMNS), "path": path, "face_x": x, "label": "NEUTRAL"})

    writer.write([face("a.jpg", 1), face("a.jpg", 2)])
    writer.write([face("b.jpg", 1), face("b.jpg", 2)])
    writer.close()
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 9])  # the second face of b.jpg, cut mid-line
    with monkeypatch.context() as patched:
        # cut in place where b.jpg's rows began, not written anew: it was emptied and
        # rewritten, and an interrupt in between (as here) lost every earlier row
        def interrupted(*args):
            raise KeyboardInterrupt
        patched.setattr(RowWriter, "write", interrupted)
        assert finished_paths(out) == {"a.jpg"}
    assert [r["path"] for r in read_rows(out)] == ["a.jpg", "a.jpg"]
    assert data.startswith(out.read_bytes())
    assert finished_paths(out) == set()  # an intact file: its last path is redone
    if suffix == ".jsonl":  # a blank line, as an editor may leave, is not a foreign file
        writer = RowWriter(out, COLUMNS, append=True)
        writer.write([face("a.jpg", 1), face("c.jpg", 1)])
        writer.close()
        out.write_bytes(out.read_bytes() + b"\n")
        assert finished_paths(out) == {"a.jpg"}


def test_resume_keeps_the_rows_of_files_it_is_not_given(test_images, tmp_path):
    """--resume cut the last file of the output whatever the run was given, so resuming
    with other inputs deleted that file's rows for good."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, images in ((first, test_images[:3]), (second, test_images[3:5])):
        folder.mkdir()
        for name, data in images:
            (folder / name).write_bytes(data)
    out = tmp_path / "rows.csv"
    argv = ["--out", str(out), "--faces", "none", "--workers", "1"]
    assert main(["images", str(first), *argv]) == 0
    before = read_rows(out)
    assert main(["images", str(second), *argv, "--resume"]) == 0
    rows = read_rows(out)
    assert rows[:3] == before
    assert [r["path"] for r in rows[3:]] == sorted(str(p) for p in second.iterdir())


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_reads_again_a_file_that_could_not_be_read(test_images, tmp_path, suffix):
    """An unreadable row was taken as done: fixed since (here a link's target that came
    back), the file was never read again and the run said every file was read."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in test_images[:3]:
        (folder / name).write_bytes(data)
    target = tmp_path / "elsewhere.jpg"
    (folder / "0-link.jpg").symlink_to(target)  # sorts first: its row is not the last
    # the output through a link, and another's to write in: rewritten in place, not replaced
    (tmp_path / "store").mkdir()
    stored = tmp_path / "store" / f"rows{suffix}"
    out = tmp_path / f"rows{suffix}"
    out.symlink_to(stored)
    argv = ["images", str(folder), "--out", str(out), "--faces", "none", "--workers", "1"]
    assert main(argv) == 1
    if os.geteuid() == 0:
        os.chown(stored, 4321, 4321)
    owner = stored.stat().st_uid, stored.stat().st_gid
    before = {r["path"]: r for r in read_rows(out)}
    assert before[str(folder / "0-link.jpg")]["code"] == "unreadable"
    target.write_bytes(test_images[5][1])
    assert main([*argv, "--resume"]) == 0
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(read_rows(out)) == len(rows) == 4
    link = rows.pop(str(folder / "0-link.jpg"))
    assert link["label"] in CLASS_NAMES and not link["code"]
    assert rows == {p: r for p, r in before.items() if "0-link" not in p}
    assert out.is_symlink() and (stored.stat().st_uid, stored.stat().st_gid) == owner
    assert os.listdir(tmp_path / "store") == [stored.name]


def test_resume_ends_a_last_json_line_left_without_its_line_end(test_images, tmp_path):
    """A last JSON line that had lost only its line end was kept, and the next run's first
    row was written on the same line: the file was then refused as not this command's."""
    for folder, images in (("p", test_images[:2]), ("q", test_images[2:3])):
        (tmp_path / folder).mkdir()
        for name, data in images:
            (tmp_path / folder / name).write_bytes(data)
    out = tmp_path / "rows.jsonl"
    argv = ["--out", str(out), "--faces", "none", "--workers", "1"]
    assert main(["images", str(tmp_path / "p"), *argv]) == 0
    out.write_bytes(out.read_bytes().removesuffix(b"\n"))
    assert main(["images", str(tmp_path / "q"), *argv, "--resume"]) == 0
    assert main(["images", str(tmp_path / "q"), *argv, "--resume"]) == 0  # still ours
    assert [Path(r["path"]).parent.name for r in read_rows(out)] == ["p", "p", "q"]


def run_without_file_permissions(argv: list[str]) -> subprocess.CompletedProcess:
    """The command as a user whom ``chmod 000`` stops: root, as CI runs, reads anything
    unless its capabilities to override file permissions are dropped."""
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 else []
    return subprocess.run([*drop, *COMMAND, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_a_folder_that_cannot_be_listed_gets_its_row_and_exit_1(test_images, tmp_path):
    """--recursive skipped a sub-folder it could not list without a word and exited 0; the
    same folder named on the command line stopped the run with no rows at all, as did one
    that could be listed but not searched."""
    top = tmp_path / "top"
    for sub in ("open", "closed", "unsearchable/inner"):
        (top / sub).mkdir(parents=True)
        (top / sub / test_images[0][0]).write_bytes(test_images[0][1])
    (top / "unsearchable" / test_images[1][0]).write_bytes(test_images[1][1])
    photo = str(top / "open" / test_images[0][0])
    argv = ["--out", str(tmp_path / "rows.csv"), "--faces", "none", "--workers", "1"]
    (top / "closed").chmod(0)
    (top / "unsearchable").chmod(0o444)  # its names can be read, not what they are
    try:
        for paths in ([str(top), "--recursive"],
                      [str(top / "closed"), str(top / "open"), str(top / "unsearchable")],
                      # named: a name in a folder not searchable stopped the run, no rows
                      [str(top / "closed"), photo, str(top / "unsearchable" / "inner"),
                       str(top / "unsearchable" / test_images[1][0])]):
            (tmp_path / "rows.csv").unlink(missing_ok=True)  # each run's own rows
            result = run_without_file_permissions(["images", *paths, *argv])
            assert result.returncode == 1, result.stderr
            rows = {r["path"]: r for r in read_rows(tmp_path / "rows.csv")}
            assert rows.pop(photo)["label"] in CLASS_NAMES
            assert rows.pop(str(top / "closed"))["error"] == \
                "cannot list the folder: Permission denied"
            assert sorted(rows) == sorted(str(top / "unsearchable" / name)
                                          for name in ("inner", test_images[1][0]))
            assert {(r["error"], r["code"]) for r in rows.values()} == {
                ("cannot read the file: Permission denied", "unreadable")}
    finally:
        (top / "closed").chmod(0o755)
        (top / "unsearchable").chmod(0o755)
    # the folder's row goes once its files are read
    assert main(["images", str(top), "--recursive", *argv, "--resume"]) == 0
    paths = [r["path"] for r in read_rows(tmp_path / "rows.csv")]
    assert sorted(paths) == sorted(str(p) for p in top.rglob("*.jpg"))


class Terminated(Exception):
    """What the test's SIGTERM handler raises: the default one would end pytest."""


def raise_terminated(number, frame):
    raise Terminated


@pytest.mark.parametrize(("number", "handler", "raised"), [
    (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
    (signal.SIGTERM, raise_terminated, Terminated),
    (signal.SIGHUP, raise_terminated, Terminated)])  # a closed terminal (the whole-diff review)
def test_a_ctrl_c_while_resume_rewrites_the_output_comes_after_it(tmp_path, monkeypatch,
                                                                  number, handler, raised):
    """The signal mask held SIGINT and SIGTERM in the main thread only: the kernel gave them
    to numpy's thread, and the rewrite stopped half done, leaving a row no run wrote (or,
    for SIGTERM, a file --resume refused), (the diff review)."""
    from service import batch
    from service.batch import COLUMNS, Row, RowWriter, finished_paths

    out = tmp_path / "rows.csv"
    writer = RowWriter(out, COLUMNS)
    names = [f"{n:05}.jpg" for n in range(2000)]
    writer.write([Row.error(names[0], "cannot read the file: gone", "unreadable")])
    for name in names[1:]:
        writer.write([Row({**dict.fromkeys(COLUMNS), "path": name, "label": "NEUTRAL"})])
    writer.close()
    opened = batch.Path.open

    class InterruptedAfterWriting:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def write(self, data):
            written = self.handle.write(data)
            # between the write and the truncate, to another thread, as the kernel may choose
            # (a mask on the main thread does not hold it there)
            signal.pthread_kill(bystander.ident, number)
            for _ in range(50):
                time.sleep(0.01)  # Python runs the handler in the main thread meanwhile
            return written

    monkeypatch.setattr(batch.Path, "open", lambda self, mode="r", *args, **kwargs: (
        InterruptedAfterWriting(opened(self, mode, *args, **kwargs)) if mode == "r+b"
        else opened(self, mode, *args, **kwargs)))
    # Python's own handler, as under a terminal: a shell's background job starts with SIGINT
    # ignored, and then the Ctrl-C, taken after the rewrite, is ignored there too
    previous = signal.signal(number, handler)
    bystander = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    bystander.start()
    try:
        with pytest.raises(raised):
            finished_paths(out, names)
    finally:
        signal.signal(number, previous)
    monkeypatch.undo()
    assert [r["path"] for r in read_rows(out)] == names[1:-1]  # whole, and nothing more


def test_a_resume_refused_before_its_work_leaves_the_output_as_it_was(test_images, tmp_path):
    """--resume cut the output before the service was checked: each retry against a service
    that was down removed one more file's rows (the whole-diff review)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in test_images[:3]:
        (folder / name).write_bytes(data)
    out = tmp_path / "rows.csv"
    argv = ["images", str(folder), "--out", str(out), "--faces", "none"]
    assert main([*argv, "--workers", "1"]) == 0
    before = out.read_bytes()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for _ in range(2):
        assert main([*argv, "--resume", "--url", f"http://127.0.0.1:{port}"]) == 1
        assert out.read_bytes() == before


def test_resume_keeps_the_row_of_a_folder_that_still_cannot_be_listed(test_images, tmp_path):
    """Given a file inside it, a folder that could still not be listed lost its row (the
    diff review): only once it can be listed do its files' rows stand for it."""
    top = tmp_path / "top"
    (top / "searchable").mkdir(parents=True)
    photo = top / "searchable" / test_images[0][0]
    photo.write_bytes(test_images[0][1])
    out = tmp_path / "rows.csv"
    argv = ["--out", str(out), "--faces", "none", "--workers", "1"]
    (top / "searchable").chmod(0o111)  # its files can be opened by name, not listed
    try:
        assert run_without_file_permissions(
            ["images", str(top), "--recursive", *argv]).returncode == 1
        result = run_without_file_permissions(["images", str(photo), *argv, "--resume"])
        assert result.returncode == 0, result.stderr
    finally:
        (top / "searchable").chmod(0o755)
    rows = {r["path"]: r for r in read_rows(out)}
    assert rows.keys() == {str(top / "searchable"), str(photo)}
    assert rows[str(top / "searchable")]["code"] == "unreadable"


def test_resume_ends_a_csv_header_left_without_its_line_end(tmp_path):
    """Rows were appended onto the header's line, and the next --resume refused the file
    (the diff review)."""
    from service.batch import COLUMNS, Row, RowWriter, finished_paths

    out = tmp_path / "rows.csv"
    RowWriter(out, COLUMNS).close()
    out.write_bytes(out.read_bytes().removesuffix(b"\r\n"))
    assert finished_paths(out, ["a.jpg"]) == set()
    writer = RowWriter(out, COLUMNS, append=True)
    writer.write([Row({**dict.fromkeys(COLUMNS), "path": "a.jpg", "label": "NEUTRAL"})])
    writer.close()
    assert [r["path"] for r in read_rows(out)] == ["a.jpg"]
    assert finished_paths(out, ["b.jpg"]) == {"a.jpg"}


def test_resume_starts_again_a_csv_cut_inside_its_header(tmp_path):
    """Cut at any of its first 120 bytes, the file was refused as not written by this command
    (a JSON Lines file cut inside its first row was taken): the third diff review."""
    from service.batch import COLUMNS, Row, RowWriter, finished_paths

    out = tmp_path / "rows.csv"
    RowWriter(out, COLUMNS).close()
    header = out.read_bytes()
    for cut in range(1, len(header) - 2):  # a whole header is tested above
        out.write_bytes(header[:cut])
        assert finished_paths(out, ["a.jpg"]) == set(), cut
        assert out.read_bytes() == b""  # written afresh, header first
    writer = RowWriter(out, COLUMNS, append=True)
    writer.write([Row({**dict.fromkeys(COLUMNS), "path": "a.jpg", "label": "NEUTRAL"})])
    writer.close()
    assert out.read_bytes().startswith(header)
    assert [r["path"] for r in read_rows(out)] == ["a.jpg"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_reads_back_paths_holding_any_line_break(tmp_path, suffix):
    """A lone carriage return in a file name was written bare to the CSV, which split the
    row there: --resume then refused the command's own output."""
    from service.batch import COLUMNS, Row, RowWriter, finished_paths

    out = tmp_path / f"rows{suffix}"
    writer = RowWriter(out, COLUMNS)
    names = ["a\rb.jpg", "c\nd.jpg", "e\r\nf.jpg", "g.jpg"]
    for name in names:
        writer.write([Row({**dict.fromkeys(COLUMNS), "path": name, "label": "NEUTRAL"})])
    writer.close()
    assert finished_paths(out) == set(names[:-1])
    assert [r["path"] for r in read_rows(out)] == names[:-1]


def test_the_knn_in_several_workers_gives_the_rows_of_one(tmp_path):
    """Forked after the kNN had run in the parent (check() loads the models), each worker
    waited for ever in OpenMP's barrier: emotion-detect --model knn hung at its default
    --workers on any machine of 2 CPUs or more. Two things keep it off now, and this checks
    the outcome, not which: the workers start from a forkserver, and every process's kNN
    runs on one OpenMP thread (its share of the CPUs), which starts no thread team to fork."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("two_people.jpg", "four_people.jpg", "three_people.jpg"):
        shutil.copy(REPO / "examples" / name, photos / name)
    rows = {}
    for workers in ("1", "2"):
        out = tmp_path / f"knn-{workers}.csv"
        result = subprocess.run([*COMMAND, "images", str(photos), "--model", "knn", "--faces",
                                 "all", "--workers", workers, "--batch-size", "1", "--out",
                                 str(out)], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        rows[workers] = read_rows(out)
    assert len(rows["1"]) >= 9 and rows["2"] == rows["1"]


def test_url_gives_the_same_rows_as_in_process_and_as_predict(photo_folder, tmp_path):
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    argv = ["images", str(photo_folder), "--recursive", "--faces", "all"]
    assert main([*argv, "--out", str(local), "--workers", "2"]) == 0
    with running_server(env={"EMOTION_ONNX_THREADS": "1"}) as base:
        assert main([*argv, "--out", str(remote), "--url", base, "--connections", "3",
                     "--batch-size", "4"]) == 0
    assert read_rows(remote) == read_rows(local)

    # And /predict says the same of every file.
    with TestClient(create_app(Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1))) as client:
        for row in read_rows(local):
            if row["code"]:
                continue
            data = Path(row["path"]).read_bytes()
            answer = client.post("/predict", params={"faces": "all"},
                                 files={"file": ("x.jpg", data, "image/jpeg")}).json()
            labels = [p["label"] for p in answer["predictions"]]
            assert row["label"] in labels
            first = answer["predictions"][0]
            if len(labels) == 1:
                assert [float(row[c]) for c in CLASS_NAMES] == [
                    first["probabilities"][c] for c in CLASS_NAMES]


def test_in_process_the_model_and_faces_default_to_this_machines_settings(
        test_images, tmp_path, monkeypatch, request):
    """README: left out, --model and --faces are EMOTION_DEFAULT_MODEL and
    EMOTION_DEFAULT_FACES in process (a review's mutants ignoring either passed every test)."""
    from service.settings import load_settings

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in test_images[:4]:
        (folder / name).write_bytes(data)

    def rows(*options: str) -> list[dict]:
        out = tmp_path / f"rows{len(list(tmp_path.glob('rows*')))}.csv"
        assert main(["images", str(folder), "--out", str(out), "--workers", "1",
                     *options]) == 0
        return read_rows(out)

    chosen = rows("--model", "knn", "--faces", "auto")
    assert chosen != rows("--model", "cnn", "--faces", "auto")
    assert chosen != rows("--model", "knn", "--faces", "none")
    monkeypatch.setenv("EMOTION_DEFAULT_MODEL", "knn")
    monkeypatch.setenv("EMOTION_DEFAULT_FACES", "auto")
    load_settings.cache_clear()  # read once per process: read again, and again after
    request.addfinalizer(load_settings.cache_clear)
    assert rows() == chosen


def test_the_command_lines_defaults_are_the_ones_its_help_and_the_readme_state():
    """Nothing else pins them: a default of --timeout or --batch-size changed passed every
    test (a review's mutants)."""
    from service.cli import build_parser
    from service.settings import container_cpus

    images = build_parser().parse_args(["images", "a.jpg", "--out", "rows.csv"])
    assert (images.timeout, images.wait, images.batch_size, images.connections,
            images.workers) == (120.0, 300.0, 8, 8, container_cpus())
    assert (images.model, images.faces) == (None, None)  # the settings' or the service's
    video = build_parser().parse_args(["video", "a.mp4", "--out", "rows.csv"])
    assert (video.fps, video.faces, video.batch_size) == (2.0, "all", 8)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "`--timeout` (120 s:" in readme and "`--wait` seconds a batch (default 300," in readme
    assert "(default: the container's CPUs;" in readme
    assert "`--faces all` unless told otherwise" in readme


def test_the_summary_says_when_faces_were_left_out(tmp_path, monkeypatch, capsys, request):
    """Past EMOTION_MAX_FACES_PER_IMAGE the rows ended with no sign of the faces dropped,
    where /predict's faces_found and the page say so; in process and with --url."""
    from service.settings import load_settings

    monkeypatch.setenv("EMOTION_MAX_FACES_PER_IMAGE", "2")
    load_settings.cache_clear()  # read once per process: read again, and again after
    request.addfinalizer(load_settings.cache_clear)
    photo = str(REPO / "examples" / "four_people.jpg")
    assert main(["images", photo, "--faces", "all", "--out", str(tmp_path / "local.csv"),
                 "--workers", "1"]) == 0
    assert len(read_rows(tmp_path / "local.csv")) == 2
    err = capsys.readouterr().err
    assert "1 files had more faces than were classified" in err
    assert "emotion-detect: 1 files (0 already in" in err and ", 2 rows, 0 files with" in err
    with running_server(env={"EMOTION_ONNX_THREADS": "1"}) as base:
        assert main(["images", photo, "--faces", "all", "--out", str(tmp_path / "remote.csv"),
                     "--url", base]) == 0
    assert "1 files had more faces than were classified" in capsys.readouterr().err
    monkeypatch.setenv("EMOTION_MAX_FACES_PER_IMAGE", "16")  # all four: nothing to say
    load_settings.cache_clear()
    assert main(["images", photo, "--faces", "all", "--out", str(tmp_path / "all.csv"),
                 "--workers", "1"]) == 0
    assert "more faces than" not in capsys.readouterr().err


def test_the_progress_bar_shows_on_a_terminal_and_not_in_a_log(photo_folder, tmp_path):
    argv = [*COMMAND, "images", str(photo_folder), "--out", str(tmp_path / "r.csv"),
            "--faces", "none", "--workers", "1"]
    piped = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert piped.returncode == 0 and "img/s" not in piped.stderr
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=child_fd)
    os.close(child_fd)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    process.wait()
    os.close(main_fd)
    assert b"img/s" in seen and b"14/14" in seen


def encode_video(path, frames: list[Image.Image], fps: int, rotation: int = 0,
                 codec: str = "mpeg4", container_format: str | None = None,
                 options: dict | None = None, pix_fmt: str = "yuv420p") -> None:
    """``rotation``: the display matrix's turn (counterclockwise degrees), as phones write."""
    import av

    with av.open(str(path), "w", format=container_format, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_rows_per_sampled_frame_and_face_and_the_plot(test_images, tmp_path):
    rng = np.random.default_rng(0)
    faces = [Image.open(io.BytesIO(d)).convert("L") for _, d in test_images[:2]]
    frames = []
    for i in range(30):  # 3 s at 10 frames/s; two faces that drift across the frame
        canvas = Image.fromarray(rng.integers(90, 110, (360, 640), dtype=np.uint8))
        canvas.paste(faces[0].resize((200, 200)), (40 + i, 80))
        canvas.paste(faces[1].resize((150, 150)), (420 - i, 120))
        frames.append(canvas)
    video, out, plot = tmp_path / "talk.mp4", tmp_path / "talk.csv", tmp_path / "talk.png"
    encode_video(video, frames, fps=10)
    # no --faces: a video's frames are scenes, so every face is the default
    assert main(["video", str(video), "--out", str(out), "--fps", "2", "--plot", str(plot)]) == 0
    rows = read_rows(out)
    assert list(rows[0])[:3] == ["path", "time_s", "frame"]
    times = sorted({float(r["time_s"]) for r in rows})
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=0.06)
    assert sorted({int(r["frame"]) for r in rows}) == [0, 5, 10, 15, 20, 25]
    per_frame = {}
    for row in rows:
        per_frame.setdefault(row["frame"], []).append(row)
    assert all(len(group) == 2 for group in per_frame.values())  # both faces, every frame
    assert all(r["label"] in CLASS_NAMES and r["face_width"] for r in rows)
    image = Image.open(plot)
    assert image.size[0] > 600 and len(set(image.convert("L").getdata())) > 20


@pytest.mark.parametrize(("codec", "suffix"), [("libvpx-vp9", "webm"), ("mpeg4", "mkv")])
def test_a_millisecond_clock_takes_every_frame_at_the_videos_own_rate(tmp_path, codec, suffix):
    """Matroska and WebM stamp frames in whole milliseconds, rounded: frame 1 at 30 fps is at
    0.033 s, before its slot at 1/30, and every third frame was passed over (40 rows of 60 at
    --fps 30; at 15, frames 0, 3, 4, 6; the video review); a first mend, half a tick of slack,
    still lost 6 of 299 at --fps 29.97 (the diff review). MP4's exact clock is the reference:
    the same frames at the same times."""
    from service.video import sampled_frames

    frames = noise_frames(60)
    encode_video(tmp_path / f"clip.{suffix}", frames, fps=30, codec=codec)
    encode_video(tmp_path / "clip.mp4", frames, fps=30)
    for fps, numbers in ((30, list(range(60))), (15, list(range(0, 60, 2))), (25, None),
                         (29.97, None)):
        exact = [(t, n) for t, n, _ in sampled_frames(tmp_path / "clip.mp4", fps)]
        assert numbers is None or [n for _, n in exact] == numbers
        in_milliseconds = [(t, n) for t, n, _ in sampled_frames(tmp_path / f"clip.{suffix}", fps)]
        assert in_milliseconds == exact, fps
    assert exact[1][0] == 0.0667  # a frame's time in seconds, to 4 places


def test_a_clock_coarser_than_its_frames_takes_every_frame(tmp_path):
    """An MP4 of 25 fps on a clock of 120 ticks a second (PyAV's guessed_rate says 120) gave
    72 rows of 90 at --fps 25, as a millisecond clock did (the diff review)."""
    from service.video import sampled_frames

    encode_video(tmp_path / "coarse.mp4", noise_frames(90), fps=25,
                 options={"video_track_timescale": "120"})
    assert [n for _, n, _ in sampled_frames(tmp_path / "coarse.mp4", 25)] == list(range(90))


def test_the_first_frame_at_or_after_each_slot_is_sampled(tmp_path):
    """Against the rule worked out in fractions: the first frame n with n/rate >= k/fps. A
    mutant of either tolerance sampled one slot twice, or missed the last (the video review)."""
    from fractions import Fraction

    from service.video import sampled_frames

    for count, rate, fps in ((140, 30, 25), (151, 5, Fraction(7, 10)), (90, 30, 7)):
        encode_video(tmp_path / "clip.mp4", noise_frames(count), fps=rate)
        slots = range(int(Fraction(count - 1, rate) * fps) + 1)
        expected = [next(n for n in range(count) if Fraction(n, rate) >= Fraction(k) / fps)
                    for k in slots]
        got = [n for _, n, _ in sampled_frames(tmp_path / "clip.mp4", float(fps))]
        assert got == expected, (count, rate, fps)


def test_a_videos_summary_counts_frames_not_rows_and_a_file_that_is_none(tmp_path, capsys):
    """Each a line a mutant got wrong with no test failing (the video review): rows counted
    as frames, a frame whose every face was classified said to have had more, a file PyAV
    cannot read at all a traceback, and a video with no frame left no output."""
    two = Image.open(REPO / "examples" / "two_people.jpg").convert("RGB")
    two = two.resize((two.width // 2 * 2, two.height // 2 * 2))
    video, out = tmp_path / "two.mp4", tmp_path / "rows.csv"
    encode_video(video, [two] * 4, fps=2)
    assert main(["video", str(video), "--out", str(out)]) == 0
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("emotion-detect: 4 frames sampled, 8 rows in "), line
    assert len(read_rows(out)) == 8
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    assert main(["video", str(notes), "--out", str(tmp_path / "n.csv")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"emotion-detect: {notes}: cannot decode the video: "), line
    assert not (tmp_path / "n.csv").exists()
    clip, head = tmp_path / "clip.ts", tmp_path / "head.ts"
    encode_video(clip, noise_frames(10), fps=10, container_format="mpegts")
    head.write_bytes(clip.read_bytes()[:564])  # its tables, and no frame
    assert main(["video", str(head), "--out", str(out), "--faces", "none",
                 "--fps", "1000"]) == 0  # at most 1000: the limit itself is taken
    assert "0 frames sampled, 0 rows" in capsys.readouterr().err
    assert out.read_text().splitlines() == [",".join(read_rows_header(out))]


def read_rows_header(path) -> list[str]:
    with path.open(newline="") as handle:
        return next(csv.reader(handle))


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_video_stored_sideways_is_read_as_it_is_shown(tmp_path, rotation):
    from service.video import sampled_frames

    # left-right and top-bottom both marked: 180 degrees and a mirror image differ
    shown = Image.fromarray(upright_marker(96, 48))
    # stored turned back by the display rotation, so that showing it turns it upright
    stored = shown.rotate(-rotation, expand=True)
    encode_video(tmp_path / "phone.mp4", [stored] * 3, fps=3, rotation=rotation)
    [(_, _, decoded), *_] = sampled_frames(tmp_path / "phone.mp4", fps=3)
    assert decoded.gray.size == decoded.original_size == (96, 48)
    assert_upright(decoded.gray)


def test_a_video_without_pictures_and_impossible_rates_are_one_line_each(tmp_path, capsys):
    import wave

    sound = tmp_path / "voice.wav"  # PyAV opens it: audio alone, no video stream
    with wave.open(str(sound), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes(bytes(16000))
    out = tmp_path / "rows.csv"
    out.write_text("an earlier run's rows\n")
    assert main(["video", str(sound), "--out", str(out)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "no video stream" in line and "Traceback" not in line
    assert out.read_text() == "an earlier run's rows\n"  # emptied before the refusal, once
    for fps in ("0", "nan", "inf", "1e300"):  # inf and 1e300 once looped forever
        with pytest.raises(SystemExit) as caught:
            main(["video", str(sound), "--out", str(out), "--fps", fps])
        assert caught.value.code == 2
        assert "--fps must be above 0 and at most" in capsys.readouterr().err



def overwritten_packets(video: Path, numbers) -> tuple[bytes, list[int]]:
    """The video's bytes with the payloads of its packets ``numbers`` (indexes among those
    holding data) overwritten with 0xFF, as a disk or a transfer damages them; and where each
    packet's payload starts (after its container's own header: a WebM's block, say)."""
    import av

    with av.open(str(video)) as container:
        packets = [(max(p.pos, 0), bytes(p)) for p in container.demux(video=0) if p.size]
    data = bytearray(video.read_bytes())
    starts = [data.find(payload, position) for position, payload in packets]
    for number in numbers:
        size = len(packets[number][1])
        data[starts[number]:starts[number] + size] = b"\xff" * size
    return bytes(data), starts


def noise_frames(count: int) -> list[Image.Image]:
    """Frames that compress badly, so that cutting the file cuts the frames."""
    return [Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64), np.uint8))
            for i in range(count)]


def test_a_video_named_like_a_protocol_is_that_file(tmp_path, monkeypatch, capsys):
    """FFmpeg took a name's text before a colon for a protocol: "12:30.mp4" failed with
    "Protocol not found", and "file:one.mp4" read one.mp4 with no word (the video review)."""
    monkeypatch.chdir(tmp_path)
    encode_video(tmp_path / "five.mp4", noise_frames(5), fps=5)
    encode_video(tmp_path / "one.mp4", noise_frames(1), fps=5)
    for name in ("12:30.mp4", "file:one.mp4"):
        os.link(tmp_path / "five.mp4", tmp_path / name)
        assert main(["video", name, "--out", "rows.csv", "--fps", "5", "--faces", "none"]) == 0
        assert [int(r["frame"]) for r in read_rows(tmp_path / "rows.csv")] == [0, 1, 2, 3, 4]
        assert "5 frames sampled" in capsys.readouterr().err


def test_an_audio_files_cover_picture_is_no_video(tmp_path, capsys):
    """Music and podcast files carry their artwork as a one-picture stream: it was classified,
    and the file called cut short, exit 1, as that stream lasts the whole song."""
    import av

    song = tmp_path / "song.mp3"
    with av.open(str(song), "w") as container:
        sound = container.add_stream("mp3", rate=8000, layout="mono")
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_image(Image.new("RGB", (64, 64), "red"))
        for packet in [*cover.encode(picture), *cover.encode()]:
            container.mux(packet)
        for i in range(20):  # 3 s of silence
            samples = np.zeros((1, 1152), {"s16p": np.int16, "s32p": np.int32,
                                           "fltp": np.float32}[sound.format.name])
            frame = av.AudioFrame.from_ndarray(samples, format=sound.format.name,
                                               layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1152
            for packet in sound.encode(frame):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    out = tmp_path / "rows.csv"
    assert main(["video", str(song), "--out", str(out)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("the file holds no video stream (its 2 streams are sound, data or a "
                         "cover picture)")
    assert not out.exists()


def test_damaged_packets_are_skipped_and_counted_and_the_rest_classified(tmp_path, capsys):
    """Bytes overwritten in one frame's packet ended the run there, rows of the rest of the
    file lost, where ffmpeg decodes on (the video review)."""
    whole, damaged = tmp_path / "whole.mp4", tmp_path / "damaged.mp4"
    encode_video(whole, noise_frames(40), fps=10)
    data = bytearray(whole.read_bytes())
    at = len(data) // 5  # inside the sixth frame's packet
    data[at:at + 2000] = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    damaged.write_bytes(bytes(data))
    argv = ["--fps", "10", "--faces", "none"]
    assert main(["video", str(whole), "--out", str(tmp_path / "whole.csv"), *argv]) == 0
    capsys.readouterr()
    assert main(["video", str(damaged), "--out", str(tmp_path / "damaged.csv"), *argv]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    rows, whole_rows = read_rows(tmp_path / "damaged.csv"), read_rows(tmp_path / "whole.csv")
    # every frame but the damaged one, under its own number and time
    assert [int(r["frame"]) for r in rows] == [n for n in range(40) if n != 5]
    assert [float(r["time_s"]) for r in rows] == [
        float(r["time_s"]) for r in whole_rows if r["frame"] != "5"]
    assert [{**r, "path": ""} for r in rows[:4]] == [{**r, "path": ""} for r in whole_rows[:4]]
    assert line == (f"emotion-detect: {damaged}: 1 of its 40 packets could not be decoded "
                    "(damaged, or needing a damaged one): skipped, with their frames; the 39 "
                    f"rows of the 39 frames read are in {tmp_path / 'damaged.csv'}")
    # the last packets damaged in place: the file is whole, not cut short (the diff review)
    damaged.write_bytes(overwritten_packets(whole, range(-8, 0))[0])
    assert main(["video", str(damaged), "--out", str(tmp_path / "damaged.csv"), *argv]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert ": 8 of its 40 packets could not be decoded" in line and "cut short" not in line
    assert len(read_rows(tmp_path / "damaged.csv")) == 32


@pytest.mark.parametrize("bframes", [0, 3])
def test_frames_lost_after_a_damaged_keyframe_keep_the_numbers_true(tmp_path, capsys,
                                                                    bframes):
    """H.264 waits, without an error, for the keyframe after a damaged one: every frame number
    after it was 8 too low; and a file also cut said only the cut (the diff review). With
    B-frames, as x264 writes by default, they were still 7 too low (the third)."""
    import av

    whole, damaged, both = (tmp_path / f"{n}.mp4" for n in ("whole", "damaged", "both"))
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10, options={
            "g": "10", "preset": "ultrafast",
            "x264-params": f"b-adapt=0:bframes={bframes}:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        noise = np.random.default_rng(2)
        for _ in range(60):
            pixels = noise.integers(0, 255, (96, 128, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data, starts = overwritten_packets(whole, [10])  # the second keyframe
    damaged.write_bytes(data)
    both.write_bytes(data[:starts[40] + 7])
    argv = ["--fps", "10", "--faces", "none"]
    assert main(["video", str(whole), "--out", str(tmp_path / "whole.csv"), *argv]) == 0
    frame_at = {r["time_s"]: r["frame"] for r in read_rows(tmp_path / "whole.csv")}
    capsys.readouterr()
    assert main(["video", str(damaged), "--out", str(tmp_path / "rows.csv"), *argv]) == 1
    line = capsys.readouterr().err.strip()
    rows = read_rows(tmp_path / "rows.csv")
    assert 40 <= len(rows) <= 51 and all(r["frame"] == frame_at[r["time_s"]] for r in rows)
    said = re.search(r": (\d+) of its 60 packets could not be decoded \(damaged, or needing "
                     r"a damaged one\)", line)
    # each packet a row or counted lost, none twice; with B-frames, one of the damaged group
    # leaves the decoder after later frames and is passed over as out of time order
    assert said and int(said[1]) + len(rows) == 60 - (bframes > 0)
    assert main(["video", str(both), "--out", str(tmp_path / "rows.csv"), *argv]) == 1
    line = capsys.readouterr().err.strip()
    assert "the file is cut short; before that, " in line


@pytest.mark.parametrize("kind", ["rgba", "palette"])
def test_a_transparent_video_is_flattened_onto_white_as_an_image_is(tmp_path, kind):
    """PyAV's to_image drops alpha: a transparent frame was classified by the colours under
    its transparency, unlike the same picture sent as an image (the video review); a
    palette's transparency is in its colours (the diff review)."""
    face = Image.open(REPO / "examples" / "three_people.jpg").convert("RGBA").resize((320, 180))
    pixels = np.array(face)
    pixels[40:140, :, 3] = 0  # a transparent band, over the colours still stored under it
    band = Image.fromarray(pixels, "RGBA")
    picture = tmp_path / "band.png"  # FFmpeg reads a PNG as a video of one frame
    if kind == "palette":
        quantized = band.convert("RGB").quantize(255)
        paletted = quantized.point(lambda index: index + 1)  # index 0: transparent
        paletted.putpalette([0, 0, 0, *quantized.getpalette()[:765]])
        paletted.paste(0, (0, 40, 320, 140))
        paletted.save(picture, transparency=0)
    else:
        band.save(picture)
    assert main(["video", str(picture), "--out", str(tmp_path / "video.csv"),
                 "--faces", "none"]) == 0
    assert main(["images", str(picture), "--out", str(tmp_path / "image.csv"),
                 "--faces", "none", "--workers", "1"]) == 0
    [image_row], [video_row] = read_rows(tmp_path / "image.csv"), read_rows(tmp_path / "video.csv")
    assert [video_row[c] for c in CLASS_NAMES] == [image_row[c] for c in CLASS_NAMES]


@pytest.mark.parametrize("damaged_first", [False, True])
@pytest.mark.parametrize("rotation", [0, 90])
def test_a_transparent_webm_keeps_its_alpha(tmp_path, rotation, damaged_first):
    """FFmpeg's own VP9 decoder drops the alpha of a transparent WebM, the usual transparent
    web video: the band came out grey, not white (the diff review); libvpx's frames lack the
    stream's turn, and a turned one was classified sideways (the second diff review), and
    after a damaged first packet too (the third)."""
    import av

    from service.video import VideoError, sampled_frames

    frame = np.full((96, 128, 4), 40, np.uint8)
    frame[..., 3] = 255
    frame[32:64, :, 3] = 0  # transparent, over dark colours
    video = tmp_path / "band.webm"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=2, options={"lossless": "1", "g": "2"})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuva420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for image in [av.VideoFrame.from_ndarray(frame, format="rgba")] * 4:
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    samples = []
    if damaged_first:  # its first keyframe: libvpx refuses the frames up to the next one
        video.write_bytes(overwritten_packets(video, [0])[0])
        with pytest.raises(VideoError):
            samples.extend(sampled_frames(video, fps=2))
        assert samples
    else:
        samples.extend(sampled_frames(video, fps=2))
    first = samples[0][2]
    gray = np.asarray(first.gray)
    if rotation:  # a quarter turn: the band runs down the frame
        assert first.original_size == (96, 128)
        gray = gray.T
    assert gray[36:60].min() >= 250 and gray[:28].max() <= 45


@pytest.mark.parametrize(("kind", "damaged"), [
    ("trimmed mp4", 23),  # an edit list: 5 lead-in frames the decoder drops
    ("avi", 13),  # a B-frame of H.264 in AVI, whose times are in decode order
    ("30 fps", 20),  # a keyframe, after which a reordered frame comes out late
])
def test_frame_numbers_after_damage_are_the_undamaged_files(tmp_path, kind, damaged):
    """After a damaged packet, numbers came from the packets' times: a trim's dropped lead-in
    made every later one 5 too high, an AVI's decode-order times renumbered its frames, and
    a frame given late took its neighbour's number (the fourth diff review)."""
    from fractions import Fraction

    import av

    from service.video import DamagedVideoError, sampled_frames

    rate, count = (30, 80) if kind == "30 fps" else (10, 60)
    whole = tmp_path / ("whole.avi" if kind == "avi" else "whole.mp4")
    noise = np.random.default_rng(2)
    with av.open(str(whole), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={
            "g": "20" if kind == "30 fps" else "10", "preset": "ultrafast",
            "x264-params": "b-adapt=0:bframes=3:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(
                noise.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            if kind == "trimmed mp4":
                frame.pts, frame.time_base = i - 5, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    broken = tmp_path / f"damaged{whole.suffix}"
    broken.write_bytes(overwritten_packets(whole, [damaged])[0])
    number_at = {time: number for time, number, _ in sampled_frames(whole, fps=rate)}
    rows = []
    with pytest.raises(DamagedVideoError):
        rows.extend((time, number) for time, number, _ in sampled_frames(broken, fps=rate))
    assert len(rows) >= len(number_at) - 20
    # the AVI's sampling, by decode-order times, may take a neighbour of the lost B-frame
    # at that frame's time: one row
    others = [(time, number) for time, number in rows if number_at.get(time) != number]
    assert len(others) <= (kind == "avi"), others
    assert len({number for _, number in rows}) == len(rows)


def test_a_video_that_is_no_regular_file_and_a_plot_that_fails_after_it(tmp_path, capsys):
    """A pipe was "no such file"; a plot the disk refused after a whole video was a traceback
    of matplotlib's, and faces=auto's faces left out went unsaid (the video review)."""
    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    with pytest.raises(SystemExit) as caught:
        main(["video", str(pipe), "--out", str(tmp_path / "rows.csv")])
    assert caught.value.code == 2
    assert "pipe.mp4: not a regular file (a pipe or a device)" in capsys.readouterr().err
    faces = Image.open(REPO / "examples" / "two_people.jpg")
    video = tmp_path / "two.mp4"
    encode_video(video, [faces.resize((faces.width // 2 * 2, faces.height // 2 * 2))] * 4, fps=2)
    (tmp_path / "full.pdf").symlink_to("/dev/full")  # PDF's writer fails with AttributeError
    out = tmp_path / "rows.csv"
    assert main(["video", str(video), "--out", str(out), "--faces", "auto", "--plot",
                 str(tmp_path / "full.pdf")]) == 1
    summary, left_out = capsys.readouterr().err.strip().splitlines()
    assert summary.startswith("emotion-detect: 4 frames sampled, 4 rows in ") and \
        summary.endswith(f"s, in {out}; their plot could not be written ('Stream' object has "
                         "no attribute 'pos')")
    assert left_out.startswith("emotion-detect: 4 frames had more faces than were classified")
    assert len(read_rows(out)) == 4


def test_a_raw_camera_stream_without_timestamps_is_timed_by_its_frame_rate(tmp_path):
    """CCTV and dashcam exports are bare H.264: no frame has a time. They gave 0 rows, exit 0."""
    video, out = tmp_path / "camera.h264", tmp_path / "rows.csv"
    encode_video(video, noise_frames(30), fps=10, codec="libx264", container_format="h264")
    assert main(["video", str(video), "--out", str(out), "--fps", "2", "--faces", "none"]) == 0
    rows = read_rows(out)
    assert [float(r["time_s"]) for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [int(r["frame"]) for r in rows] == [0, 5, 10, 15, 20, 25]


@pytest.mark.parametrize("suffix", ["mp4", "flv", "avi", "mkv", "webm"])
def test_a_cut_video_says_so_keeps_its_rows_and_exits_1(tmp_path, capsys, suffix):
    """PyAV's frame threads end a cut stream quietly: a cut download gave the rows of its first
    part, exit 0 and no word. The frames sampled before the cut, fewer than a batch here, are
    still written. An FLV declares its duration only for the whole file; an AVI's duration
    is FFmpeg's estimate from what is left of it, and only its frame count tells."""
    whole, cut = tmp_path / f"whole.{suffix}", tmp_path / f"cut.{suffix}"
    if suffix == "mp4":  # the index first (as web video is), so that the cut file still opens
        encode_video(whole, noise_frames(40), fps=10, options={"movflags": "faststart"})
    elif suffix == "avi":  # Motion JPEG, as cameras write
        encode_video(whole, noise_frames(40), fps=10, codec="mjpeg", pix_fmt="yuvj420p")
    elif suffix == "webm":  # Matroska's end is in its DURATION tag, as text (the video review)
        encode_video(whole, noise_frames(40), fps=10, codec="libvpx-vp9")
    else:
        encode_video(whole, noise_frames(40), fps=10, codec="libx264")
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    argv = ["--fps", "2", "--faces", "none", "--batch-size", "16"]
    assert main(["video", str(whole), "--out", str(tmp_path / "whole.csv"), *argv]) == 0
    capsys.readouterr()
    assert main(["video", str(cut), "--out", str(tmp_path / "cut.csv"), *argv, "--plot",
                 str(tmp_path / "cut.png")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    cut_rows, whole_rows = read_rows(tmp_path / "cut.csv"), read_rows(tmp_path / "whole.csv")
    assert 3 <= len(cut_rows) < len(whole_rows) and len(whole_rows) >= 8
    assert [{**r, "path": ""} for r in cut_rows] == [
        {**r, "path": ""} for r in whole_rows[: len(cut_rows)]]
    assert "the file is cut short" in line and (
        "of the 4.0 s its header's count declares" if suffix == "avi" else "of the 4.") in line
    assert "before that" not in line  # nothing was damaged before the cut (a review's mutant)
    # the rows kept are plotted too (no plot was drawn, and nothing said so)
    assert "its header" in line and line.endswith(
        f"the {len(cut_rows)} rows of the {len(cut_rows)} frames before it are in "
        f"{tmp_path / 'cut.csv'}, and their plot in {tmp_path / 'cut.png'}")
    assert Image.open(tmp_path / "cut.png").size[0] > 600
    # a plot that cannot be written: its error had replaced the news of the cut
    (tmp_path / "full.png").symlink_to("/dev/full")
    assert main(["video", str(cut), "--out", str(tmp_path / "cut.csv"), *argv, "--plot",
                 str(tmp_path / "full.png")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "the file is cut short" in line and line.endswith(
        "their plot could not be written ([Errno 28] No space left on device)")
    # matplotlib's PDF writer fails on a full disk with an AttributeError of its own
    (tmp_path / "full.pdf").symlink_to("/dev/full")
    assert main(["video", str(cut), "--out", str(tmp_path / "cut.csv"), *argv, "--plot",
                 str(tmp_path / "full.pdf")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "the file is cut short" in line and "their plot could not be written (" in line


@pytest.mark.parametrize("suffix", ["flv", "mp4"])
def test_a_cut_video_with_sound_says_so(tmp_path, capsys, suffix):
    """An FLV declares only the whole file's length, which counts its sound: it was read only
    where the video was the one stream, so a cut FLV with sound, as FLVs are, gave the rows of
    its first half and exit 0 (a mutation review). An MP4 declares the video's own."""
    whole, cut = tmp_path / f"talk.{suffix}", tmp_path / f"cut.{suffix}"
    video_with_longer_sound(whole, noise_frames(40), fps=10, seconds=4, codec="libx264",
                            options={"movflags": "faststart"} if suffix == "mp4" else None)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    argv = ["--fps", "2", "--faces", "none"]
    assert main(["video", str(whole), "--out", str(tmp_path / "whole.csv"), *argv]) == 0
    capsys.readouterr()
    assert main(["video", str(cut), "--out", str(tmp_path / "cut.csv"), *argv]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"the frames stop at [12]\.\d s of the 4\.\d s its header declares: the "
                     r"file is cut short; the [3-5] rows", line), line


def test_a_cut_losing_under_a_second_is_said(tmp_path, capsys):
    """Half a second is the slack for a last frame's own length: doubled, a file cut inside
    its frame at 3.2 s of 4.0 passed as whole, and every other cut test lost more (a review)."""
    import fractions

    import av

    whole, cut = tmp_path / "whole.mkv", tmp_path / "cut.mkv"
    encode_video(whole, noise_frames(40), fps=10)
    with av.open(str(whole)) as container:
        packet = next(p for p in container.demux(video=0)
                      if p.pts is not None and p.pts * p.time_base == fractions.Fraction(16, 5))
        start, size = packet.pos, packet.size
    cut.write_bytes(whole.read_bytes()[: start + size // 2])
    assert main(["video", str(cut), "--out", str(tmp_path / "rows.csv"), "--fps", "10",
                 "--faces", "none"]) == 1
    assert "stop at 3.1 s of the 4.0 s its header declares: the file is cut short; the 32 rows" \
        in capsys.readouterr().err


def test_a_cut_matroska_over_a_minute_says_its_whole_length(tmp_path, capsys):
    """Matroska declares its length as text, "00:01:30.000000000": read with its minutes (a
    mutant that dropped them said 31.0 s and failed no test; the video review)."""
    whole, cut = tmp_path / "long.mkv", tmp_path / "cut.mkv"
    encode_video(whole, [frame.resize((16, 16)) for frame in noise_frames(90)], fps=1)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert main(["video", str(cut), "--out", str(tmp_path / "rows.csv"), "--fps", "1",
                 "--faces", "none"]) == 1
    assert "of the 90.0 s its header declares: the file is cut short" in capsys.readouterr().err


def test_a_declared_end_is_read_from_the_stream_then_its_tag_then_the_file():
    """Hours in a Matroska tag count 3,600 s (a mutant with 60 passed every test: no test
    video runs an hour), the stream's start is added, and only the file's own duration is
    said to be the file's."""
    from fractions import Fraction
    from types import SimpleNamespace

    from service.video import declared_end

    def stream(duration=None, start=None, tag=None):
        return SimpleNamespace(duration=duration, time_base=Fraction(1, 1000) if duration
                               else None, start_time=start, metadata={"DURATION": tag} if tag
                               else {})

    file = SimpleNamespace(duration=7_500_000)  # in AV_TIME_BASE units: 7.5 s
    bare = SimpleNamespace(duration=None)
    assert declared_end(file, stream(2500, start=500), 1_000_000) == (3.0, False)
    assert declared_end(file, stream(tag="01:02:03.250000000"), 1_000_000) == (3723.25, False)
    assert declared_end(file, stream(tag="not a time"), 1_000_000) == (None, False)
    assert declared_end(file, stream(), 1_000_000) == (7.5, True)
    assert declared_end(bare, stream(), 1_000_000) == (None, False)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_file_with_two_video_streams_is_read_by_its_first(tmp_path, suffix):
    """A second video stream (another angle, a preview) is left alone: a mutant reading the
    last passed every test."""
    import av

    path = tmp_path / f"two{suffix}"
    with av.open(str(path), "w") as container:
        streams = [container.add_stream("mpeg4", rate=rate) for rate in (1, 2)]
        for stream, size in zip(streams, ((64, 48), (32, 32)), strict=True):
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
        for stream, count in zip(streams, (3, 6), strict=True):
            for image in noise_frames(count):
                frame = av.VideoFrame.from_image(image.resize((stream.width, stream.height))
                                                 .convert("RGB"))
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    out = tmp_path / "rows.csv"
    assert main(["video", str(path), "--out", str(out), "--fps", "2", "--faces",
                 "none"]) == 0
    rows = read_rows(out)
    assert [(float(row["time_s"]), int(row["frame"])) for row in rows] == [
        (0.0, 0), (1.0, 1), (2.0, 2)]


def test_the_plot_follows_each_frames_largest_face():
    from service.batch import Row
    from service.video import largest_face_rows

    def row(frame, width, height, label="NEUTRAL"):
        return Row({"frame": frame, "time_s": frame / 2, "face_width": width,
                    "face_height": height, "label": label})

    small, large, whole = row(0, 40, 50), row(0, 60, 70), row(1, None, None)
    tall = row(2, 10, 400)
    rows = [tall, row(2, 50, 50), small, large, whole, row(3, 90, 90, label=None)]
    assert largest_face_rows(rows) == [large, whole, tall]


def last_packet_changed(path, frames: list[Image.Image], codec: str, fps: int,
                        change: Callable) -> None:
    """The frames encoded, then ``change(packet)`` on the last one shown, then muxed: files
    whose last frame says something its neighbours do not."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        packets = [p for image in frames
                   for p in stream.encode(av.VideoFrame.from_image(image.convert("RGB")))]
        packets += stream.encode()
        change(max(packets, key=lambda packet: packet.pts))
        for packet in packets:
            container.mux(packet)


def jumping_video(path, frames: list[Image.Image], last_at: float) -> None:
    """A Matroska file at 10 frames a second whose last frame is stamped ``last_at`` s."""
    def stamped(last):
        last.pts = last.dts = int(last_at / last.time_base)

    last_packet_changed(path, frames, "mpeg4", 10, stamped)


def test_timestamps_that_jump_or_start_again_are_sampled_where_they_land(tmp_path):
    """A frame stamped a billion seconds on took a loop turn per 1/fps to reach (the run
    never ended); clips joined end to end (MPEG-TS, which `cat` joins) restart their times,
    and every frame after the join was dropped without a word."""
    jump, out = tmp_path / "jump.mkv", tmp_path / "rows.csv"
    jumping_video(jump, noise_frames(4), last_at=1e9)
    result = subprocess.run([*COMMAND, "video", str(jump), "--out", str(out), "--fps", "2",
                             "--faces", "none"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)  # a guard against the endless loop, not a speed test
    assert result.returncode == 0, result.stderr
    assert [float(r["time_s"]) for r in read_rows(out)] == [0.0, 1e9]

    clip, joined = tmp_path / "clip.ts", tmp_path / "joined.ts"
    encode_video(clip, noise_frames(20), fps=10, container_format="mpegts")
    joined.write_bytes(clip.read_bytes() * 3)
    # at 2 frames a second, and at one every 4 s, longer than a clip: each clip's first frame
    # (a restart was taken only for a step back of 1/fps, the whole-diff review)
    for fps, least in (("2", 4), ("0.25", 1)):
        argv = ["--fps", fps, "--faces", "none"]
        assert main(["video", str(clip), "--out", str(tmp_path / "clip.csv"), *argv]) == 0
        assert main(["video", str(joined), "--out", str(tmp_path / "joined.csv"), *argv]) == 0
        once = [r["time_s"] for r in read_rows(tmp_path / "clip.csv")]
        assert len(once) >= least
        assert [r["time_s"] for r in read_rows(tmp_path / "joined.csv")] == once * 3, fps
    # clips of 1 s, shorter than the 16 frames a decoder may reorder: each joined clip's start
    # is told by its step back to where the run began (the video review)
    short = tmp_path / "short.ts"
    encode_video(short, noise_frames(10), fps=10, container_format="mpegts")
    joined.write_bytes(short.read_bytes() * 3)
    assert main(["video", str(joined), "--out", str(tmp_path / "joined.csv"), "--fps", "2",
                 "--faces", "none"]) == 0
    assert [float(r["time_s"]) for r in read_rows(tmp_path / "joined.csv")] == [0.0, 0.5] * 3
    # a second clip that starts within the first one's times, and ends before it did: its
    # first seconds were skipped, and the file was then called cut (the sixth diff review)
    first, second, both = tmp_path / "a.ts", tmp_path / "b.ts", tmp_path / "ab.ts"
    retimed_video(first, noise_frames(50), "mpeg4", "yuv420p")
    retimed_video(second, noise_frames(20), "mpeg4", "yuv420p", shift=10)
    both.write_bytes(first.read_bytes() + second.read_bytes())
    argv = ["--fps", "2", "--faces", "none"]
    alone = []
    for clip in (first, second):
        assert main(["video", str(clip), "--out", str(tmp_path / "one.csv"), *argv]) == 0
        alone += [r["time_s"] for r in read_rows(tmp_path / "one.csv")]
    assert main(["video", str(both), "--out", str(tmp_path / "ab.csv"), *argv]) == 0
    assert [r["time_s"] for r in read_rows(tmp_path / "ab.csv")] == alone
    # H.264 in AVI gives its B-frames' times in decode order, a small step back each: every
    # one was taken for a restart (5 times the rows, out of time order; the diff review)
    bframes = tmp_path / "bframes.avi"
    encode_video(bframes, noise_frames(60), fps=30, codec="libx264")
    assert main(["video", str(bframes), "--out", str(tmp_path / "b.csv"), "--fps", "2",
                 "--faces", "none"]) == 0
    times = [float(r["time_s"]) for r in read_rows(tmp_path / "b.csv")]
    assert len(times) >= 4 and times[0] < 0.1  # the times are a frame late in decode order
    assert all(0.45 < later - earlier < 0.55 for earlier, later in itertools.pairwise(times))


def video_with_longer_sound(path, frames: list[Image.Image], fps: int, seconds: float,
                            codec: str = "mpeg4", options: dict | None = None) -> None:
    """A file whose audio track runs ``seconds``, past its pictures (or as far)."""
    import fractions

    import av

    with av.open(str(path), "w", options=options or {}) as container:
        video, audio = container.add_stream(codec, rate=fps), container.add_stream("aac",
                                                                                   rate=44100)
        video.width, video.height = frames[0].size
        video.pix_fmt = "yuv420p"
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        container.mux(video.encode())
        for start in range(0, int(seconds * 44100), 1024):
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            sound.sample_rate, sound.pts = 44100, start
            sound.time_base = fractions.Fraction(1, 44100)
            container.mux(audio.encode(sound))
        container.mux(audio.encode())


def flv_slideshow(path, frames: list[Image.Image], fps: int, last_seconds: float) -> None:
    """An FLV whose last picture is held ``last_seconds``: the file's duration counts it, its
    packets (which carry no duration in FLV) do not."""
    def held(last):
        last.duration = int(last_seconds / last.time_base)

    last_packet_changed(path, frames, "libx264", fps, held)


def retimed_video(path, frames: list[Image.Image], codec: str, pix_fmt: str, shift: int = 0,
                  gap_after: int | None = None, ticks: int = 1) -> None:
    """10 frames a second, every packet moved ``shift`` frames (below 0: an MP4 then trims
    them with an edit list, as `ffmpeg -ss ... -c copy` writes), a 2 s gap after frame
    ``gap_after`` (a camera that records on motion), on a clock of ``ticks`` per frame (a
    writer with a millisecond clock: 100)."""
    import fractions

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = fractions.Fraction(1, 10 * ticks)
        packets = []
        for number, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            frame.pts = ticks * (number + (20 if gap_after is not None and number > gap_after
                                           else 0))
            frame.time_base = stream.codec_context.time_base
            packets += stream.encode(frame)
        packets += stream.encode()
        for packet in packets:
            packet.pts, packet.dts = packet.pts + shift * ticks, packet.dts + shift * ticks
            container.mux(packet)


@pytest.mark.parametrize("kind", ["last frame held", "FLV slideshow", "sound runs on",
                                  "FLV whose sound runs on", "trimmed MP4", "AVI with a gap",
                                  "AVI on a millisecond clock"])
def test_a_whole_video_is_not_taken_for_a_cut_one(tmp_path, kind):
    """All were 'cut short', exit 1: a GIF whose last frame is shown for 2 s (its end is its
    last frame's time plus its own duration), an FLV slideshow, whose frames say nothing of
    the hold its file's duration counts, and a file whose sound outlasts its pictures (the
    container's duration counts the sound). An MP4 trimmed by an edit list still counts the
    frames it hides, and an AVI fills a gap in time with empty frames that its header counts
    (the diff review: the first frame-count check took both for cut); that count is of
    ticks of its clock, not of frames (the second diff review)."""
    frames = noise_frames(20)
    if kind == "trimmed MP4":
        video = tmp_path / "trimmed.mp4"
        retimed_video(video, noise_frames(35), "mpeg4", "yuv420p", shift=-15)
    elif kind == "AVI with a gap":
        video = tmp_path / "motion.avi"
        retimed_video(video, frames, "mjpeg", "yuvj420p", gap_after=9)
    elif kind == "AVI on a millisecond clock":
        video = tmp_path / "vfr.avi"
        retimed_video(video, frames, "mjpeg", "yuvj420p", ticks=100)
    elif kind == "last frame held":
        video = tmp_path / "pause.gif"
        frames[0].save(video, save_all=True, append_images=frames[1:],
                       duration=[100] * 19 + [2000])
    elif kind == "FLV slideshow":
        video = tmp_path / "slides.flv"
        flv_slideshow(video, frames, fps=10, last_seconds=3)
    elif kind == "FLV whose sound runs on":  # the file's duration is the sound's
        video = tmp_path / "talk.flv"
        video_with_longer_sound(video, frames, fps=10, seconds=5, codec="libx264")
    else:
        video = tmp_path / "talk.mkv"
        video_with_longer_sound(video, frames, fps=10, seconds=5)
    out = tmp_path / "rows.csv"
    assert main(["video", str(video), "--out", str(out), "--fps", "2", "--faces", "none"]) == 0
    times = [float(r["time_s"]) for r in read_rows(out)]
    assert times == pytest.approx({"FLV slideshow": [0.1, 0.6, 1.1, 1.6, 2.0],
                                   "FLV whose sound runs on": [0.2, 0.5, 1.0, 1.5, 2.0],
                                   "AVI with a gap": [0.0, 0.5, 3.0, 3.5]}.get(
        kind, [0.0, 0.5, 1.0, 1.5]), abs=0.11)


@pytest.mark.parametrize("argv", [
    ["images", "{photo}", "--out", "{tmp}/missing/rows.csv"],
    ["images", "{photo}", "--out", "{tmp}/folder.csv"],
    ["video", "{photo}", "--out", "{tmp}/v.csv", "--plot", "{tmp}/missing/p.png"],
    ["images", "{photo}", "--out", "{tmp}/r.csv", "--url", "http://127.0.0.1:1",
     "--connections", "0"],
    ["images", "{photo}", "--out", "{tmp}/r.csv", "--url", "127.0.0.1:8000"],
    # each was sent three times and then said as a connection error, with exit status 1; the
    # query took the page at /readyz for the service, then stopped at the 405 of /predict
    ["images", "{photo}", "--out", "{tmp}/r.csv", "--url", "http://"],
    ["images", "{photo}", "--out", "{tmp}/r.csv", "--url", "http://127.0.0.1:99999"],
    ["images", "{photo}", "--out", "{tmp}/r.csv", "--url", "http://127.0.0.1:1?x=1"],
    # matplotlib's own error, after the whole video had been read
    ["video", "{photo}", "--out", "{tmp}/v.csv", "--plot", "{tmp}/p.xyz"],
    # a folder of folders, without --recursive: 0 files and exit 0, no hint
    ["images", "{tmp}/nested", "--out", "{tmp}/r.csv"],
    ["video", "{tmp}/nested", "--out", "{tmp}/v.csv"],  # said "no such file"
    # the plot was drawn over the video it was read from (an animated GIF's, say)
    ["video", "{photo}", "--out", "{tmp}/v.csv", "--plot", "{photo}"],
    # LaTeX source, which needs a TeX program: it failed after the whole video was read
    ["video", "{photo}", "--out", "{tmp}/v.csv", "--plot", "{tmp}/p.pgf"],
    # a batch is held whole: 100,000 frames of a small video took 4.2 GB
    ["video", "{photo}", "--out", "{tmp}/v.csv", "--batch-size", "257"],
])
def test_output_and_connection_mistakes_are_one_line_before_any_work(tmp_path, argv):
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "nested" / "inner").mkdir(parents=True)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    argv = [a.format(photo=photo, tmp=tmp_path) for a in argv]
    result = subprocess.run([*COMMAND, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    # argparse's own line, from the command or its subcommand
    assert re.match(r"emotion-detect( images| video)?: error:",
                    result.stderr.strip().splitlines()[-1]), result.stderr
    assert "Traceback" not in result.stderr and "no such file" not in result.stderr


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_a_plot_over_the_video_under_another_name_is_refused(tmp_path, capsys, link):
    """A hard link passed the first check, which compared paths: the plot replaced the
    video (the diff review)."""
    video = tmp_path / "clip.gif"
    frames = noise_frames(3)
    frames[0].save(video, save_all=True, append_images=frames[1:], duration=100)
    before = video.read_bytes()
    link(video, tmp_path / "other.gif")
    with pytest.raises(SystemExit) as caught:
        main(["video", str(video), "--out", str(tmp_path / "v.csv"), "--plot",
              str(tmp_path / "other.gif")])
    assert caught.value.code == 2 and "is the video itself" in capsys.readouterr().err
    assert video.read_bytes() == before


def test_odd_file_names_survive_a_run_and_its_resume(tmp_path):
    """A newline in a name split its CSV record in two for --resume (its rows were written
    twice), and a name that is not UTF-8 stopped the run."""
    folder = tmp_path / "odd"
    folder.mkdir()
    names = [b"a.png", b"new\nline.png", b"not-utf8-\xff.png", b"z.png"]
    for name in names:
        (folder / os.fsdecode(name)).write_bytes(encode(gray_image(), "PNG"))
    os.symlink(folder / "gone.png", folder / "broken-link.png")  # listed, and unreadable
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\n".join(os.fsencode(folder) + b"/" + n for n in names[2:3]))
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"rows{suffix}"
        argv = ["images", str(folder), str(listing), "--out", str(out), "--faces", "none",
                "--workers", "1"]
        assert main(argv) == 1  # the broken link is an unreadable row
        first = read_rows_bytes(out)
        # done again: the last file, z.png, and the broken link, still unreadable
        assert main([*argv, "--resume"]) == 1
        rows = read_rows_bytes(out)
        paths = [r["path"] for r in rows]
        assert sorted(paths) == sorted(os.fsdecode(os.fsencode(folder) + b"/" + n)
                                       for n in [*names, b"broken-link.png"])
        redone = ("broken-link.png", "z.png")
        kept = [r for r in first if not r["path"].endswith(redone)]
        assert rows[:len(kept)] == kept  # the odd names read back, and kept as they were
        assert [r["code"] for r in rows if "broken" in r["path"]] == ["unreadable"]
        # as the README says: the name's own bytes in CSV, escaped in JSON Lines (UTF-8)
        if suffix == ".jsonl":
            assert b"not-utf8-\\udcff.png" in out.read_bytes()
            out.read_bytes().decode("utf-8")
        else:
            assert b"not-utf8-\xff.png" in out.read_bytes()


def read_rows_bytes(path) -> list[dict]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(io.StringIO(text, newline="")))


@pytest.mark.parametrize(("suffix", "content"), [
    (".jsonl", b'{"id": 1}\n{"id": 2}\n'),
    (".csv", b"time_s,frame,path,face_x\n0.0,0,v.mp4,1\n"),  # a video's rows
    (".csv", b"a,b\n1,2\n"),
    # one line with no line end was taken for a row of ours cut short, and erased (a review)
    (".jsonl", b'{"id": 1, "note": "my own results"}'),
    (".jsonl", b"[" * 3000 + b"\n"),  # a RecursionError's traceback
    # whole JSON beginning as ours do, with other columns: erased too (the second diff review)
    (".jsonl", b'{"path": "imgs/a.jpg", "label": "my own note"}'),
    (".jsonl", b'{"path": "a"} and then my notes'),  # whole, then text (the third)
    # our header, then a line of the user's own with its line end: erased, exit 0 (a review)
    (".csv", ",".join(COLUMNS).encode() + b"\r\nchecked by Bob on 2024-05-01\r\n"),
    # a mutation review's: a short line between rows of ours, and a last JSON line that
    # begins as ours do but is cut and has its line end (a row of ours cut short has none)
    (".csv", ",".join(COLUMNS).encode() + b"\r\nmy note\r\n"
     + ",".join(["x.png", *[""] * (len(COLUMNS) - 1)]).encode() + b"\r\n"),
    (".jsonl", b'{"path": "imgs/a.jpg", "fa\n'),
])
def test_resume_refuses_an_output_it_did_not_write_and_leaves_it_alone(tmp_path, suffix,
                                                                        content):
    out = tmp_path / f"theirs{suffix}"
    out.write_bytes(content)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    result = subprocess.run([*COMMAND, "images", str(photo), "--out", str(out), "--resume"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not written by this command" in result.stderr
    assert out.read_bytes() == content


def test_url_retries_rate_limits_and_refuses_an_answer_that_is_not_predictions(tmp_path):
    import httpx

    from service.batch import RemoteError, RemoteRunner

    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    answers = [httpx.Response(429, headers={"retry-after": "0"}),
               httpx.Response(408, json={"detail": "slow", "code": "body_timeout"}),
               httpx.Response(200, json={"predictions": [{
                   "filename": "0", "label": "NEUTRAL", "face": None, "error": None,
                   "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}]}),
               httpx.Response(200, text="<html>sign in</html>")]
    runner = RemoteRunner("http://service.test", None, None, 1, 4)
    runner.client = httpx.Client(transport=httpx.MockTransport(lambda request: answers.pop(0)))
    [[row]] = runner._classify([str(photo)])
    assert row.values["label"] == "NEUTRAL" and row.values["code"] is None
    with pytest.raises(RemoteError, match="not with predictions"):
        runner._classify([str(photo)])
    # probabilities out of [0, 1], or not summing to 1: written as rows, exit 0 (a review)
    for probabilities in ({c: 1.0 for c in CLASS_NAMES},
                          {**{c: 0.0 for c in CLASS_NAMES}, "ANGER": 1.5, "FEAR": -0.5}):
        answers.append(httpx.Response(200, json={"predictions": [{
            "filename": "0", "label": "ANGER", "face": None, "error": None,
            "probabilities": probabilities}]}))
        with pytest.raises(RemoteError, match="not with predictions"):
            runner._classify([str(photo)])


def _runner_answering(*answers):
    import httpx

    from service.batch import RemoteRunner

    runner = RemoteRunner("http://service.test", None, None, 1, 4)
    sent = []

    def answer(request):
        sent.append(request)
        reply = answers[min(len(sent), len(answers)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply() if callable(reply) else reply

    runner.client = httpx.Client(transport=httpx.MockTransport(answer))
    return runner, sent


@pytest.mark.parametrize("answer", [
    "401 json", "403 html", "404 json", "415 json", "302", "502", "504",
    "200 null", "200 no filename", "200 empty", "200 bad gzip",
    # written as rows with exit 0, or a traceback (a review of --url)
    "200 unknown label", "200 probabilities not numbers", "200 a file not sent",
    "200 infinite filename", "200 deeply nested"])
def test_url_stops_when_the_service_refuses_the_run_not_the_image(tmp_path, monkeypatch,
                                                                 answer):
    """Each was written as an error row per file with exit 0 (and --resume then skipped
    those files), or ended in a traceback."""
    import httpx

    from service.batch import RemoteError

    FakeClock(monkeypatch)  # a regression waiting one out fails at once, not after --wait

    prediction = {"label": "NEUTRAL", "face": None, "error": None,
                  "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}

    def reply():  # a fresh answer each time: a stream is read once
        return {
            "401 json": httpx.Response(401, json={"detail": "Not authenticated"}),
            "403 html": httpx.Response(403, text="<html>Forbidden</html>"),
            "404 json": httpx.Response(404, json={"detail": "Not Found", "code": "not_found"}),
            "415 json": httpx.Response(415, json={"detail": "no",
                                                  "code": "unsupported_media_type"}),
            "302": httpx.Response(302, headers={"location": "/login"}),
            # a gateway's, with Retry-After: not waited out as a busy service
            "502": httpx.Response(502, headers={"retry-after": "1"}, text="Bad Gateway"),
            "504": httpx.Response(504, text="<html>Gateway Time-out</html>"),
            "200 null": httpx.Response(200, json={"predictions": None}),
            "200 no filename": httpx.Response(200, json={"predictions": [
                {**prediction, "filename": "a.png"}]}),
            "200 empty": httpx.Response(200, json={"predictions": []}),
            "200 bad gzip": httpx.Response(200, stream=httpx.ByteStream(b"not gzip"), headers={
                "content-encoding": "gzip", "content-type": "application/json"}),
            "200 unknown label": httpx.Response(200, json={"predictions": [
                {**prediction, "filename": f, "label": "BANANA"} for f in ("0", "1")]}),
            "200 probabilities not numbers": httpx.Response(200, json={"predictions": [
                {**prediction, "filename": f, "probabilities": dict.fromkeys(CLASS_NAMES, "lots")}
                for f in ("0", "1")]}),
            "200 a file not sent": httpx.Response(200, json={"predictions": [
                {**prediction, "filename": f} for f in ("0", "1", "7")]}),
            "200 infinite filename": httpx.Response(200, content=b'{"predictions": [{"filename":'
                                                    b' 1e999}]}'),
            "200 deeply nested": httpx.Response(200, content=b"[" * 100_000),
        }[answer]
    photos = []
    for name in ("a.png", "b.png"):
        photos.append(str(tmp_path / name))
        (tmp_path / name).write_bytes(encode(gray_image(), "PNG"))
    runner, sent = _runner_answering(reply)
    with pytest.raises(RemoteError):
        runner._classify(photos)
    assert len(sent) == 1  # a refusal is not sent again (a mutation review)


def test_url_never_prints_its_password_and_says_what_to_change(tmp_path, capsys):
    """The password in --url was printed in every error line (a review of --url); a
    redirect or a refused login gave a bare status."""
    import httpx

    from service.batch import RemoteError

    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for url, status in ((f"http://alice:s3cret@127.0.0.1:{port}", 1),
                        ("http://alice:s3cret@127.0.0.1:99999/", 2),
                        # a password typed with / or #, or no scheme: a URL parser takes
                        # part of it for the host or port (the diff review)
                        (f"http://alice:s3c#ret@127.0.0.1:{port}", 2),
                        (f"http://alice:s3c/ret@127.0.0.1:{port}", 2),
                        (f"alice:s3cret@127.0.0.1:{port}", 2),
                        # taken as host alice, port 123: the images went there
                        (f"http://alice:123/s3c@127.0.0.1:{port}", 2),
                        (f"alice:s3c://x@127.0.0.1:{port}", 2),
                        # an @ left unencoded in the password: the host is after the last
                        (f"http://alice:s3c@s3c@127.0.0.1:{port}", 1),
                        ("http://alice:s3c@s3c@127.0.0.1:99999", 2),
                        ("http://alice:s3cret@127.0.0.1:65536", 2)):
        with contextlib.suppress(SystemExit):
            assert main(["images", str(photo), "--out", str(tmp_path / "r.csv"),
                         "--url", url]) == status
        error = capsys.readouterr().err
        assert "alice" not in error and "s3c" not in error and "127.0.0.1" in error, error
    for reply, hint in ((httpx.Response(307, headers={"location": "https://elsewhere/predict"}),
                         "a redirect to https://elsewhere/predict, not followed: give "
                         "https://elsewhere as --url"),
                        (httpx.Response(307, headers={"location": "/svc/predict?u=bob@x.org"}),
                         "a redirect to http://service.test/svc/predict, not followed: give "
                         "http://service.test/svc as --url"),
                        (httpx.Response(401, json={"detail": "Not authenticated"}),
                         "credentials go in --url as http://user:password@host"),
                        (httpx.Response(403, text="<html>Forbidden</html>"),
                         "credentials go in --url as http://user:password@host")):
        runner, _ = _runner_answering(reply)
        with pytest.raises(RemoteError, match=re.escape(hint)):
            runner._classify([str(photo)])


def test_url_times_the_answer_from_its_headers_not_the_upload(tmp_path):
    """The whole-answer deadline began before the upload: a slow link's batch, answered in
    full, was thrown away as late (the diff review)."""
    import httpx

    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    prediction = {"filename": "0", "label": "NEUTRAL", "face": None, "error": None,
                  "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}

    def after_a_slow_upload(request):
        time.sleep(1.5)  # what came before the answer's headers
        return httpx.Response(200, json={"predictions": [prediction]})

    runner, _ = _runner_answering()
    runner.client = httpx.Client(transport=httpx.MockTransport(after_a_slow_upload))
    runner.timeout = 1.0
    [[row]] = runner._classify([str(photo)])
    assert row.values["label"] == "NEUTRAL"


def test_url_a_resume_the_service_refuses_leaves_the_output_as_it_was(tmp_path):
    """The service checked only its /readyz before the output was cut: a /predict refusal
    (a model it has not) removed one more file's rows at each retry (the diff review)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(encode(gray_image(), "PNG"))
    out = tmp_path / "rows.csv"
    argv = ["images", str(folder), "--out", str(out), "--faces", "none"]
    assert main([*argv, "--workers", "1"]) == 0
    before = out.read_bytes()
    unknown_model = (422, {}, b'{"detail": "unknown model \'foo\'", "code": "unknown_model"}')
    with scripted_service(lambda files, closing: unknown_model) as (url, _):
        for _ in range(2):
            assert main([*argv, "--resume", "--model", "foo", "--url", url]) == 1
            assert out.read_bytes() == before
        # a run that starts over empties its output at once, though no row came: a --resume
        # after it went on from an older run's rows (the diff review)
        assert main([*argv, "--url", url]) == 1
        assert read_rows(out) == []
    for option, seconds in (("--timeout", "inf"), ("--timeout", "1e10"), ("--timeout", "0"),
                            ("--wait", "-1"), ("--wait", "nan"), ("--wait", "1e10")):
        with pytest.raises(SystemExit) as caught:  # a socket took neither inf nor 1e10
            main([*argv, "--url", "http://127.0.0.1:1", option, seconds])
        assert caught.value.code == 2


@pytest.mark.parametrize("answer", ["endless", "trickling"])
def test_url_bounds_an_answer_in_size_and_time(tmp_path, answer):
    """An endless 200 was read until memory ran out; a trickle of a byte every few seconds
    kept the run going for ever, as the timeout was per read (a review of --url)."""
    import httpx

    from service.batch import RemoteError

    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))

    def endless():  # as good as: 200 MiB, so that a regression fails rather than hangs
        for _ in range(200):
            yield b" " * 1024 * 1024

    def trickling():  # a byte every 0.1 s, for ever as far as a 1 s timeout goes
        for _ in range(30):
            time.sleep(0.1)
            yield b" "
        # past the timeout's 1 s and still read: the end would be taken as the answer's
        # (a mutation review: with the deadline checked only after the body, this passed)
        raise AssertionError("the answer was read on past --timeout")

    runner, sent = _runner_answering(httpx.Response(
        200, content={"endless": endless, "trickling": trickling}[answer]()))
    runner.timeout = 1.0
    message = "more than 67,108,864 bytes" if answer == "endless" else "no whole answer within 1 s"
    with pytest.raises(RemoteError, match=message):
        runner._classify([str(photo)])
    assert len(sent) == 1  # once, not retried


def test_url_stops_at_once_on_a_model_the_service_refused_at_start_up(tmp_path, monkeypatch):
    """Such a 503 carries Retry-After 60: waited out nine times, it took 4 min in silence to
    say what the in-process run says at once. A busy service's 503 is still waited out."""
    import httpx

    from service.batch import RemoteError

    monkeypatch.setattr("service.batch.time.sleep", lambda seconds: None)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    for code in ("model_unavailable", "faces_unavailable"):
        runner, sent = _runner_answering(httpx.Response(503, headers={"retry-after": "60"}, json={
            "detail": "model 'knn' is not available: it failed verification at start-up",
            "code": code}))
        with pytest.raises(RemoteError, match="answered 503: .model 'knn' is not available"):
            runner._classify([str(photo)])
        assert len(sent) == 1
    runner, sent = _runner_answering(
        httpx.Response(503, headers={"retry-after": "1"},
                       json={"detail": "busy", "code": "overloaded"}),
        httpx.Response(200, json={"predictions": [{
            "filename": "0", "label": "NEUTRAL", "face": None, "error": None,
            "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}]}))
    [[row]] = runner._classify([str(photo)])
    assert row.values["label"] == "NEUTRAL" and len(sent) == 2


def test_a_missing_face_detector_is_said_in_the_command_lines_words(tmp_path):
    """In process (images and video) it said "not available on this server; use
    faces=none", with no server and no such option, and not why (a review)."""
    from tests.api import models_copy

    folder = models_copy(tmp_path)
    (folder / "face_onet.onnx").unlink()
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    argv = ["images", str(photo), "--out", str(tmp_path / "rows.csv"), "--models-dir",
            str(folder), "--workers", "1"]
    result = subprocess.run([*COMMAND, *argv, "--faces", "auto"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    said = ("emotion-detect: face detection refused: cannot read face_onet.onnx: No such "
            "file or directory; use --faces none")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == said
    assert main([*argv, "--faces", "none"]) == 0
    video = tmp_path / "clip.mp4"  # refused before it is read
    video.write_bytes(b"not read")
    result = subprocess.run([*COMMAND, "video", str(video), "--out", str(tmp_path / "v.csv"),
                             "--models-dir", str(folder), "--faces", "auto"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == said


def test_url_says_when_the_connection_failed_through_a_proxy(tmp_path, monkeypatch, capsys):
    """A proxy from the environment that was down was said as the service refusing, while
    the service was up (a review)."""
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    monkeypatch.setattr("service.batch.time.sleep", lambda seconds: None)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    argv = ["images", str(photo), "--out", str(tmp_path / "rows.csv"),
            "--url", "http://127.0.0.1:1"]
    monkeypatch.setenv("HTTP_PROXY", "http://user:secret@127.0.0.1:9")
    assert main(argv) == 1
    said = capsys.readouterr().err
    assert said.startswith("emotion-detect: http://127.0.0.1:1: ConnectError: ") and said.endswith(
        " (through the proxy http://***@127.0.0.1:9, from the environment)\n"), said
    # ALL_PROXY, and the proxy of the URL's own scheme, are named too (a mutation review)
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:8")
    assert main(argv) == 1
    assert capsys.readouterr().err.endswith(" (through the proxy http://127.0.0.1:8, from the "
                                            "environment)\n")
    monkeypatch.delenv("ALL_PROXY")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:7")
    assert main([*argv[:-1], "https://127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.endswith(" (through the proxy http://127.0.0.1:7, from the "
                                            "environment)\n")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # not through it: nothing said of a proxy
    assert main(argv) == 1
    assert "proxy" not in capsys.readouterr().err


class FakeClock:
    """``service.batch``'s monotonic clock and sleep: a sleep moves the clock on, at once."""

    def __init__(self, monkeypatch):
        self.now, self.slept = 1000.0, []
        monkeypatch.setattr("service.batch.time.monotonic", lambda: self.now)
        monkeypatch.setattr("service.batch.time.sleep", self.sleep)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_url_waits_out_a_busy_service_for_wait_seconds_not_nine_tries(tmp_path, monkeypatch,
                                                                      capsys):
    """Nine tries of the service's Retry-After of 1 s gave a busy service 9 s before the run
    stopped (a review: 1 run in 3 of 400 photos over 16 connections failed so against
    EMOTION_MAX_IN_FLIGHT=2), while a deployment adds replicas over minutes. The wait is
    said once, and its last try comes at --wait, not a pause before it."""
    import httpx

    from service.batch import RemoteError

    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    for retry_after, wait in (("1", 300.0), ("30", 60.0), ("30", 20.0)):
        clock = FakeClock(monkeypatch)
        runner, sent = _runner_answering(httpx.Response(
            503, headers={"retry-after": retry_after},
            json={"detail": "too many requests in flight; retry shortly", "code": "overloaded"}))
        runner.wait = wait
        with pytest.raises(RemoteError, match=r"answered 503: 'too many requests in flight; "
                           rf"retry shortly'; still busy after {wait:g} s \(--wait\)$"):
            runner._classify([str(photo)])
        assert sum(clock.slept) == pytest.approx(wait) and len(sent) == len(clock.slept) + 1
        # each as its Retry-After asks, and up to a quarter more, so that clients refused
        # together do not all come back in the same instant; the last cut to end at --wait
        asked = float(retry_after)
        assert all(asked <= pause <= 1.25 * asked for pause in clock.slept[:-1])
        assert len({round(pause, 6) for pause in clock.slept[:-1]}) >= len(clock.slept) // 2
        assert capsys.readouterr().err == (
            f"emotion-detect: http://service.test is busy (503); each batch waits up to "
            f"{wait:g} s for it (--wait)\n")
    assert len(clock.slept) == 1  # 20 s of a Retry-After of 30: one try at 20 s


def test_url_takes_a_503_from_readyz_as_it_is_and_waits_out_a_429(monkeypatch, capsys):
    """A service with one model refused at start-up answers /readyz 503 for good, and the
    run on its other model may go on: the check waited 3 s more first; a proxy's 429 is
    still waited out, not the end of the run (two diff reviews)."""
    import httpx

    clock = FakeClock(monkeypatch)
    runner, sent = _runner_answering(httpx.Response(503, json={
        "ready": False, "models": {"cnn": "ready", "knn": "refused"}}))
    runner.check()
    assert len(sent) == 1 and clock.slept == []
    runner, sent = _runner_answering(httpx.Response(429, headers={"retry-after": "1"}),
                                     httpx.Response(200, json={"ready": True}))
    runner.check()
    assert len(sent) == 2 and 1.0 <= sum(clock.slept) <= 1.25
    assert capsys.readouterr().err == ""  # the line is about batches, which wait --wait


def test_url_says_a_408_as_uploads_timing_out_not_a_busy_service(tmp_path, monkeypatch,
                                                                 capsys):
    """Its wait was announced, and its end said, as a busy service (a diff review): the
    service's 408 means the upload came too slowly."""
    import httpx

    from service.batch import RemoteError

    FakeClock(monkeypatch)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    runner, _ = _runner_answering(httpx.Response(408, json={
        "detail": "no byte of the request body came for 30 s", "code": "body_timeout"}))
    runner.wait = 2.0
    with pytest.raises(RemoteError, match=r"came for 30 s'; still timing out the uploads after "
                       r"2 s \(--wait\)$"):
        runner._classify([str(photo)])
    assert capsys.readouterr().err == ("emotion-detect: http://service.test is timing out the "
                                       "uploads (408); each batch waits up to 2 s for it "
                                       "(--wait)\n")


@pytest.mark.parametrize(("retry_after", "low", "high"), [
    ("in 6 s", 4.5, 6.0 * 1.25),  # a date drops the second's fraction
    ("a minute ago", 0.2, 0.25), ("0", 0.2, 0.25),
    ("\xb2", 0.2, 0.25), ("not a date", 0.2, 0.25), ("120", 30.0, 30.0 * 1.25),
    ("in 6 s, -0000", 4.5, 6.0 * 1.25)])  # email.utils.formatdate's own form
def test_url_reads_retry_after_as_seconds_or_a_date(tmp_path, monkeypatch, retry_after,
                                                     low, high):
    """An HTTP date (RFC 9110, as gateways send it) was not read, and the batch was sent
    again within 0.2 s (a review); one in the past, 0 or one unreadable waits as none given
    (0.2 s, doubling) rather than at once; more than 30 s waits 30."""
    import email.utils

    import httpx

    clock = FakeClock(monkeypatch)
    if retry_after == "in 6 s":
        retry_after = email.utils.formatdate(time.time() + 6, usegmt=True)
    elif retry_after == "in 6 s, -0000":
        retry_after = email.utils.formatdate(time.time() + 6)
    elif retry_after == "a minute ago":
        retry_after = email.utils.formatdate(time.time() - 60, usegmt=True)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    runner, sent = _runner_answering(
        httpx.Response(429, headers=[(b"retry-after", retry_after.encode("latin-1"))]),
        httpx.Response(200, json={"predictions": [{
            "filename": "0", "label": "NEUTRAL", "face": None, "error": None,
            "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}]}))
    [[row]] = runner._classify([str(photo)])
    [pause] = clock.slept
    assert row.values["label"] == "NEUTRAL" and low <= pause <= high


def test_an_output_inside_the_folder_it_classifies_is_not_an_input(test_images, tmp_path):
    """The next run, --resume or not, classified the output as an image: a row of
    not_an_image (or 'the upload is empty') for the rows file itself."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in test_images[:2]:
        (folder / name).write_bytes(data)
    out = folder / "rows.csv"
    for resume in ([], ["--resume"], []):
        result = subprocess.run([*COMMAND, "images", str(folder), "--out", str(out),
                                 "--workers", "1", *resume], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        rows = read_rows(out)
        assert sorted(Path(r["path"]).name for r in rows) == sorted(
            name for name, _ in test_images[:2])
        assert not any(r["code"] for r in rows)


def test_plot_without_matplotlib_is_one_line_before_any_work(tmp_path, monkeypatch):
    """PyAV installed alone (the help names it): a traceback from matplotlib's import."""
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    with pytest.raises(SystemExit, match="--plot needs the `video` extra"):
        main(["video", str(tmp_path / "talk.mp4"), "--out", str(tmp_path / "talk.csv"),
              "--plot", str(tmp_path / "talk.png")])


def test_url_gives_a_row_to_the_image_the_service_refuses_alone(tmp_path):
    """A 413 (from the service or a proxy before it, HTML or not) or an image's own error
    code: the batch is split to find which file it was, and that file gets the row."""
    import httpx

    good = {"predictions": [{"filename": "0", "label": "HAPPINESS", "face": None,
                             "error": None,
                             "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}]}
    photos = []
    for name in ("a.png", "b.png", "c.png"):
        photos.append(str(tmp_path / name))
        (tmp_path / name).write_bytes(encode(gray_image(), "PNG"))
    runner, sent = _runner_answering(
        httpx.Response(413, text="<html>413 Request Entity Too Large</html>"),
        httpx.Response(200, json=good),
        httpx.Response(413, text="<html>413 Request Entity Too Large</html>"),
        httpx.Response(400, json={"detail": "not an image", "code": "not_an_image"}))
    rows = [row.values for [row] in runner._classify(photos)]
    assert len(sent) == 4  # the batch, then each file alone
    assert [(r["label"], r["code"]) for r in rows] == [
        ("HAPPINESS", None), (None, "too_many_bytes"), (None, "not_an_image")]


def test_url_refuses_a_file_past_the_byte_limit_as_in_process_without_sending_it(tmp_path):
    """--url read every file whole (a /dev/zero until memory ran out) and sent it, and the
    row carried the service's whole-request message, not the one in process gives."""
    import httpx

    from service.batch import RemoteRunner, read_inputs

    big, small = tmp_path / "big.jpg", tmp_path / "small.png"
    big.write_bytes(b"\xff\xd8\xff" + bytes(3_000_000))
    small.write_bytes(encode(gray_image(), "PNG"))
    sent = []
    runner = RemoteRunner("http://service.test", None, None, 1, 4, max_bytes=1_000_000)
    runner.client = httpx.Client(transport=httpx.MockTransport(
        lambda request: sent.append(request) or httpx.Response(200, json={"predictions": [{
            "filename": "0", "label": "NEUTRAL", "face": None, "error": None,
            "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}]})))
    big_row, small_row = [row.values for [row] in runner._classify([str(big), str(small)])]
    assert len(sent) == 1 and b"\xff\xd8\xff" not in sent[0].content
    [(in_process, _)] = [read_inputs([str(big)], max_bytes=1_000_000)]
    assert (big_row["error"], big_row["code"]) == (str(in_process[0].error), "too_many_bytes")
    assert small_row["label"] == "NEUTRAL"


def test_a_named_pipe_is_waited_for_a_while_not_for_ever(tmp_path, monkeypatch):
    """open() of a FIFO waits for a writer: the run hung before writing any row. It is
    waited for PIPE_WAIT_SECONDS now, then its row says nothing came."""
    import threading

    import service.batch as batch

    monkeypatch.setattr(batch, "PIPE_WAIT_SECONDS", 0.5)
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    result = []
    reader = threading.Thread(target=lambda: result.append(batch.read_inputs([str(pipe)], 1000)),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert result, "read_inputs still waiting on the pipe"
    [(_, unreadable)] = result
    assert unreadable == {0: "cannot read the file: a named pipe that nothing wrote to in 0.5 s"}
    # a writer that comes within the wait (or bash's <(...), already there) is read whole
    monkeypatch.setattr(batch, "PIPE_WAIT_SECONDS", 10)

    def write_later():
        time.sleep(0.3)
        pipe.write_bytes(b"\x89PNG-bytes")

    writer = threading.Thread(target=write_later, daemon=True)
    writer.start()
    [image], unreadable = batch.read_inputs([str(pipe)], 1000)
    writer.join(10)
    assert image.data == b"\x89PNG-bytes" and not unreadable


def test_a_folder_in_a_list_gets_its_row_and_holds_no_descriptor(tmp_path):
    """A folder named in a list file left its descriptor open: past the open-file limit,
    the images after it were 'Too many open files'."""
    from service.batch import read_inputs

    (tmp_path / "folder").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    _, unreadable = read_inputs([str(tmp_path / "folder")] * 50, 1000)
    assert unreadable == dict.fromkeys(range(50), "cannot read the file: Is a directory")
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(("limit", "requests"), [(2, 3), (1, 7)])
def test_url_halves_a_batch_the_service_finds_too_large(tmp_path, monkeypatch, limit,
                                                        requests):
    """--batch-size over the service's limit: the 422 stopped the run. Down to one file a
    request (a batch of two not halved passed every test: a mutation review)."""
    import httpx

    import service.batch as batch

    real_read = batch.read_inputs

    photos = []
    for i in range(4):
        photos.append(str(tmp_path / f"{i}.png"))
        (tmp_path / f"{i}.png").write_bytes(encode(gray_image(), "PNG"))

    def answer(request):
        files = request.content.count(b'name="files"')
        if files > limit:
            return httpx.Response(422, json={"detail": f"at most {limit} files per request",
                                             "code": "too_many_files"})
        return httpx.Response(200, json={"predictions": [{
            "filename": str(i), "label": "NEUTRAL", "face": None, "error": None,
            "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}} for i in range(files)]})

    runner, sent = _runner_answering()
    runner.client = httpx.Client(transport=httpx.MockTransport(
        lambda request: sent.append(request) or answer(request)))
    reads = []
    monkeypatch.setattr(batch, "read_inputs", lambda paths, max_bytes=None: (
        reads.extend(paths) or real_read(paths, max_bytes)))
    rows = runner._classify(photos)
    assert [[r.values["path"] for r in file_rows] for file_rows in rows] == [[p] for p in photos]
    assert len(sent) == requests  # the batch of 4, two of 2 (and four of 1)
    # each file read once: read again for the halves, a pipe (<(...)) gave an empty image
    assert sorted(reads) == sorted(photos)


def test_url_with_a_trailing_slash_posts_to_predict_under_it(tmp_path):
    import httpx

    from service.batch import RemoteRunner

    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    prediction = {"filename": "0", "label": "NEUTRAL", "face": None, "error": None,
                  "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}
    for url, path in (("http://service.test/", "/predict"),
                      ("http://service.test/emotion/", "/emotion/predict")):
        sent = []
        runner = RemoteRunner(url, None, None, 1, 4)
        runner.client = httpx.Client(transport=httpx.MockTransport(
            lambda request, sent=sent: sent.append(request) or httpx.Response(
                200, json={"predictions": [prediction]})))
        [[row]] = runner._classify([str(photo)])
        assert row.values["label"] == "NEUTRAL"
        assert [request.url.path for request in sent] == [path]


def test_url_tries_a_mistyped_address_three_times_not_nine():
    import httpx

    from service.batch import RemoteError

    runner, sent = _runner_answering(httpx.ConnectError("connection refused"))
    with pytest.raises(RemoteError, match="ConnectError"):
        runner.check()
    assert len(sent) == 3


def test_ctrl_c_against_a_hung_service_stops_at_once(tmp_path):
    """The thread pool's threads were joined at exit, each waiting out its 120 s read."""
    import signal
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held = []

    def serve():  # /readyz answers; anything else is read and never answered
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)
            threading.Thread(target=lambda c=connection: [
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                for data in iter(lambda: c.recv(65536), b"")
                if data.startswith(b"GET /readyz")], daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    for i in range(12):
        (tmp_path / f"{i}.png").write_bytes(encode(gray_image(), "PNG"))
    out = tmp_path / "rows.csv"
    # The child starts with SIGINT at its default, as under a terminal: a test run started as
    # a background job (nohup ... &) has it ignored, and every child would inherit that.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([*COMMAND, "images", str(tmp_path), "--out", str(out),
                                    "--url", f"http://127.0.0.1:{port}", "--batch-size", "2"],
                                   cwd=REPO, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        deadline = time.monotonic() + 30
        while len(held) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the readiness check, then the first batches in flight
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        listener.close()
    assert process.returncode == 130, stderr
    assert "interrupted; --resume picks up where it stopped" in stderr


def test_ctrl_c_drops_the_workers_batches_in_hand(tmp_path):
    """With several workers, Ctrl-C waited for the batches already sent to them to finish:
    each waiting on a named pipe made it take 30 s, each a model call one more."""
    pipes = [tmp_path / f"{i}.jpg" for i in range(4)]
    for pipe in pipes:
        os.mkfifo(pipe)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{pipe}\n" for pipe in pipes))
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as under a terminal
    try:
        process = subprocess.Popen([*COMMAND, "images", str(listing), "--workers", "2",
                                    "--batch-size", "1", "--out", str(tmp_path / "rows.csv")],
                                   cwd=REPO, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    held = []
    try:
        # a writer held open without writing keeps a worker waiting on its pipe: opening one
        # succeeds only once a worker has the pipe open
        deadline = time.monotonic() + 60
        while not held:
            assert time.monotonic() < deadline and process.poll() is None, "no worker read"
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    held.append(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.1)
        interrupted = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        _, stderr = process.communicate(timeout=60)
        waited = time.monotonic() - interrupted
    finally:
        for descriptor in held:
            os.close(descriptor)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert waited < 15, f"{waited:.0f} s: the pipe's 30 s wait was sat out"


def resource_tracker_blocks_sighup(parent: int) -> bool:
    """Whether the multiprocessing resource tracker started by ``parent`` blocks SIGHUP."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
            command = (status.parent / "cmdline").read_bytes()
        except OSError:  # a process that ended meanwhile
            continue
        if int(fields["PPid"]) == parent and b"resource_tracker" in command:
            return bool(int(fields["SigBlk"], 16) & 1 << (signal.SIGHUP - 1))
    raise AssertionError(f"no resource tracker started by {parent}")


@pytest.mark.parametrize(("number", "to_group"), [
    (signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGHUP, True)])
def test_sigterm_or_sighup_to_the_command_alone_ends_its_workers_too(tmp_path, number,
                                                                      to_group):
    """Only Ctrl-C was caught: a SIGTERM or SIGHUP to the command's own process (a `kill`,
    a supervisor that signals one pid) left its forkserver and workers waiting for ever,
    230 MB each (a review). They now end as with Ctrl-C, and the status names the signal.
    A SIGHUP to the whole group (a closed terminal) killed multiprocessing's resource
    tracker too, whose relaunch wrote a warning and five tracebacks (the fourth diff
    review): the one line is all that is said."""
    pipes = [tmp_path / f"{i}.jpg" for i in range(4)]
    for pipe in pipes:
        os.mkfifo(pipe)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{pipe}\n" for pipe in pipes))

    def as_under_a_terminal():  # a test run under nohup ignores SIGHUP, and children inherit
        signal.signal(number, signal.SIG_DFL)

    process = subprocess.Popen([*COMMAND, "images", str(listing), "--workers", "2",
                                "--batch-size", "1", "--out", str(tmp_path / "rows.csv")],
                               cwd=REPO, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=as_under_a_terminal)
    held = []
    try:
        deadline = time.monotonic() + 60
        while not held:  # a worker has a pipe open: the workers are running
            assert time.monotonic() < deadline and process.poll() is None, "no worker read"
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    held.append(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.1)
        if to_group:
            # the tracker must keep SIGHUP blocked: whether it dies of the group's signal
            # depends on when the signal comes, so its mask is what is checked
            assert resource_tracker_blocks_sighup(process.pid)
            os.killpg(process.pid, number)
        else:
            process.send_signal(number)  # the command's own process only, not its group
        _, stderr = process.communicate(timeout=60)
        deadline = time.monotonic() + 20
        left = True
        while left and time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)  # anything of the command's still running?
                time.sleep(0.2)
            except ProcessLookupError:
                left = False
    finally:
        for descriptor in held:
            os.close(descriptor)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + number, stderr
    name = signal.Signals(number).name
    assert stderr.strip() == f"emotion-detect: stopped by {name}; --resume picks up where it " \
                             "stopped"
    assert not left, "its workers outlived it"


def test_an_ignored_signal_stays_ignored_while_signals_are_held():
    """Held, nohup's ignored SIGHUP had a handler while the forkserver started, so it and
    every worker were reset to the default and died at a closed terminal (the third diff
    review); an ignored signal needs no holding."""
    from service.signals import STOPPING_SIGNALS, signals_held

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_held(*STOPPING_SIGNALS):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
            signal.raise_signal(signal.SIGHUP)  # still nothing
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stopping_signal_during_a_submit_is_taken_just_after_it(number):
    """Inside pool.submit a stop could land while a worker was half started (a worker's
    traceback); SIGTERM and SIGHUP stop a run as Ctrl-C does, so they wait too (the second
    diff review reproduced the traceback with SIGTERM)."""
    from service.batch import _submit_uninterrupted
    from service.signals import STOPPING_SIGNALS, Stopped, handlers_swapped, raise_stopped

    finished = []

    class SignalledPool:
        def submit(self, function, chunk):
            signal.raise_signal(number)  # as if it came while the worker started
            finished.append(chunk)
            return "future"

    with handlers_swapped(STOPPING_SIGNALS, raise_stopped), \
            pytest.raises(KeyboardInterrupt) as stopped:
        _submit_uninterrupted(SignalledPool(), ["a.jpg"])
    assert finished == [["a.jpg"]]  # the submit ran to its end first
    assert isinstance(stopped.value, Stopped) and stopped.value.number == number


def test_recursive_follows_linked_folders_once_each(tmp_path):
    from service.batch import expand_paths

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "a.png").write_bytes(b"a")
    (real / "sub" / "b.png").write_bytes(b"b")
    top = tmp_path / "top"
    top.mkdir()
    (top / "c.png").write_bytes(b"c")
    (top / "linked").symlink_to(real)  # rglob skipped what is behind it
    (real / "sub" / "up").symlink_to(top)  # and a link back up must not loop
    found = [p.relative_to(top).as_posix() for p in expand_paths([top], recursive=True)]
    assert found == ["c.png", "linked/a.png", "linked/sub/b.png"]
    # a folder reached both directly and through links: by its own path, whichever the
    # file system lists first
    (top / "m_real").mkdir()
    (top / "m_real" / "x.png").write_bytes(b"x")
    for name in ("z_link", "a_link", ".hidden_link"):
        (top / name).symlink_to(top / "m_real")
    found = [p.relative_to(top).as_posix() for p in expand_paths([top], recursive=True)]
    assert found == ["c.png", "linked/a.png", "linked/sub/b.png", "m_real/x.png"]
    # a visible link to a hidden folder is followed: the hidden folder itself is not
    # entered, so it does not mark the link's files seen (a mutant entering it lost them)
    (top / ".photos").mkdir()
    (top / ".photos" / "y.png").write_bytes(b"y")
    (top / "photos").symlink_to(top / ".photos")
    found = [p.relative_to(top).as_posix() for p in expand_paths([top], recursive=True)]
    assert found == ["c.png", "linked/a.png", "linked/sub/b.png", "m_real/x.png",
                     "photos/y.png"]


@pytest.mark.parametrize("out", ["full", "proc"])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path, out):
    """/dev/full (a full disk) gave three chained tracebacks, /proc one."""
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    target = tmp_path / "rows.csv"
    if out == "full":
        target.symlink_to("/dev/full")
    else:
        target = Path("/proc/rows.csv")
    result = subprocess.run([*COMMAND, "images", str(photo), "--out", str(target),
                             "--workers", "1"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("emotion-detect: [Errno") and "Traceback" not in result.stderr


def test_a_worker_process_killed_mid_run_is_one_line_and_the_rows_stay(tmp_path):
    import time

    import psutil

    folder = tmp_path / "many"
    folder.mkdir()
    data = encode(gray_image(), "PNG")
    for i in range(3000):
        (folder / f"{i:04d}.png").write_bytes(data)
    out = tmp_path / "rows.csv"
    process = subprocess.Popen([*COMMAND, "images", str(folder), "--out", str(out),
                                "--workers", "2", "--batch-size", "4", "--faces", "none"],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                not out.exists() or out.stat().st_size < 2000):
            time.sleep(0.05)  # rows are coming: the workers are busy
        written = len(read_rows(out))
        # the workers are the forkserver's children, not the command's own
        workers = [worker for child in psutil.Process(process.pid).children()
                   for worker in child.children()]
        assert len(workers) == 2, workers
        workers[-1].kill()
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        "emotion-detect: a worker process died (out of memory?); --resume picks up where it "
        "stopped")
    assert "Traceback" not in stderr and len(read_rows(out)) >= written > 0


PREDICTION = {"label": "NEUTRAL", "face": None, "error": None,
              "probabilities": {c: 1 / NUM_CLASSES for c in CLASS_NAMES}}


@contextlib.contextmanager
def scripted_service(answer: Callable[[int, threading.Event], tuple[int, dict, bytes]]):
    """A loopback HTTP/1.1 service: GET answers 200 (/readyz), POST /predict ``answer(files
    in it, closing)``, where ``closing`` is set as the service closes, so that a slow answer
    ends with it. Yields its URL and what it saw: posts, the most open at once, client
    ports."""
    import http.server

    seen = {"posts": 0, "open": 0, "most_open": 0, "ports": set()}
    lock, closing = threading.Lock(), threading.Event()

    class Scripted(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # the body waited 40 ms for the headers' ACK each time

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.reply(200, {}, b'{"status": "ready"}')

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                seen["posts"] += 1
                seen["open"] += 1
                seen["most_open"] = max(seen["most_open"], seen["open"])
                seen["ports"].add(self.client_address[1])
            try:
                status, headers, content = answer(body.count(b'filename="'), closing)
            finally:
                with lock:
                    seen["open"] -= 1
            self.reply(status, headers, content)

        def reply(self, status, headers, content):
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client gone before its answer (--timeout): its traceback went to stderr

    server = Quiet(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        closing.set()
        server.shutdown()
        server.server_close()


def predictions(files: int, closing: threading.Event, pause: float = 0.0
                ) -> tuple[int, dict, bytes]:
    closing.wait(pause)
    return 200, {}, json.dumps({"predictions": [
        {**PREDICTION, "filename": str(i)} for i in range(files)]}).encode()


def busy(files: int, closing: threading.Event) -> tuple[int, dict, bytes]:
    return 503, {"Retry-After": "1"}, json.dumps({
        "detail": "too many requests in flight; retry shortly", "code": "overloaded"}).encode()


@pytest.mark.parametrize(("wait", "waited"), [(None, 300.0), ("2", 2.0), ("0", 0.0)])
def test_url_waits_as_long_as_wait_says_its_default_300(tmp_path, monkeypatch, wait, waited):
    """--wait was checked for its bounds, but nothing showed it reached the run: dropped
    on its way, or a default of 30, no test failed (a mutation review)."""
    clock = FakeClock(monkeypatch)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    with scripted_service(busy) as (url, seen):
        argv = ["images", str(photo), "--out", str(tmp_path / "rows.csv"), "--url", url]
        assert main([*argv, *(["--wait", wait] if wait else [])]) == 1
    assert sum(clock.slept) == pytest.approx(waited)
    assert seen["posts"] == len(clock.slept) + 1  # a last try at --wait


def test_url_options_reach_the_connections(tmp_path, monkeypatch, capsys, request):
    """--timeout, --connections and EMOTION_MAX_UPLOAD_BYTES were each lost on the way to
    the runner with no test failing; and keep-alive off went unseen (a mutation review)."""
    photos = []
    for i in range(6):
        photos.append(str(tmp_path / f"{i}.png"))
        (tmp_path / f"{i}.png").write_bytes(encode(gray_image(seed=i), "PNG"))
    out = str(tmp_path / "rows.csv")
    # six batches of one, each answered in 0.3 s: two at a time, over two connections
    with scripted_service(lambda files, closing: predictions(files, closing, 0.3)
                          ) as (url, seen):
        assert main(["images", *photos, "--out", out, "--url", url, "--batch-size", "1",
                     "--connections", "2"]) == 0
    assert (seen["posts"], seen["most_open"], len(seen["ports"])) == (6, 2, 2)
    # an answer later than --timeout: the run stops, it does not wait for it
    with scripted_service(lambda files, closing: predictions(files, closing, 3.0)
                          ) as (url, seen):
        assert main(["images", photos[0], "--out", out, "--url", url, "--timeout", "1"]) == 1
    assert "no whole answer within 1 s (--timeout)" in capsys.readouterr().err
    # a file over the service's byte limit is a row, not sent
    monkeypatch.setenv("EMOTION_MAX_UPLOAD_BYTES", "100")
    from service.settings import load_settings

    load_settings.cache_clear()  # read once per process: read again, and again after
    request.addfinalizer(load_settings.cache_clear)
    with scripted_service(predictions) as (url, seen):
        assert main(["images", photos[0], "--out", out, "--url", url]) == 0
    [row] = read_rows(Path(out))
    assert row["code"] == "too_many_bytes" and seen["posts"] == 0


def test_url_sends_a_batch_again_after_a_failed_connection_backing_off(tmp_path, monkeypatch):
    """A batch whose connection failed (a service restarting) is sent again after 0.2 s,
    then 0.4 s...: with no retry, or no pause, a restart of a few seconds ended the run
    (a mutation review)."""
    import httpx

    clock = FakeClock(monkeypatch)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    refused = httpx.ConnectError("Connection refused")
    runner, sent = _runner_answering(refused, refused, httpx.Response(200, json={
        "predictions": [{**PREDICTION, "filename": "0"}]}))
    [[row]] = runner._classify([str(photo)])
    assert row.values["label"] == "NEUTRAL"
    assert len(sent) == 3 and clock.slept == [0.2, 0.4]


def test_url_backs_off_a_busy_service_that_says_no_retry_after(tmp_path, monkeypatch):
    """With no Retry-After, the pauses double from 0.2 s up to 5 s, each up to a quarter
    more: without the doubling a busy service was asked 10 times as often, without the cap
    a pause grew past 50 s (a mutation review)."""
    import httpx

    from service.batch import RemoteError

    clock = FakeClock(monkeypatch)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    runner, sent = _runner_answering(httpx.Response(503, json={
        "detail": "too many requests in flight", "code": "overloaded"}))
    runner.wait = 40.0
    with pytest.raises(RemoteError, match="still busy after 40 s"):
        runner._classify([str(photo)])
    bases = [0.2, 0.4, 0.8, 1.6, 3.2] + [5.0] * 20
    assert all(base <= pause <= 1.25 * base
               for pause, base in zip(clock.slept[:-1], bases, strict=False)), clock.slept
    assert sum(clock.slept) == pytest.approx(40.0) and len(sent) == len(clock.slept) + 1


def test_url_readiness_check_waits_out_a_429_for_5_s_not_wait(monkeypatch):
    """The check before any file is read waits 5 s for a proxy's 429, not the run's --wait
    (300 s in silence, a mutation review)."""
    import httpx

    from service.batch import RemoteError

    clock = FakeClock(monkeypatch)
    runner, sent = _runner_answering(httpx.Response(429, headers={"retry-after": "1"}))
    with pytest.raises(RemoteError, match="/readyz answered 429"):
        runner.check()
    assert sum(clock.slept) == pytest.approx(5.0) and len(sent) == len(clock.slept) + 1


@pytest.mark.parametrize("failure", ["WriteTimeout", "ReadTimeout", "PoolTimeout"])
def test_url_does_not_send_a_batch_again_that_timed_out(tmp_path, monkeypatch, failure):
    """A batch the service took and did not answer, or whose upload it stopped reading, is
    not sent again: a 50 MB upload went 9 times (a mutation review)."""
    import httpx

    from service.batch import RemoteError

    FakeClock(monkeypatch)
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(gray_image(), "PNG"))
    runner, sent = _runner_answering(getattr(httpx, failure)("timed out"))
    with pytest.raises(RemoteError, match="no whole answer within"):
        runner._classify([str(photo)])
    assert len(sent) == 1
