"""FER-2013 as the second dataset: its layout, its fetch path, the shared copy, its cache."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from service.preprocessing import pixels_to_input, preprocess_image
from tests.images import encode, git_repository, gray_image, later_commit
from training.fer2013 import (
    CLASS_MAP,
    fer_table,
    fetch_fer2013,
    is_full_release,
    parse_original,
    require_usages,
)
from training.fetch import ChecksumError, read_checksums

# The release's PublicTest counts (the shared copy's README), in CLASS_MAP order.
PUBLIC_TEST = dict(zip(("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"),
                       (467, 56, 496, 895, 607, 653, 415), strict=True))


def test_only_release_originals_are_fer2013():
    assert parse_original("train/angry/Training_3908.jpg") == {"usage": "Training",
                                                               "label": "ANGER"}
    assert parse_original("test/surprise/PrivateTest_11.jpg")["label"] == "SURPRISE"
    assert parse_original("validation/neutral/PublicTest_7.jpg")["usage"] == "PublicTest"
    for other in ("train/angry/Training_3908.jpg3.jpg",  # the mirror's augmented copies
                  "train/angry/PublicTest_1.jpg",        # a usage in the wrong folder
                  "train/contempt/Training_1.jpg", "split.ipynb", "train/angry/x.png"):
        assert parse_original(other) is None, other
    assert sorted(CLASS_MAP.values()) == sorted(
        ["ANGER", "DISGUST", "FEAR", "HAPPINESS", "NEUTRAL", "SADNESS", "SURPRISE"])


@pytest.fixture
def mirror(tmp_path):
    """A repository laid out like the public mirror: originals, an augmented copy beside
    them, a notebook; the checksum list names the originals only."""
    repo = tmp_path / "mirror"
    originals = {f"{folder}/{cls}/{usage}_{i}.jpg": encode(gray_image(48, 48, seed=i), "JPEG")
                 for i, (folder, cls, usage) in enumerate([
                     ("train", "happy", "Training"), ("train", "sad", "Training"),
                     ("validation", "angry", "PublicTest"), ("test", "fear", "PrivateTest")])}
    extras = {"train/happy/Training_0.jpg1.jpg": encode(gray_image(48, 48, seed=9), "JPEG"),
              "split.ipynb": b"{}"}
    commit = git_repository(repo, {**originals, **extras})
    # the mirror's later commits filtered images in place: the tip is not the release
    later_commit(repo, {"train/sad/Training_1.jpg": encode(gray_image(48, 48, seed=7), "JPEG")})
    sums = tmp_path / "fer2013.SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n"
                            for n, d in originals.items()))
    return repo, commit, sums, originals


def test_fetch_keeps_only_the_verified_originals(mirror, tmp_path):
    repo, commit, sums, originals = mirror
    dest = fetch_fer2013(tmp_path / "fer2013", sums, f"file://{repo}", commit)
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == sorted(originals)
    for name, data in originals.items():
        assert (dest / name).read_bytes() == data
    table = fer_table(dest, sums)
    assert list(table["subset"].value_counts().sort_index().items()) == [
        ("test", 1), ("train", 2), ("val", 1)]


def test_fetch_replaces_an_earlier_fetch_but_never_a_folder_of_other_files(mirror, tmp_path):
    """A fetch replaces its destination whole: --dest ~/data wiped that folder."""
    repo, commit, sums, originals = mirror
    dest = fetch_fer2013(tmp_path / "fer2013", sums, f"file://{repo}", commit)
    assert fetch_fer2013(dest, sums, f"file://{repo}", commit) == dest  # again: fine
    mine = tmp_path / "data"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit, match="not FER-2013's"):
        fetch_fer2013(mine, sums, f"file://{repo}", commit)
    assert (mine / "train" / "thesis.tex").read_text() == "years of work"


def test_fetch_refuses_an_image_that_differs_and_leaves_nothing(mirror, tmp_path):
    repo, commit, sums, _ = mirror
    text = sums.read_text()
    sums.write_text(text.replace(text[:8], "00000000", 1))
    # named by where the files came from, not by a staging folder that is gone
    with pytest.raises(ChecksumError, match=f"^file://{repo} at commit {commit[:12]}: 0 "
                                            "files missing .*, 1 differ"):
        fetch_fer2013(tmp_path / "fer2013", sums, f"file://{repo}", commit)
    # nor a hidden .fer2013.partial of up to 35,887 files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fer2013.SHA256SUMS", "mirror"]


def test_a_fetch_stopped_while_it_replaces_an_earlier_one_keeps_that_one(
        mirror, tmp_path, monkeypatch):
    """The earlier fetch was deleted before the new one was moved in: a Ctrl-C between left
    it half deleted (the data review: 3,280 of PublicTest's 3,589 images)."""
    repo, commit, sums, originals = mirror
    dest = fetch_fer2013(tmp_path / "fer2013", sums, f"file://{repo}", commit)
    rename = type(dest).rename

    def stopped_moving_in(self, target):
        if self.name == ".fer2013.partial":
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(type(dest), "rename", stopped_moving_in)
    with pytest.raises(KeyboardInterrupt):
        fetch_fer2013(dest, sums, f"file://{repo}", commit)
    monkeypatch.undo()
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*")
            if p.is_file()} == originals
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fer2013", "fer2013.SHA256SUMS",
                                                          "mirror"]


