"""Train/val/test splits: by identity (the headline) and at random (the study's protocol).

Both are about 70/15/15, stratified by class, and byte-identical for the same seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from service.classes import CLASS_NAMES
from training.fetch import DataError, read_table
from training.files import replace_text

SPLIT_SEED = 20161215  # the pinned upstream commit's date
SUBSETS = ("train", "val", "test")
SPLIT_COLUMNS = ["image", "identity", "label", "split"]


IDENTITY_SPLIT_CANDIDATES = 12


def identity_split(table: pd.DataFrame, seed: int = SPLIT_SEED,
                   candidates: int = IDENTITY_SPLIT_CANDIDATES) -> pd.Series:
    """No identity in two subsets; classes stratified as far as the groups allow.

    A few people hold most of some classes (one identity has half of DISGUST), so a single
    shuffle of the groups can leave a class nearly absent from test. Of ``candidates``
    shuffles (seeds ``seed``, ``seed + 1``, ...) the one whose per-class val and test shares
    are closest to the target wins, every class counting the same.
    """
    options = [_identity_split_once(table, seed + offset) for offset in range(candidates)]
    return min(options, key=lambda split: _imbalance(table, split))


def _imbalance(table: pd.DataFrame, split: pd.Series, subsets=("val", "test")) -> float:
    shares = pd.crosstab(table["label"], split, normalize="index")
    return float(sum((shares.get(subset, 0.0) - 1 / 7).abs().sum() for subset in subsets))


def _identity_split_once(table: pd.DataFrame, seed: int) -> pd.Series:
    split = pd.Series("train", index=table.index)
    # 1/7 of everything for test, then 1/6 of the rest for val: 71/14/14. Of the folds,
    # the one closest to the target shares is held out.
    for subset, folds in (("test", 7), ("val", 6)):
        pool = table[split == "train"]
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        options = []
        for _, held_out in splitter.split(pool, pool["label"], groups=pool["identity"]):
            option = split.copy()
            option[pool.index[held_out]] = subset
            options.append(option)
        split = min(options, key=lambda option, s=subset: _imbalance(table, option, (s,)))
    return _cover_rare_classes(table, split)


def _cover_rare_classes(table: pd.DataFrame, split: pd.Series) -> pd.Series:
    """Move a whole identity from train so val and test see every class that has 3+ groups.

    With 9 CONTEMPT and 21 FEAR images, the folds can leave a class out of test entirely,
    and then its test F1 is undefined. Train keeps at least one group of the class.
    """
    split = split.copy()
    for label in CLASS_NAMES:
        for subset in ("test", "val"):
            has_label = table["label"] == label
            if (has_label & (split == subset)).any():
                continue
            in_train = table[has_label & (split == "train")]
            if in_train["identity"].nunique() < 2:
                continue
            sizes = table[table["identity"].isin(in_train["identity"])].groupby("identity").size()
            smallest = sizes.sort_values(kind="stable").index[0]
            split[table["identity"] == smallest] = subset
    return split


def random_split(table: pd.DataFrame, seed: int = SPLIT_SEED) -> pd.Series:
    """The study's kind of split: stratified by class, blind to who is in the picture."""
    index = np.arange(len(table))
    rest, test = train_test_split(index, test_size=0.15, stratify=table["label"],
                                  random_state=seed)
    train, val = train_test_split(rest, test_size=0.15 / 0.85,
                                  stratify=table["label"].iloc[rest], random_state=seed)
    split = pd.Series("train", index=table.index)
    split.iloc[val] = "val"
    split.iloc[test] = "test"
    return split


def split_frame(table: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    frame = table.assign(split=split)[SPLIT_COLUMNS]
    return frame.sort_values("image", kind="stable").reset_index(drop=True)


def write_split(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, frame.to_csv(index=False, lineterminator="\n"))


def read_split(path: Path) -> pd.DataFrame:
    frame = read_table(path, "a split")
    if list(frame.columns) != SPLIT_COLUMNS:
        raise DataError(f"{path}: columns {list(frame.columns)}, expected {SPLIT_COLUMNS}")
    return frame


def class_counts_by_subset(frame: pd.DataFrame) -> pd.DataFrame:
    counts = pd.crosstab(frame["label"], frame["split"]).reindex(
        index=list(CLASS_NAMES), columns=list(SUBSETS), fill_value=0)
    return counts
