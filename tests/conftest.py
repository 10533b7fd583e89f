import os

import pytest

from training.settings import TrainingSettings


@pytest.fixture(scope="session")
def data_settings() -> TrainingSettings:
    """Settings pointing at the real dataset; CI must have it, elsewhere its absence skips."""
    settings = TrainingSettings()
    if not settings.legend_path.is_file() or not settings.images_dir.is_dir():
        reason = (f"the dataset is not at {settings.dataset_dir}: set EMOTION_DATASET_DIR or run "
                  "`python -m training fetch`")
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests, but {reason}")
        pytest.skip(reason)
    return settings


@pytest.fixture(scope="session")
def fer_settings() -> TrainingSettings:
    """Settings whose FER-2013 folder holds at least PublicTest (the shared copy in CI)."""
    settings = TrainingSettings()
    if not (settings.fer2013_dir / "validation").is_dir():
        reason = (f"FER-2013 is not at {settings.fer2013_dir}: set EMOTION_FER2013_DIR or run "
                  "`python -m training fetch fer2013`")
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests, but {reason}")
        pytest.skip(reason)
    return settings