# fetch fer2013 through the command, at the mirror's commit (the command fetches the pinned
# one): argv is dest, checksums, source, commit, then what the test adds
FETCH_SCRIPT = """
import sys
from pathlib import Path
import training.fer2013
from training.__main__ import main

dest, sums, source, commit = sys.argv[1:5]
real = training.fer2013.fetch_fer2013
training.fer2013.fetch_fer2013 = lambda d, checksums, s: real(d, Path(sums), s, commit)
"""
FETCH = FETCH_SCRIPT + """
sys.exit(main(["fetch", "fer2013", "--source", source, "--dest", dest]))
"""
FETCH_SIGNALLED = FETCH_SCRIPT + """
import signal
number = getattr(signal, sys.argv[5])
# set either way: a test run under nohup (or a CI job's shell) starts with SIGHUP ignored
signal.signal(number, signal.SIG_IGN if sys.argv[6] == "ignored" else signal.SIG_DFL)
rename = Path.rename

def signalled_moving_in(self, target):
    if self.name == ".fer2013.partial":
        signal.raise_signal(number)
    return rename(self, target)

Path.rename = signalled_moving_in
sys.exit(main(["fetch", "fer2013", "--source", source, "--dest", dest]))
"""


@pytest.mark.parametrize(("name", "ignored"), [("SIGTERM", "default"), ("SIGHUP", "default"),
                                               ("SIGHUP", "ignored")])
def test_a_fetch_ended_by_a_signal_cleans_up_as_ctrl_c_does(mirror, tmp_path, name, ignored):
    """SIGTERM or a closed terminal ended the process in the middle: its staging folder (up
    to 35,887 files) and clone stayed, and the earlier fetch could be gone (the diff
    review). A signal the caller ignores (nohup's SIGHUP) is left ignored: the fetch goes on
    (the next diff review: it stopped)."""
    import signal
    import subprocess
    import sys

    from tests.server import REPO

    repo, commit, sums, originals = mirror
    dest = fetch_fer2013(tmp_path / "fer2013", sums, f"file://{repo}", commit)
    (dest / next(iter(originals))).unlink()  # so that the new fetch can be told from it
    result = subprocess.run([sys.executable, "-c", FETCH_SIGNALLED, str(dest), str(sums),
                             f"file://{repo}", commit, name, ignored], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    kept = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    if ignored == "ignored":
        assert result.returncode == 0, result.stderr
        assert kept == originals  # the new fetch, whole
    else:  # cleaned up as after Ctrl-C, its status still the signal's (a supervisor's 143)
        number = getattr(signal, name)
        assert result.returncode == 128 + number, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"python -m training fetch: stopped by {name}; what it had finished stays")
        assert kept == dict(list(originals.items())[1:])  # the earlier fetch, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fer2013", "fer2013.SHA256SUMS",
                                                          "mirror"]


