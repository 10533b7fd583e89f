"""The data workspace: both datasets' subsets, decoded once and pooled once per model stem.

This dataset (``facial_expressions``) comes through the clean table and ``data/splits/``;
FER-2013 through its release layout (``training/fer2013.py``). Both go through the same
preprocessing function and the same decode cache (``training/cache.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from service.classes import CLASS_NAMES
from training.cache import DecodedImages, load_decoded_images
from training.dataset import read_clean_table
from training.fer2013 import FER_FETCH_HINT, fer_table, require_usages
from training.fetch import DataError
from training.models import ModelConfig, make_stem
from training.settings import DATASET_HINT, TrainingSettings
from training.splits import SUBSETS, read_split

SPLIT_NAMES = ("identity", "random")
# FER-2013 has no CONTEMPT: its scores are macro averages over these seven classes.
FER_CLASSES = tuple(i for i, name in enumerate(CLASS_NAMES) if name != "CONTEMPT")
ALL_CLASSES = tuple(range(len(CLASS_NAMES)))
LABEL_ID = {name: i for i, name in enumerate(CLASS_NAMES)}


@dataclass
class Subset:
    names: list[str]
    identities: np.ndarray
    labels: np.ndarray  # int64 class ids

    def __len__(self) -> int:
        return len(self.labels)


def _stratified_sample(frame: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    parts = [group.sample(min(len(group), per_class), random_state=seed)
             for _, group in frame.groupby("label")]
    return pd.concat(parts).sort_values("image")


def read_subsets(settings: TrainingSettings, split_name: str, smoke_per_class: int | None = None,
                 seed: int = 0) -> dict[str, Subset]:
    """The train/val/test subsets of ``data/splits/<split_name>.csv``.

    ``smoke_per_class`` keeps at most that many images per class and subset (a stratified
    sample, for the smoke profile).
    """
    split = read_split(settings.splits_dir / f"{split_name}.csv")
    subsets = {}
    for subset in SUBSETS:
        frame = split[split["split"] == subset]
        if smoke_per_class is not None:
            frame = _stratified_sample(frame, smoke_per_class, seed)
        subsets[subset] = Subset(
            names=list(frame["image"]), identities=frame["identity"].to_numpy(),
            labels=frame["label"].map(LABEL_ID).to_numpy(dtype=np.int64))
    return subsets


def open_cache(settings: TrainingSettings) -> tuple[pd.DataFrame, DecodedImages]:
    table = read_clean_table(settings.clean_table)
    return table, load_decoded_images(table, settings.images_dir, settings.cache_dir,
                                      listed_in=settings.clean_table.name, hint=DATASET_HINT)


def pooled_images(decoded: DecodedImages, names: list[str], config: ModelConfig,
                  chunk: int = 512) -> torch.Tensor:
    """float32 ``[n, 1, r, r]``: the model's stem applied to the contract input."""
    rows = decoded.rows_of(names)
    stem = make_stem(config)
    size = config.resolution
    out = torch.empty((len(rows), 1, size, size), dtype=torch.float32)
    for start in range(0, len(rows), chunk):
        tensor = torch.from_numpy(decoded.inputs(rows[start:start + chunk])).unsqueeze(1)
        with torch.no_grad():
            out[start:start + chunk] = stem(tensor)
    return out


def fer_subsets_from(table: pd.DataFrame, smoke_per_class: int | None = None,
                     seed: int = 0) -> dict[str, Subset]:
    """FER-2013's usages as subsets: Training -> train, PublicTest -> val, PrivateTest -> test.

    In the smoke profile without Training (the shared copy holds PublicTest only), two
    disjoint samples of PublicTest stand in for train and val: the smoke profile checks
    the plumbing, it does not make a model.
    """
    frames = {subset: table[table["subset"] == subset] for subset in SUBSETS}
    if smoke_per_class is not None:
        if frames["train"].empty:
            val = frames["val"]
            train = _stratified_sample(val, smoke_per_class, seed)
            frames["train"] = train
            frames["val"] = val[~val["image"].isin(train["image"])]
        frames = {s: _stratified_sample(f, smoke_per_class, seed) if len(f) else f
                  for s, f in frames.items()}
    return {subset: Subset(names=list(f["image"]), identities=f["image"].to_numpy(),
                           labels=f["label"].map(LABEL_ID).to_numpy(dtype=np.int64))
            for subset, f in frames.items() if len(f)}


