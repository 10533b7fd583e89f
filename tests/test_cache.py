"""The decode cache: built once, keyed by data and preprocessing, identical to serving."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.preprocessing import pixels_to_input, preprocess_image
from tests.images import encode, gray_image, rgb_image
from training.cache import cache_key, load_decoded_images
from training.dataset import read_clean_table


def synthetic_table(folder, count=6):
    import hashlib

    rows = []
    for i in range(count):
        image = gray_image(60 + i, 50, seed=i) if i % 2 else rgb_image(80, 80 + i, seed=i)
        data = encode(image, "JPEG" if i % 3 else "PNG")
        name = f"Person_{i}_0001.jpg"
        (folder / name).write_bytes(data)
        rows.append({"image": name, "label": "NEUTRAL", "identity": f"person{i}",
                     "contributor": "t", "sha256": hashlib.sha256(data).hexdigest()})
    return pd.DataFrame(rows)


def test_cache_holds_exactly_what_serving_computes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    decoded = load_decoded_images(table, images, tmp_path / "cache", workers=1)
    assert decoded.pixels.shape == (len(table), 350, 350)
    for row, name in enumerate(table["image"]):
        served = preprocess_image((images / name).read_bytes())
        np.testing.assert_array_equal(pixels_to_input(np.asarray(decoded.pixels[row])), served)
    # A second load reuses the cache instead of decoding again.
    (images / table["image"][0]).unlink()
    again = load_decoded_images(table, images, tmp_path / "cache")
    np.testing.assert_array_equal(again.pixels, decoded.pixels)


def test_a_rebuild_replaces_a_damaged_cache(tmp_path):
    """The rebuilt folder could not be renamed over the old one, so it was thrown away as if
    another process had finished first, and the damaged pixels stayed."""
    from training.cache import PIXELS_FILE, build_cache

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    good = np.array(load_decoded_images(table, images, tmp_path / "cache", workers=1).pixels)
    pixels = tmp_path / "cache" / cache_key(table) / PIXELS_FILE
    pixels.write_bytes(bytes(pixels.stat().st_size))  # zeroed: a damaged disk, say
    # what an earlier rebuild stopped halfway left, under the name this process would use
    stale = tmp_path / "cache" / f".{cache_key(table)}.old.{os.getpid()}"
    stale.mkdir()
    (stale / PIXELS_FILE).write_bytes(b"old")
    build_cache(table, images, tmp_path / "cache", workers=1, replace=True)
    np.testing.assert_array_equal(
        load_decoded_images(table, images, tmp_path / "cache").pixels, good)
    # the new build in place, and no staging left, nor the old cache a stopped rebuild left
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_key(table)]


def test_a_rebuild_whose_old_cache_another_rebuild_set_aside_puts_its_own_in_place(
        tmp_path, monkeypatch):
    """Two `cache --rebuild` at once: the one that found the cache gone when it came to set
    it aside failed after its whole decode, leaving its staging and an empty folder (a
    review, 5 of 12 pairs). The other rebuild's move is made here at that moment."""
    import tempfile

    from training import cache

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    folder = tmp_path / "cache"
    good = np.array(load_decoded_images(table, images, folder, workers=1).pixels)
    final = folder / cache_key(table)
    theirs = folder / f".{final.name}.old.theirs"
    real_mkdtemp = tempfile.mkdtemp

    def the_other_rebuild_first(*args, **kwargs):
        if ".old." in kwargs.get("prefix", "") and final.exists():
            final.rename(theirs)  # the other rebuild's aside, which it removes itself
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(cache.tempfile, "mkdtemp", the_other_rebuild_first)
    assert cache.build_cache(table, images, folder, workers=1, replace=True) == final
    np.testing.assert_array_equal(load_decoded_images(table, images, folder).pixels, good)
    assert sorted(p.name for p in folder.iterdir()) == sorted([final.name, theirs.name])