def test_one_fetch_at_a_time_and_only_where_it_can_write(mirror, tmp_path):
    """Two fetches into one folder shared a staging folder and deleted each other's files; a
    folder whose parent could not be written failed after the whole clone (the diff
    review)."""
    import fcntl
    import subprocess
    import sys

    from tests.server import REPO

    repo, commit, sums, originals = mirror
    parent = tmp_path / "data"
    parent.mkdir()
    held = os.open(parent / ".fer2013.lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a fetch running into data/fer2013 holds it
    try:
        with pytest.raises(SystemExit, match=f"another fetch into {parent / 'fer2013'} is "
                                             "running"):
            fetch_fer2013(parent / "fer2013", sums, f"file://{repo}", commit)
        # another destination beside it stages apart: it was refused too (the diff review)
        assert fetch_fer2013(parent / "other", sums, f"file://{repo}", commit).is_dir()
    finally:
        os.close(held)
    # a lock a killed fetch left is taken over, and removed with the fetch
    assert fetch_fer2013(parent / "fer2013", sums, f"file://{repo}", commit).is_dir()
    assert sorted(p.name for p in parent.iterdir()) == ["fer2013", "other"]

    (tmp_path / "shut" / "fer2013").mkdir(parents=True)
    (tmp_path / "shut").chmod(0o555)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 else []
    try:
        result = subprocess.run([*drop, sys.executable, "-c", FETCH,
                                 str(tmp_path / "shut" / "fer2013"), str(sums),
                                 f"file://{repo}", commit], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
    finally:
        (tmp_path / "shut").chmod(0o755)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "shut is not writable: a fetch stages its files beside fer2013 and renames them into "
        "place"), result.stderr


def test_a_mount_point_is_refused_before_the_clone(mirror, tmp_path):
    """A volume mounted where the copy goes (a container's) cannot be set aside: the fetch
    failed with 'Device or resource busy' after the whole clone (the diff review)."""
    import shutil
    import subprocess
    import sys

    from tests.server import REPO

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare -m, as root)")
    repo, commit, sums, _ = mirror
    volume = tmp_path / "volume"
    volume.mkdir()
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$1" && shift && exec "$@"',
         "sh", str(volume), sys.executable, "-c", FETCH, str(volume), str(sums),
         f"file://{repo}", commit], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "is a mount point, which a fetch cannot replace: name a new folder inside it"), \
        result.stderr


def test_fetch_resolves_its_destination(mirror, tmp_path, monkeypatch, capsys):
    """A --dest that was a link to an empty folder: the whole clone ran, then 'Cannot call
    rmtree on a symbolic link'; a relative one was printed as a setting that worked only
    from that folder."""
    import training.__main__ as cli
    import training.fer2013

    repo, commit, sums, originals = mirror
    real = training.fer2013.fetch_fer2013
    monkeypatch.setattr(training.fer2013, "fetch_fer2013",  # the mirror's commit, not the pin
                        lambda dest, checksums, source: real(dest, sums, source, commit))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert cli.main(["fetch", "fer2013", "--source", str(repo), "--dest", "link"]) == 0
    assert (tmp_path / "link").is_symlink()
    assert sorted(str(p.relative_to(tmp_path / "target"))
                  for p in (tmp_path / "target").rglob("*") if p.is_file()) == sorted(originals)
    assert f"EMOTION_FER2013_DIR={tmp_path / 'target'}" in capsys.readouterr().out
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a traceback from resolve()
    assert cli.main(["fetch", "fer2013", "--dest", "loop"]) == 2
    assert "--dest: Symlink loop" in capsys.readouterr().err