class Workspace:
    """Decoded data shared by every run of one command, each piece computed once."""

    def __init__(self, settings: TrainingSettings, profile: str):
        self.profile = profile
        self.settings = settings
        _, self.decoded = open_cache(settings)
        self._fer: tuple[pd.DataFrame, DecodedImages] | None = None
        self._subsets: dict = {}
        self._pooled: dict = {}
        self._features: dict = {}

    @property
    def smoke_per_class(self) -> int | None:
        from training.experiments import SMOKE_PER_CLASS

        return SMOKE_PER_CLASS if self.profile == "smoke" else None

    def subsets(self, split: str) -> dict[str, Subset]:
        """This dataset's subsets of ``split`` (``identity`` or ``random``), or FER-2013's
        usages for ``split="fer2013"``."""
        if split not in self._subsets:
            if split == "fer2013":
                table, _ = self.fer()
                self._subsets[split] = fer_subsets_from(table, self.smoke_per_class)
            else:
                subsets = read_subsets(self.settings, split, self.smoke_per_class)
                self._require_listed(split, subsets)
                self._subsets[split] = subsets
        return self._subsets[split]

    def _require_listed(self, split: str, subsets: dict[str, Subset]) -> None:
        """A split naming images the clean table lacks (the two written by different audits,
        or one cut short) was a KeyError's traceback mid-run (a review)."""
        listed = set(self.decoded.names)
        absent = [name for s in subsets.values() for name in s.names if name not in listed]
        if absent:
            raise DataError(f"{self.settings.splits_dir / split}.csv names {len(absent)} images "
                            f"that {self.settings.clean_table} does not list (e.g. "
                            f"{absent[:3]}); both come from one `python -m training audit`: "
                            "rerun it")

    def fer(self) -> tuple[pd.DataFrame, DecodedImages]:
        """FER-2013's table (the originals present) and its decode cache."""
        if self._fer is None:
            table = fer_table(self.settings.fer2013_dir, self.settings.fer2013_checksums)
            if table.empty:
                raise SystemExit(f"no FER-2013 images in {self.settings.fer2013_dir}: "
                                 + FER_FETCH_HINT)
            self._fer = table, load_decoded_images(
                table, self.settings.fer2013_dir, self.settings.cache_dir,
                listed_in=self.settings.fer2013_checksums.name)
        return self._fer

    def require_fer(self, usages: tuple[str, ...] = ("Training",)) -> None:
        """One line and exit, before any work, when a full run needs a FER-2013 usage that
        only the full release has (the shared copy holds PublicTest alone)."""
        if self.profile != "smoke":
            require_usages(self.fer()[0], self.settings.fer2013_dir,
                           self.settings.fer2013_checksums, usages)

    def decoded_for(self, split: str) -> DecodedImages:
        return self.fer()[1] if split == "fer2013" else self.decoded

    def pooled(self, split: str, config: ModelConfig) -> dict[str, torch.Tensor]:
        key = (split, config.pool, config.pad)
        if key not in self._pooled:
            decoded = self.decoded_for(split)
            self._pooled[key] = {name: pooled_images(decoded, s.names, config)
                                 for name, s in self.subsets(split).items()}
        return self._pooled[key]

    def features(self, split: str) -> dict[str, np.ndarray]:
        from training.knn import downsampled

        if split not in self._features:
            decoded = self.decoded_for(split)
            self._features[split] = {name: downsampled(decoded, s.names)
                                     for name, s in self.subsets(split).items()}
        return self._features[split]

    def inputs(self, split: str, names: list[str]) -> np.ndarray:
        """The contract input (float32 ``[n, 350, 350]``) of these images."""
        decoded = self.decoded_for(split)
        return decoded.inputs(decoded.rows_of(names))
