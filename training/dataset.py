"""Reading the legend, cleaning it, and deriving who is in each picture.

The clean table (``data/clean.csv``) is what every experiment reads: one row per kept image
with its class, identity group, contributor and SHA-256. The rules that produce it are
stated here and reported by the audit.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from service.classes import CLASS_NAMES, parse_label
from training.fetch import DataError, read_table, sha256_file

CLEAN_COLUMNS = ["image", "label", "identity", "contributor", "sha256"]

# user.id 628 contributed four stock photos whose names carry no person: they look like one
# model posing a series, so they are kept together as one identity (the leak-safe choice).
_STOCK_NAME = re.compile(r"facial-expressions_\d+k")
_TRAILING_NUMBER = re.compile(r"(?P<name>.+?)_?(?P<number>\d+)")


def identity_from_filename(name: str) -> str:
    """The person an image shows, from its file name.

    ``George_W_Bush_0001.jpg`` -> ``georgewbush``; ``HrithikRoshan_12.jpg`` ->
    ``hrithikroshan`` (the same key as ``Hrithik_Roshan_0001.jpg``: one contributor writes
    names in CamelCase, the others with underscores, so only letters are compared, lowercased);
    ``facial-expressions_2868588k.jpg`` -> ``facial-expressions``.
    """
    stem = os.path.splitext(os.path.basename(name))[0]
    if _STOCK_NAME.fullmatch(stem):
        return "facial-expressions"
    match = _TRAILING_NUMBER.fullmatch(stem)
    base = match.group("name") if match else stem
    key = re.sub(r"[^a-z]", "", base.lower())
    return key or stem.lower()


def read_legend(path: Path) -> pd.DataFrame:
    """The legend as published, plus its line number and the parsed class."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    legend = pd.DataFrame(rows, columns=["user.id", "image", "emotion"])
    legend.insert(0, "line", range(2, len(legend) + 2))
    legend["label"] = [parse_label(text).name for text in legend["emotion"]]
    return legend


@dataclass
class CleanResult:
    table: pd.DataFrame
    duplicate_rows_agreeing: list[dict]
    duplicate_rows_conflicting: list[dict]
    missing_files: list[str]
    identical_file_groups: list[list[str]]


def clean_legend(legend: pd.DataFrame, images_dir: Path) -> CleanResult:
    """Apply the cleaning rules.

    * Labels are case-normalised to the class list.
    * A file named by several rows that agree is kept once (contributor of its first row).
    * A file named by rows that disagree is dropped: its true label is unknown.
    * A row whose file is missing is dropped.
    * Byte-identical files under different names are kept, but their identities are joined
      into one group so that no split can hold a copy of a test image in train.
    """
    agreeing, conflicting, kept_rows = [], [], []
    for image, rows in legend.groupby("image", sort=False):
        labels = sorted(set(rows["label"]))
        record = {"image": image, "lines": rows["line"].tolist(), "labels": labels,
                  "contributors": sorted(set(rows["user.id"]))}
        if len(rows) > 1:
            (agreeing if len(labels) == 1 else conflicting).append(record)
        if len(labels) == 1:
            kept_rows.append(rows.iloc[0])
    kept = pd.DataFrame(kept_rows).reset_index(drop=True)

    missing = [name for name in kept["image"] if not (images_dir / name).is_file()]
    kept = kept[~kept["image"].isin(missing)].reset_index(drop=True)
    kept["sha256"] = [sha256_file(images_dir / name) for name in kept["image"]]
    kept["identity"] = [identity_from_filename(name) for name in kept["image"]]

    identical = [sorted(group["image"]) for _, group in kept.groupby("sha256") if len(group) > 1]
    kept["identity"] = _join_identities(kept, identical)

    table = kept.rename(columns={"user.id": "contributor"})[CLEAN_COLUMNS]
    table = table.sort_values("image", kind="stable").reset_index(drop=True)
    return CleanResult(table, agreeing, conflicting, missing, identical)


def _join_identities(kept: pd.DataFrame, identical: list[list[str]]) -> list[str]:
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    identity_of = dict(zip(kept["image"], kept["identity"], strict=True))
    for names in identical:
        roots = sorted({find(identity_of[name]) for name in names})
        for root in roots[1:]:
            parent[root] = roots[0]
    members: dict[str, set[str]] = defaultdict(set)
    for identity in set(identity_of.values()):
        members[find(identity)].add(identity)
    # A joined group is named by all its members, so the name still says who is in it.
    group_name = {root: "+".join(sorted(names)) for root, names in members.items()}
    return [group_name[find(identity)] for identity in kept["identity"]]


def read_clean_table(path: Path) -> pd.DataFrame:
    table = read_table(path, "the clean table")
    absent = [column for column in CLEAN_COLUMNS if column not in table.columns]
    if absent:
        raise DataError(f"{path}: no column {', '.join(absent)}; `python -m training audit` "
                        "writes the clean table")
    unknown = set(table["label"]) - set(CLASS_NAMES)
    if unknown:
        raise DataError(f"{path}: unknown labels {sorted(unknown)}")
    return table