@pytest.mark.dataset
def test_a_usage_only_partly_here_is_not_the_full_release(fer_settings, tmp_path):
    """The audit wrote data/fer2013_audit.* from a copy with a PublicTest image missing,
    since each usage had at least one image (the data review)."""
    shared = [n for n in read_checksums(fer_settings.fer2013_checksums)
              if (fer_settings.fer2013_dir / n).is_file()][:3]
    folder, lines = tmp_path / "fer2013", []
    for name, usage in zip(shared, ("Training", "PublicTest", "PrivateTest"), strict=True):
        own = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}[usage]
        target = folder / own / name.split("/")[1] / f"{usage}_1.jpg"  # a real image each
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((fer_settings.fer2013_dir / name).read_bytes())
        lines.append(f"{hashlib.sha256(target.read_bytes()).hexdigest()}  "
                     f"{target.relative_to(folder).as_posix()}\n")
    whole = tmp_path / "whole.SHA256SUMS"
    whole.write_text("".join(lines))
    assert is_full_release(fer_table(folder, whole), whole)
    partly = tmp_path / "partly.SHA256SUMS"  # one PublicTest image more, not here
    partly.write_text("".join(lines) + "0" * 64 + "  validation/angry/PublicTest_99999.jpg\n")
    assert not is_full_release(fer_table(folder, partly), partly)
    # and the audit of such a copy writes nothing
    import shutil

    from tests.server import REPO
    from training.audit_fer2013 import run_fer_audit

    data = tmp_path / "data"
    shutil.copytree(REPO / "data", data)
    shutil.copy(partly, data / "fer2013.SHA256SUMS")
    report = run_fer_audit(fer_settings.model_copy(update={
        "fer2013_dir": folder, "data_dir": data}), out_dir=tmp_path / "out")
    assert report["complete"] is False and not (tmp_path / "out").exists()


@pytest.mark.dataset
def test_the_checksum_list_in_data_is_the_shared_one(fer_settings):
    # the copy the settings name (EMOTION_FER2013_DIR, or ../shared beside the checkout)
    shared = fer_settings.fer2013_dir / "SHA256SUMS"
    if not shared.is_file() and not os.environ.get("CI"):
        pytest.skip(f"no shared copy at {shared}")
    assert fer_settings.fer2013_checksums.read_bytes() == shared.read_bytes()
    lines = fer_settings.fer2013_checksums.read_text().splitlines()
    assert len(lines) == 35887 and all(parse_original(line.split()[1]) for line in lines)


@pytest.mark.dataset
def test_public_test_is_what_the_release_holds(fer_settings):
    table = fer_table(fer_settings.fer2013_dir, fer_settings.fer2013_checksums)
    public = table[table["usage"] == "PublicTest"]
    counts = public["label"].value_counts().to_dict()
    assert counts == {CLASS_MAP[k]: v for k, v in PUBLIC_TEST.items()}
    assert (public["subset"] == "val").all()


@pytest.mark.dataset
def test_a_command_that_needs_training_says_how_to_get_it(fer_settings):
    table = fer_table(fer_settings.fer2013_dir, fer_settings.fer2013_checksums)
    only_public = table[table["usage"] == "PublicTest"]
    with pytest.raises(SystemExit, match="python -m training fetch fer2013"):
        require_usages(only_public, fer_settings.fer2013_dir, fer_settings.fer2013_checksums)


@pytest.mark.dataset
def test_a_full_run_refuses_part_of_a_usage(fer_settings):
    """Only a usage with no image at all was refused: a copy stopped half-way trained, and
    wrote the manifest's figures, on a fraction of the release."""
    table = fer_table(fer_settings.fer2013_dir, fer_settings.fer2013_checksums)
    require_usages(table, fer_settings.fer2013_dir, fer_settings.fer2013_checksums,
                   ("PublicTest",))  # the whole of PublicTest: passes
    some = table[table["usage"] == "PublicTest"].head(4)
    with pytest.raises(SystemExit, match="PublicTest has 4 of its 3589 images"):
        require_usages(some, fer_settings.fer2013_dir, fer_settings.fer2013_checksums,
                       ("PublicTest",))


