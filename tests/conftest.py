import os

import pytest

from training.settings import DataSettings


@pytest.fixture(scope="session")
def data_settings() -> DataSettings:
    """Settings pointing at the real dataset; CI must have it, elsewhere its absence skips."""
    settings = DataSettings()
    if not settings.legend_path.is_file() or not settings.images_dir.is_dir():
        reason = (f"the dataset is not at {settings.dataset_dir}: set EMOTION_DATASET_DIR or run "
                  "`python -m training fetch`")
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests, but {reason}")
        pytest.skip(reason)
    return settings
