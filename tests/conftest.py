import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir

from training.settings import TrainingSettings

# Nothing of hypothesis's in the checkout (it wrote .hypothesis/ there), and no example
# database, which replays earlier runs' failures, so that one run's result depended on the last.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "emotion-detection-hypothesis")
hypothesis_settings.register_profile("project", database=None)
hypothesis_settings.load_profile("project")

# The test servers are on loopback: an HTTP_PROXY from the runner's environment sent every
# readiness probe to the proxy, and each server test failed after 90 s (a review). Children
# (servers, emotion-detect) inherit it.
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, (os.environ.get(_name), "127.0.0.1,localhost,::1")))


def _require(present: bool, reason: str) -> None:
    """CI must have the real data; elsewhere its absence skips."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests, but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def data_settings() -> TrainingSettings:
    """Settings pointing at the study's real dataset."""
    settings = TrainingSettings()
    _require(settings.legend_path.is_file() and settings.images_dir.is_dir(),
             f"the dataset is not at {settings.dataset_dir}: set EMOTION_DATASET_DIR or run "
             "`python -m training fetch`")
    return settings


@pytest.fixture(scope="session")
def fer_settings() -> TrainingSettings:
    """Settings whose FER-2013 folder holds at least PublicTest (the shared copy in CI)."""
    settings = TrainingSettings()
    _require((settings.fer2013_dir / "validation").is_dir(),
             f"FER-2013 is not at {settings.fer2013_dir}: set EMOTION_FER2013_DIR or run "
             "`python -m training fetch fer2013`")
    return settings