@pytest.mark.dataset
def test_face_geometry_says_it_needs_training_before_any_work(fer_settings, tmp_path):
    """With PublicTest alone (CI's copy) it wrote the detector's files into the models folder
    and ran the detector over every identity train image, then died of a KeyError."""
    from training.face_geometry import build_face_crop

    only_public = tmp_path / "fer2013"
    only_public.mkdir()
    (only_public / "validation").symlink_to(fer_settings.fer2013_dir / "validation")
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(SystemExit, match="Training is not in .*python -m training fetch"):
        build_face_crop(fer_settings.model_copy(update={"fer2013_dir": only_public}), models,
                        limit=2, staging=models)
    assert not any(models.iterdir())


@pytest.mark.dataset
def test_fer_cache_matches_serving_on_sampled_images(fer_settings):
    from training.cache import load_decoded_images

    table = fer_table(fer_settings.fer2013_dir, fer_settings.fer2013_checksums)
    public = table[table["usage"] == "PublicTest"].reset_index(drop=True)
    decoded = load_decoded_images(public, fer_settings.fer2013_dir, fer_settings.cache_dir)
    assert decoded.pixels.shape == (len(public), 350, 350)
    for row in np.random.default_rng(0).choice(len(public), 12, replace=False):
        served = preprocess_image((fer_settings.fer2013_dir / public["image"][row]).read_bytes())
        np.testing.assert_array_equal(pixels_to_input(np.asarray(decoded.pixels[row])), served)


@pytest.mark.dataset
def test_the_audit_agrees_with_the_shared_copy(fer_settings):
    """The committed audit (from the full release) and the shared copy agree on PublicTest:
    its counts and its exact duplicates by pixels."""
    from training.audit_fer2013 import exact_duplicate_groups
    from training.fer2013 import pixel_digests

    audit = json.loads((fer_settings.data_dir / "fer2013_audit.json").read_text())
    assert audit["complete"] and audit["present_counts"] == audit["release_counts"]
    table = fer_table(fer_settings.fer2013_dir, fer_settings.fer2013_checksums)
    public = table[table["usage"] == "PublicTest"].reset_index(drop=True)
    counts = public["label"].value_counts().to_dict()
    assert {k: v for k, v in audit["present_counts"]["PublicTest"].items() if v} == counts
    groups = exact_duplicate_groups(public, pixel_digests(fer_settings.fer2013_dir,
                                                          list(public["image"])))
    # Each committed group, seen from PublicTest alone.
    seen = [[n for n in group if n.startswith("validation/")]
            for group in audit["exact_duplicates"]["members"]]
    assert groups == sorted(g for g in seen if len(g) > 1)
    spanning = sum(n for usages, n in audit["exact_duplicates"]["by_usages"].items()
                   if "PublicTest" in usages)
    assert len(groups) == spanning - sum(len(g) == 1 for g in seen)


def test_the_committed_audit_is_what_its_records_write(fer_settings):
    """data/fer2013_audit.md says "do not edit": it and the duplicate groups' summary are
    recomputed from the committed records, labels read from the checksum list's paths (a
    review's mutant counting every group as conflicting passed every test)."""
    from training.audit_fer2013 import render_fer_markdown, summarise_groups

    audit = json.loads((fer_settings.data_dir / "fer2013_audit.json").read_text())
    label_of = {name: parse_original(name)["label"]
                for name in read_checksums(fer_settings.fer2013_checksums)}
    exact = audit["exact_duplicates"]
    summary = summarise_groups(exact["members"], label_of)
    assert summary == {key: exact[key] for key in summary}
    assert 0 < summary["with_conflicting_labels"] < summary["groups"]
    assert render_fer_markdown(audit) == (
        fer_settings.data_dir / "fer2013_audit.md").read_text()


