"""Tensors for one split, read from the decode cache and pooled once by the model's stem."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from service.classes import CLASS_NAMES
from training.cache import DecodedImages, load_decoded_images
from training.dataset import read_clean_table
from training.models import ModelConfig, make_stem
from training.settings import CLEAN_TABLE, SPLITS_DIR, DataSettings
from training.splits import SUBSETS, read_split

SPLIT_NAMES = ("identity", "random")


@dataclass
class Subset:
    names: list[str]
    identities: np.ndarray
    labels: np.ndarray  # int64 class ids

    def __len__(self) -> int:
        return len(self.labels)


def read_subsets(split_name: str, smoke_per_class: int | None = None,
                 seed: int = 0) -> dict[str, Subset]:
    """The train/val/test subsets of ``data/splits/<split_name>.csv``.

    ``smoke_per_class`` keeps at most that many images per class and subset (a stratified
    sample, for the smoke profile).
    """
    split = read_split(SPLITS_DIR / f"{split_name}.csv")
    label_id = {name: i for i, name in enumerate(CLASS_NAMES)}
    subsets = {}
    for subset in SUBSETS:
        frame = split[split["split"] == subset]
        if smoke_per_class is not None:
            parts = [group.sample(min(len(group), smoke_per_class), random_state=seed)
                     for _, group in frame.groupby("label")]
            frame = pd.concat(parts).sort_values("image")
        subsets[subset] = Subset(
            names=list(frame["image"]), identities=frame["identity"].to_numpy(),
            labels=frame["label"].map(label_id).to_numpy(dtype=np.int64))
    return subsets


def open_cache(settings: DataSettings) -> tuple[pd.DataFrame, DecodedImages]:
    table = read_clean_table(CLEAN_TABLE)
    return table, load_decoded_images(table, settings.images_dir, settings.cache_dir)


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
