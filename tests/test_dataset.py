"""The audit, the clean table and the splits, on the real dataset."""

import json
import shutil

import pandas as pd
import pytest

from service.classes import CLASS_NAMES
from tests.server import REPO, run_training
from training.audit import STUDY_CLASS_COUNTS, run_audit
from training.dataset import identity_from_filename, read_clean_table
from training.fetch import read_checksums, verify_dataset
from training.splits import SUBSETS, read_split

pytestmark = pytest.mark.dataset


@pytest.mark.parametrize(("name", "identity"), [
    ("George_W_Bush_0001.jpg", "georgewbush"),
    ("HrithikRoshan_12.jpg", "hrithikroshan"),
    ("Hrithik_Roshan_0001.jpg", "hrithikroshan"),
    ("Carrie-Anne_Moss_0002.jpg", "carrieannemoss"),
    ("Madonna_0003.jpg", "madonna"),
    ("FaridaJalal_1.jpg", "faridajalal"),
    ("facial-expressions_2868588k.jpg", "facial-expressions"),
    # only the stock photos' "k" names are the one posing model; a name of digits alone
    # keeps them rather than becoming an empty key shared by every such file
    ("facial-expressions_123.jpg", "facialexpressions"),
    ("0001.jpg", "0001"),
])
def test_identity_from_filename(name, identity):
    assert identity_from_filename(name) == identity


@pytest.fixture(scope="module")
def rerun(data_settings, tmp_path_factory):
    """The audit rerun from scratch into a temporary folder."""
    out = tmp_path_factory.mktemp("audit")
    report = run_audit(data_settings, out_dir=out, splits_dir=out / "splits")
    return report, out


def test_dataset_matches_the_pinned_checksums(data_settings):
    assert verify_dataset(data_settings.dataset_dir, data_settings.checksums_file) == len(
        read_checksums(data_settings.checksums_file))


def test_class_counts_equal_the_studys_table(rerun):
    report, _ = rerun
    assert report["legend_rows"] == 13690
    assert report["class_counts"] == STUDY_CLASS_COUNTS
    assert report["class_counts_match_study"] is True


def test_audit_rerun_is_byte_identical_to_the_committed_files(rerun, data_settings):
    _, out = rerun
    for name in ("audit.json", "audit.md", "clean.csv"):
        assert (out / name).read_bytes() == (data_settings.data_dir / name).read_bytes(), name
    for name in ("identity.csv", "random.csv"):
        assert (out / "splits" / name).read_bytes() == (
            data_settings.splits_dir / name).read_bytes(), name


def test_audit_reports_the_known_defects(rerun, data_settings):
    report, _ = rerun
    assert report["duplicate_rows_conflicting"]["count"] == 1
    assert report["format_mismatches"]["images"][0]["format"] == "WEBP"
    assert report["modes"] == {"L": 12758, "RGB": 923}
    assert report["kept_images"] == 13690 - 7 - 2  # agreeing duplicates once, conflict dropped
    audit = json.loads((data_settings.data_dir / "audit.json").read_text())
    assert audit["identities"] == report["identities"]


@pytest.mark.parametrize("split_name", ["identity", "random"])
def test_every_kept_image_is_in_exactly_one_subset(split_name, data_settings):
    table = read_clean_table(data_settings.clean_table)
    split = read_split(data_settings.splits_dir / f"{split_name}.csv")
    assert sorted(split["image"]) == sorted(table["image"])
    assert split["image"].is_unique
    assert set(split["split"]) == set(SUBSETS)
    merged = split.merge(table, on="image", suffixes=("", "_clean"))
    assert (merged["label"] == merged["label_clean"]).all()
    shares = split["split"].value_counts(normalize=True)
    assert 0.65 < shares["train"] < 0.75 and 0.12 < shares["test"] < 0.18


def test_no_identity_crosses_subsets_in_the_identity_split(data_settings):
    split = read_split(data_settings.splits_dir / "identity.csv")
    assert (split.groupby("identity")["split"].nunique() == 1).all()
    # The random split is the study's protocol and does leak people: that is its point.
    random_split = read_split(data_settings.splits_dir / "random.csv")
    assert (random_split.groupby("identity")["split"].nunique() > 1).sum() > 100


def test_every_class_is_in_every_subset(data_settings):
    for name in ("identity", "random"):
        split = read_split(data_settings.splits_dir / f"{name}.csv")
        counts = pd.crosstab(split["label"], split["split"])
        assert set(counts.index) == set(CLASS_NAMES)
        assert (counts[list(SUBSETS)] > 0).all().all(), name


@pytest.mark.parametrize("broken", ["an image missing", "no FER-2013"])
def test_the_audit_refuses_data_that_differs_before_it_rewrites_the_splits(
        data_settings, tmp_path, broken):
    """It rewrote clean.csv and the splits from a copy missing images (and with a changed
    byte, recorded the new checksum), and without FER-2013 stopped in a traceback after
    rewriting them."""
    data = tmp_path / "data"
    shutil.copytree(REPO / "data", data)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    dataset = data_settings.dataset_dir
    env = {"EMOTION_DATA_DIR": str(data), "EMOTION_DATASET_DIR": str(dataset)}
    if broken == "an image missing":
        copy = tmp_path / "dataset"
        (copy / "images").mkdir(parents=True)
        for entry in dataset.iterdir():
            if entry.name != "images":
                (copy / entry.name).symlink_to(entry)
        for image in sorted((dataset / "images").iterdir())[1:]:
            (copy / "images" / image.name).symlink_to(image)
        env["EMOTION_DATASET_DIR"], expected = str(copy), "1 files missing"
    else:
        (tmp_path / "empty").mkdir()
        env["EMOTION_FER2013_DIR"], expected = str(tmp_path / "empty"), "no image in"
    result = run_training(["audit"], env=env, timeout=600)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert expected in line
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_a_split_written_on_a_full_disk_leaves_the_one_before(tmp_path):
    """The audit wrote its tables in place: a full disk cut clean.csv mid-row, and a cut on a
    line end was read later as a table of 5,372 of its 13,681 rows (a review). A file-size
    limit stands in for the full disk."""
    import subprocess
    import sys

    path = tmp_path / "identity.csv"
    shutil.copy(REPO / "data" / "splits" / "identity.csv", path)
    before = path.read_bytes()
    script = """
import resource, sys
from pathlib import Path
from training.splits import read_split, write_split
path = Path(sys.argv[1])
frame = read_split(path)
frame["split"] = "train"  # a new split, as large as the old one
resource.setrlimit(resource.RLIMIT_FSIZE, (len(path.read_bytes()) // 2,) * 2)
write_split(frame, path)
"""
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "File too large" in result.stderr, result.stderr
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_split_naming_images_the_clean_table_lacks_is_one_line(data_settings, tmp_path):
    """A split and a clean table from different audits (or a table cut short) stopped a
    training mid-run with a KeyError's traceback (a review)."""
    from training.data import Workspace
    from training.fetch import DataError

    data = tmp_path / "data"
    shutil.copytree(REPO / "data", data)
    table = pd.read_csv(data / "clean.csv")
    table.head(40).to_csv(data / "clean.csv", index=False, lineterminator="\n")
    settings = data_settings.model_copy(update={"data_dir": data,
                                                "cache_dir": tmp_path / "cache"})
    ws = Workspace(settings, "smoke")  # decodes the 40 images listed
    with pytest.raises(DataError, match=r"identity.csv names \d+ images that .*clean.csv does "
                       r"not list \(e.g. \[.*\]\); both come from one `python -m training "
                       "audit`: rerun it"):
        ws.subsets("identity")