def test_thumbnails_are_the_centre_crops_block_means_at_zero_mean_and_unit_norm():
    """The 24x24 thumbnails leave out the 7-pixel frame that 350 does not divide into (a
    review's mutants without the centring or the mean's removal passed every test)."""
    from types import SimpleNamespace

    from training.audit_fer2013 import THUMBNAIL, thumbnails

    framed = np.zeros((350, 350), np.uint8)
    framed[:7] = framed[-7:] = framed[:, :7] = framed[:, -7:] = 255  # outside the crop
    ramp = np.zeros((350, 350), np.uint8)
    ramp[7:343, 7:343] = (np.arange(336) * 255 // 335).astype(np.uint8)  # left to right
    thumbs = thumbnails(SimpleNamespace(pixels=np.stack([framed, ramp])), np.array([0, 1]))
    assert thumbs.shape == (2, THUMBNAIL * THUMBNAIL) and thumbs.dtype == np.float32
    assert not thumbs[0].any()  # the frame alone: a flat crop, nothing left
    assert abs(thumbs[1].mean()) < 1e-6 and np.linalg.norm(thumbs[1]) == pytest.approx(1)
    columns = thumbs[1].reshape(THUMBNAIL, THUMBNAIL)
    assert (np.diff(columns, axis=1) > 0).all() and (np.diff(columns, axis=0) == 0).all()


@pytest.mark.dataset
def test_audit_refuses_a_damaged_fer2013_image_before_it_writes(fer_settings, tmp_path):
    """A cut image stopped the audit after data/ was rewritten, with Pillow's 'Truncated File
    Read' and no file named; and a partial copy's one changed byte was told as 32,298
    files missing (the data review)."""
    import shutil

    from tests.server import REPO, run_training

    folder = tmp_path / "fer2013"
    public = [n for n in read_checksums(fer_settings.fer2013_checksums)
              if (fer_settings.fer2013_dir / n).is_file()]
    for name in public:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(fer_settings.fer2013_dir / name)
    damaged = folder / public[7]
    damaged.unlink()
    damaged.write_bytes((fer_settings.fer2013_dir / public[7]).read_bytes()[:300])
    data = tmp_path / "data"
    shutil.copytree(REPO / "data", data)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    result = run_training(["audit"], env={"EMOTION_FER2013_DIR": str(folder),
                                          "EMOTION_DATA_DIR": str(data)}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"1 differ from fer2013.SHA256SUMS (e.g. ['{public[7]}'])" in line, line
    assert "missing" not in line
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("copy", ["none", "five of PublicTest"])
def test_verify_fails_on_a_folder_without_fer2013_or_with_a_part_of_a_usage(
        fer_settings, tmp_path, copy):
    """Both passed: '0 files match' and '5 files match', exit 0."""
    from tests.server import run_training
    from training.fetch import read_checksums

    folder = tmp_path / "fer2013"
    folder.mkdir()
    if copy != "none":
        names = [n for n in read_checksums(fer_settings.fer2013_checksums)
                 if (fer_settings.fer2013_dir / n).is_file() and "PublicTest" in n][:5]
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(fer_settings.fer2013_dir / name)
    result = run_training(["verify", "fer2013"], env={"EMOTION_FER2013_DIR": str(folder)})
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    # with the way to get it, as every other command says (it had only "point ... at it")
    assert line.endswith(("no file named in fer2013.SHA256SUMS" if copy == "none" else
                          "PublicTest has 5 of its 3589 images") + "; run `python -m training "
                         "fetch fer2013` and point EMOTION_FER2013_DIR at the folder it prints")


def test_a_checksum_list_naming_a_file_outside_the_release_is_refused(tmp_path):
    """A line for README.md was passed over, so a list of the wrong dataset read as an empty
    release (the data review)."""
    from training.fetch import DataError

    sums = tmp_path / "fer2013.SHA256SUMS"
    sums.write_text(f"{'0' * 64}  README.md\n")
    with pytest.raises(DataError, match="'README.md' is not a FER-2013 release path"):
        fer_table(tmp_path, sums)


def test_near_pairs_within_one_set_are_each_pair_once_and_never_an_image_with_itself():
    from training.audit_fer2013 import near_pairs

    x = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert [(i, j) for i, j, _ in near_pairs(x, x, threshold=0.99, same=True)] == [(0, 1)]
    assert [(i, j) for i, j, _ in near_pairs(x, x, threshold=0.99)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]
