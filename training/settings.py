"""Where training finds its data and puts what it makes (environment prefix ``EMOTION_``).

Every path the training commands read or write comes from :class:`TrainingSettings`, so a
run can be pointed elsewhere (a scratch folder, a CI cache) without touching the code.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings import FolderPath, Threads, read_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
# Where `python -m training fetch` puts each dataset by default. The study's dataset goes into
# the checkout's git-ignored .data/; FER-2013 is large and not ours to redistribute, so it goes
# outside the repository.
FETCH_DESTINATIONS = {
    "facial_expressions": REPO_ROOT / ".data" / "facial_expressions",
    "fer2013": Path.home() / ".local" / "share" / "emotion-detection" / "fer2013",
}

UPSTREAM_REPOSITORY = "https://github.com/muxspace/facial_expressions"
UPSTREAM_COMMIT = "5fb9c13afac07c55eae8d25eb6b50af344ad60c9"
# How a command that did not find the study's dataset says to find it.
DATASET_HINT = ("set EMOTION_DATASET_DIR to the study's dataset, or fetch it with "
                "`python -m training fetch`")


def _default_dataset_dir() -> Path:
    # The shared read-only copy beside the checkout wins; elsewhere, what fetch cloned.
    shared = SHARED_DATASETS / "facial_expressions"
    return shared if shared.exists() else FETCH_DESTINATIONS["facial_expressions"]


def _default_fer2013_dir() -> Path:
    # A fetched full release (all three usages) wins over the shared copy, which holds only
    # PublicTest: enough for evaluation and CI, not for training.
    fetched, shared = FETCH_DESTINATIONS["fer2013"], SHARED_DATASETS / "fer2013"
    if (fetched / "train").is_dir() or not shared.exists():
        return fetched
    return shared


class TrainingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTION_", extra="ignore")

    dataset_dir: FolderPath = Field(
        default_factory=_default_dataset_dir,
        description="The study's dataset in the upstream layout (data/legend.csv, images/).",
    )
    fer2013_dir: FolderPath = Field(
        default_factory=_default_fer2013_dir,
        description="FER-2013 in the release's image-folder layout (train/, validation/, "
        "test/); the shared copy holds validation/ only.",
    )
    cache_dir: FolderPath = Field(
        default=Path.home() / ".cache" / "emotion-detection",
        description="Decode cache and downloaded wheels, outside the repository; the cache is "
        "rebuilt when the data or the preprocessing change.",
    )
    data_dir: FolderPath = Field(REPO_ROOT / "data", description="The repository's data/: "
                                 "audit, clean table, splits, checksum lists.")
    models_dir: FolderPath = Field(REPO_ROOT / "models", description="The shipped artifacts.")
    reports_dir: FolderPath = Field(REPO_ROOT / "reports",
                                    description="Reports of experiments.")
    checkpoints_dir: FolderPath = Field(REPO_ROOT / "checkpoints",
                                        description="Training checkpoints (train writes, "
                                        "export reads).")
    torch_threads: Threads = Field(0, description="torch threads for training; 0: every "
                                   "CPU. Lets runs share the cores without oversubscribing "
                                   "them.")

    @property
    def legend_path(self) -> Path:
        return self.dataset_dir / "data" / "legend.csv"

    @property
    def images_dir(self) -> Path:
        return self.dataset_dir / "images"

    @property
    def clean_table(self) -> Path:
        return self.data_dir / "clean.csv"

    @property
    def splits_dir(self) -> Path:
        return self.data_dir / "splits"

    @property
    def checksums_file(self) -> Path:
        return self.data_dir / "SHA256SUMS"

    @property
    def fer2013_checksums(self) -> Path:
        return self.data_dir / "fer2013.SHA256SUMS"

    @property
    def pretrained_dir(self) -> Path:
        return self.cache_dir / "pretrained"

    def smoke_dir(self, command: str) -> Path:
        """Where ``command --profile smoke`` writes by default: apart from the full runs'
        results, checkpoints and shipped models, which a smoke run must never replace."""
        return self.checkpoints_dir / f"{command}-smoke"


@lru_cache
def get_training_settings() -> TrainingSettings:
    return read_settings(TrainingSettings)
