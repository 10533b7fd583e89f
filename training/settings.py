"""Where training finds the dataset and keeps its decode cache (environment prefix ``EMOTION_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "facial_expressions"
FETCHED_DATASET = REPO_ROOT / ".data" / "facial_expressions"

UPSTREAM_REPOSITORY = "https://github.com/muxspace/facial_expressions"
UPSTREAM_COMMIT = "5fb9c13afac07c55eae8d25eb6b50af344ad60c9"

DATA_DIR = REPO_ROOT / "data"
CHECKSUMS_FILE = DATA_DIR / "SHA256SUMS"
CLEAN_TABLE = DATA_DIR / "clean.csv"
SPLITS_DIR = DATA_DIR / "splits"
REPORTS_DIR = REPO_ROOT / "reports"
MODELS_DIR = REPO_ROOT / "models"


def _default_dataset_dir() -> Path:
    # The shared read-only copy beside the checkout wins; elsewhere `python -m training fetch`
    # clones upstream into .data/ inside the checkout (git-ignored).
    return SHARED_DATASET if SHARED_DATASET.exists() else FETCHED_DATASET


class DataSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTION_", extra="ignore")

    dataset_dir: Path = Field(
        default_factory=_default_dataset_dir,
        description="Dataset folder in the upstream layout (data/legend.csv, images/).",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "emotion-detection",
        description="Decode cache, outside the repository; rebuilt when the data or the "
        "preprocessing change.",
    )

    @property
    def legend_path(self) -> Path:
        return self.dataset_dir / "data" / "legend.csv"

    @property
    def images_dir(self) -> Path:
        return self.dataset_dir / "images"


@lru_cache
def get_data_settings() -> DataSettings:
    return DataSettings()