def test_a_file_where_the_cache_goes_is_refused_before_the_decode(tmp_path):
    """It decoded the whole set, threw it away, then failed on 'Not a directory' (or, with
    --rebuild, 'Is a directory', leaving its staging; a review)."""
    from training.cache import build_cache
    from training.fetch import DataError

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / cache_key(table)).write_text("not a cache")
    for replace in (False, True):
        with pytest.raises(DataError, match=f"{cache_key(table)}, where this decode cache "
                           "goes, is not a folder: remove it"):
            build_cache(table, images, folder, workers=1, replace=replace)
        with pytest.raises(DataError, match="is not a folder"):
            load_decoded_images(table, images, folder, workers=1)
        assert [p.name for p in folder.iterdir()] == [cache_key(table)]


@pytest.mark.parametrize("damage", ["index cut", "index not JSON", "pixels cut",
                                    "pixels gone"])
def test_a_damaged_cache_is_one_line_saying_a_rebuild_repairs_it(tmp_path, damage):
    """A cut index.json or pixels.u8 was a JSONDecodeError or mmap's ValueError traceback in
    every command that read the cache (a review)."""
    from training.cache import INDEX_FILE, PIXELS_FILE
    from training.fetch import DataError

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    load_decoded_images(table, images, tmp_path / "cache", workers=1)
    folder = tmp_path / "cache" / cache_key(table)
    index, pixels = folder / INDEX_FILE, folder / PIXELS_FILE
    if damage == "index cut":
        index.write_text(index.read_text()[:40])
    elif damage == "index not JSON":
        index.write_text("[1, 2]")
    elif damage == "pixels cut":
        pixels.write_bytes(pixels.read_bytes()[:1000])
    else:
        pixels.unlink()
    with pytest.raises(DataError, match=f"the decode cache {folder} is damaged .*; `python -m "
                                        "training cache --rebuild` builds it again"):
        load_decoded_images(table, images, tmp_path / "cache")


