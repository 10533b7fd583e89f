"""Service settings, from the environment with the prefix ``EMOTION_``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.preprocessing import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits

REPO_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
ModelName = Literal["cnn", "knn"]


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTION_", extra="ignore")

    models_dir: Path = Field(REPO_MODELS_DIR, description="manifest.json and the artifacts.")
    default_model: ModelName = Field("cnn", description="Model used when a request names none.")
    default_faces: Literal["auto", "none"] = Field(
        "none", description="faces= when a request names none; measured in models/README.md.")
    max_faces_per_image: int = Field(16, gt=0, description="faces=all classifies at most this "
                                                           "many faces per image, largest first.")
    max_upload_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="Per image.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Per image, from its header.")
    max_images_per_request: int = Field(16, gt=0)
    workers: int = Field(1, gt=0, description="Worker processes sharing this machine's CPUs; "
                                              "only used to derive onnx_threads.")
    onnx_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0: the "
                                                   "available CPUs divided by workers.")
    max_in_flight: int = Field(32, gt=0, description="Predictions in progress per worker; more "
                                                     "get 503 with Retry-After at once.")
    log_level: str = Field("info")
    cors_origins: list[str] = Field(default_factory=list, description="Off when empty.")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)

    @property
    def resolved_onnx_threads(self) -> int:
        if self.onnx_threads:
            return self.onnx_threads
        return max(1, _available_cpus() // self.workers)

    @property
    def max_body_bytes(self) -> int:
        # Room for every image at its limit plus the multipart framing around them.
        return self.max_images_per_request * self.max_upload_bytes + 64 * 1024


@lru_cache
def load_settings() -> Settings:
    """This process's settings, read from the environment once."""
    return Settings()


async def get_settings() -> Settings:
    """The routes' dependency (tests override it through ``create_app(settings)``).

    Async on purpose: FastAPI runs a plain ``def`` dependency in its threadpool, a thread
    round trip per request that cost more than the model's own work here.
    """
    return load_settings()