def test_cache_key_changes_with_the_data(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    changed = table.copy()
    changed.loc[0, "sha256"] = "0" * 64
    assert cache_key(table) != cache_key(changed)
    # the same bytes under another name are another table: rows are found by name
    renamed = table.copy()
    renamed.loc[0, "image"] = "Person_0_0002.jpg"  # in the same place in name order
    assert cache_key(renamed) != cache_key(table)
    import training.cache as cache

    before = cache_key(table)
    monkeypatch.setattr(cache, "PREPROCESSING_VERSION", "test-version")
    assert cache_key(table) != before


def test_cache_refuses_a_file_that_changed(tmp_path):
    from training.fetch import ChecksumError

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    (images / table["image"][2]).write_bytes(encode(gray_image(10, 10), "PNG"))
    # ChecksumError, which the command line says in one line (a ValueError's traceback)
    # ... and says how to check the copy, as a missing image's message does (a review)
    with pytest.raises(ChecksumError, match="differs from the clean table's .*; `python -m "
                                            "training verify` checks the whole copy; set X"):
        load_decoded_images(table, images, tmp_path / "cache", workers=1, hint="set X")
    # nor a staging folder named by a process id, which no later run would clean
    assert list((tmp_path / "cache").iterdir()) == []
    # FER-2013's checksums come from its list, not a clean table: the message says which
    with pytest.raises(ChecksumError, match="differs from fer2013.SHA256SUMS's.*`python -m "
                                            "training verify fer2013`"):
        load_decoded_images(table, images, tmp_path / "cache", workers=1,
                            listed_in="fer2013.SHA256SUMS")


STOPPED_BUILD = """
import signal, sys, time
from pathlib import Path
import training.cache as cache
from tests.test_cache import synthetic_table

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as at a terminal, whatever ran the tests (nohup)

decode = cache._decode_verified
def slowly(job):
    time.sleep(0.02)
    return decode(job)
cache._decode_verified = slowly  # the pool's forked workers take it too
folder = Path(sys.argv[1])
table = synthetic_table(folder / "images", count=200)
try:
    cache.build_cache(table, folder / "images", folder / "cache", workers=2)
except KeyboardInterrupt as stopped:
    sys.exit(128 + getattr(stopped, "number", 2))
"""


def _decoding_build(tmp_path, stderr) -> subprocess.Popen:
    """STOPPED_BUILD in a process group of its own, returned once its workers are decoding."""
    (tmp_path / "images").mkdir()
    build = subprocess.Popen([sys.executable, "-c", STOPPED_BUILD, str(tmp_path)],
                             cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                             stderr=stderr, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache").glob(".*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well into the decoding
    return build


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_a_build_stopped_by_a_signal_leaves_no_staging(tmp_path, number):
    """Stopped by SIGTERM, a cache build left its 1.6 GB staging folder for good: only Ctrl-C
    removed it, and later builds removed only the one named by their own process id (a
    review). Taken in the decode workers too, the stop broke the pool's thread and the build
    never exited (the diff review): two workers here, and the group signalled."""
    build = _decoding_build(tmp_path, stderr=subprocess.PIPE)
    try:
        os.killpg(build.pid, number)  # the whole group, as a supervisor or a closed terminal
        _, err = build.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGKILL)  # a build that hung goes with the test
    assert build.returncode == 128 + number, err
    assert "Traceback" not in err and "Exception" not in err, err
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_build_removes_the_staging_a_killed_one_left(tmp_path):
    """A build killed outright (SIGKILL, out of memory) cannot clean up: the next one does.
    It leaves a staging folder whose build still runs, whatever its name says: one in
    another pid namespace (a container sharing the cache) looked dead by its process id (the
    diff review). A build's claim is a lock it holds, which the kernel drops with it."""
    from training.cache import BUILDING_FILE, build_cache

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    killed = tmp_path / "cache" / f".{cache_key(table)}.build.killed"
    running = tmp_path / "cache" / f".{cache_key(table)}.build.running"
    for staging in (killed, running):
        staging.mkdir(parents=True)
        (staging / "pixels.u8").write_bytes(bytes(100))
        (staging / BUILDING_FILE).touch()
    holder = subprocess.Popen(  # another process holds it, as the running build does
        [sys.executable, "-c", "import fcntl, sys, time; claim = open(sys.argv[1], 'r+'); "
         "fcntl.lockf(claim, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
         str(running / BUILDING_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        build_cache(table, images, tmp_path / "cache", workers=1)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [cache_key(table), running.name])
    assert not (tmp_path / "cache" / cache_key(table) / BUILDING_FILE).exists()
    assert (tmp_path / "cache" / cache_key(table)).stat().st_mode & 0o055  # others may read


def test_a_build_killed_outright_leaves_no_claim_in_its_workers(tmp_path):
    """The claim was an flock, which the forked decode workers shared: orphaned by a SIGKILL
    to their build, they held it, and its staging was never removed (the diff review)."""
    from training.cache import build_cache

    build = _decoding_build(tmp_path, stderr=subprocess.DEVNULL)
    try:
        os.kill(build.pid, signal.SIGKILL)  # the build alone: its workers live on a while
        build.wait(30)
        (tmp_path / "again").mkdir()
        table = synthetic_table(tmp_path / "again", count=200)  # the same images
        build_cache(table, tmp_path / "images", tmp_path / "cache", workers=1)
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_key(table)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGKILL)


def test_cache_names_the_images_missing_and_how_to_find_them(tmp_path):
    from training.fetch import DataError

    images = tmp_path / "images"
    images.mkdir()
    table = synthetic_table(images)
    (images / table["image"][1]).unlink()
    with pytest.raises(DataError, match=f"1 of the {len(table)} images clean.csv names are "
                       f"missing \\(e.g. \\['{table['image'][1]}'\\]\\); set THIS"):
        load_decoded_images(table, images, tmp_path / "cache", workers=1,
                            listed_in="clean.csv", hint="set THIS")
    assert not (tmp_path / "cache").exists()  # refused before any work


@pytest.mark.dataset
def test_real_cache_matches_serving_on_sampled_images(data_settings):
    table = read_clean_table(data_settings.clean_table)
    decoded = load_decoded_images(table, data_settings.images_dir, data_settings.cache_dir)
    assert decoded.pixels.shape == (len(table), 350, 350)
    rng = np.random.default_rng(0)
    colour = table.index[table["contributor"] == "jhamski"][:5]
    for row in [*rng.choice(len(table), 20, replace=False), *colour]:
        name = decoded.names[row]
        served = preprocess_image((data_settings.images_dir / name).read_bytes())
        np.testing.assert_array_equal(pixels_to_input(np.asarray(decoded.pixels[row])), served)
