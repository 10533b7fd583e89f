"""Service settings, from the environment with the prefix ``EMOTION_``."""

from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.origins import browser_origin
from service.preprocessing import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    INPUT_SIZE,
    PILLOW_MAX_PIXELS,
    ImageLimits,
)

REPO_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
REPO_EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def beside_or_here(folder: Path) -> Path:
    """``folder`` beside the package where it is there (a checkout, an editable install),
    else the same name in the working directory: a plain ``pip install`` puts the package
    in site-packages, with no models beside it."""
    return folder if folder.is_dir() else Path.cwd() / folder.name
ModelName = Literal["cnn", "knn"]


def _not_blank(value):
    # An empty variable (`EMOTION_MODELS_DIR=` in an env file, an unset ${MODELS}) meant the
    # working folder: refused, not guessed. (An empty host is the launcher's to refuse:
    # --host overrides it, and the command line never listens.)
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty; unset it for the default")
    return value


FolderPath = Annotated[Path, BeforeValidator(_not_blank)]
# More threads or processes than any machine has: refused here, not by a failure later that
# names no variable (2**31 threads was ONNX Runtime's TypeError at load).
Threads = Annotated[int, Field(ge=0, le=1024)]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``docker run --cpus``, a Kubernetes
    limit), or None when there is none. cgroup v2 first, then v1."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def container_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process can use: its CPU affinity, capped by a cgroup quota, which the
    affinity does not show (a container limited to 2 CPUs on a 64-core host sees 64)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTION_", extra="ignore")

    models_dir: FolderPath = Field(default_factory=lambda: beside_or_here(REPO_MODELS_DIR),
                                   description="manifest.json and the artifacts.")
    # Not beside_or_here: the page serves this folder's photos, so never the working one's.
    examples_dir: FolderPath = Field(REPO_EXAMPLES_DIR, description="The sample photos the "
                                     "page offers (none where the folder is missing).")
    host: str = Field("127.0.0.1", description="Interface python -m service listens on; "
                      "--host overrides it.")
    port: int = Field(8000, ge=1, le=65535, description="Port python -m service listens on; "
                      "--port overrides it. The image's HEALTHCHECK probes this one.")
    default_model: ModelName = Field("cnn", description="Model used when a request names none.")
    default_faces: Literal["auto", "none"] = Field(
        "none", description="faces= when a request names none; measured in models/README.md.")
    max_faces_per_image: int = Field(16, gt=0, description="faces=all classifies at most this "
                                                           "many faces per image, largest first.")
    max_upload_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="Per image.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, le=PILLOW_MAX_PIXELS,
                            description="Per image, from its header; at most Pillow's own "
                            f"limit, {PILLOW_MAX_PIXELS}.")
    max_images_per_request: int = Field(16, gt=0)
    workers: Threads = Field(0, description="uvicorn worker processes (python -m service); "
                             "0: one per container CPU.")
    onnx_threads: Threads = Field(0, description="ONNX Runtime intra-op threads, and the "
                                  "most the kNN's search uses; 0: the container's CPUs "
                                  "divided by workers.")
    inference_concurrency: Threads = Field(0, description="Model calls running at once per "
                                           "worker, the rest wait their turn; 0: the worker's "
                                           "ONNX Runtime threads plus one.")
    max_in_flight: int = Field(32, gt=0, description="Predictions in progress per worker; more "
                                                     "get 503 with Retry-After at once.")
    max_body_bytes_in_flight: int = Field(
        0, ge=0, description="Request-body bytes the model requests in progress may hold at "
        "once per worker (a /v2 body counts inflated); past it, 503 with Retry-After, except "
        "for a request alone. 0: the largest body the limits allow, the /v2 one.")
    body_idle_seconds: float = Field(30.0, gt=0, description="A request body with no byte for "
                                     "this long is answered 408, freeing its in-flight place.")
    body_min_bytes_per_second: float = Field(
        8192.0, ge=0, description="Past EMOTION_BODY_IDLE_SECONDS, a request body arriving "
        "slower than this on average is answered 408 (0: no minimum).")
    drain_seconds: float = Field(1.0, ge=0, description="After SIGTERM: answer 503 on /readyz "
                                 "but keep serving this long, then stop accepting.")
    shutdown_timeout_seconds: float = Field(30.0, gt=0, description="After that: the longest "
                                            "wait for the requests in hand to be answered.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn's and the service's log level (any case).")
    cors_origins: list[Annotated[str, AfterValidator(browser_origin)]] = Field(
        default_factory=list, description="Off when empty.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value):
        return value.lower() if isinstance(value, str) else value

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)

    @property
    def resolved_workers(self) -> int:
        return self.workers or container_cpus()

    @property
    def resolved_onnx_threads(self) -> int:
        if self.onnx_threads:
            return self.onnx_threads
        return max(1, container_cpus() // self.resolved_workers)

    @property
    def resolved_inference_concurrency(self) -> int:
        # One more than the cores: while one call decodes or waits for the GIL, the next
        # can run; many more only thrash the cores (bench_service: p99 at 16 clients fell
        # from about 100 ms to 20 ms against an unbounded threadpool).
        return self.inference_concurrency or self.resolved_onnx_threads + 1

    @property
    def resolved_max_body_bytes_in_flight(self) -> int:
        return self.max_body_bytes_in_flight or max(self.max_body_bytes,
                                                    self.max_oip_body_bytes)

    @property
    def max_body_bytes(self) -> int:
        # Room for every image at its limit plus the multipart framing around them.
        return self.max_images_per_request * self.max_upload_bytes + 64 * 1024

    @property
    def max_oip_body_bytes(self) -> int:
        """The Open Inference Protocol's own encodings: every image at its limit in base64
        (4 bytes per 3) in JSON, or every pixel of the largest batch as a JSON number of up
        to 24 characters, whichever is larger, plus room for the JSON around them."""
        encoded = -(-4 * self.max_images_per_request * self.max_upload_bytes // 3)
        as_numbers = self.max_images_per_request * INPUT_SIZE * INPUT_SIZE * 24
        return max(encoded, as_numbers) + 64 * 1024


class SettingsError(ValueError):
    """An ``EMOTION_*`` variable the settings refuse, said in one line."""


def read_settings(cls: type[BaseSettings], prefix: str = "EMOTION_"):
    """``cls()`` from the environment, with a refused variable as a :class:`SettingsError`
    that names it, its value and why, instead of pydantic's multi-line report."""
    from pydantic_settings.exceptions import SettingsError as SourceError

    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field, *inside = error["loc"]  # inside: an item of a list, as [1]
            name = variable_as_set(f"{prefix}{field}")
            value = os.environ[name] if name in os.environ else error.get("input")
            where = "".join(f"[{part}]" for part in inside)
            problems.append(f"{name}={value!r}: {where + ' ' if where else ''}{error['msg']}")
        raise SettingsError("; ".join(problems)) from None
    except SourceError as exc:  # a list or dict setting whose value is not JSON
        # pydantic-settings names the field and its source only: the variable, as above
        field = re.search(r'field "(\w+)"', str(exc))
        name = variable_as_set(f"{prefix}{field[1]}") if field else f"an {prefix}* variable"
        value = f"={os.environ[name]!r}" if name in os.environ else ""
        raise SettingsError(f"{name}{value}: not JSON; give {prefix}* lists as JSON, e.g. "
                            '\'["https://a.example"]\'') from None


def variable_as_set(variable: str) -> str:
    """The environment variable's name as the user wrote it (names are matched whatever
    their case), or the upper-case name when it is not set."""
    wanted = variable.upper()
    return next((name for name in os.environ if name.upper() == wanted), wanted)


@lru_cache
def load_settings() -> Settings:
    """This process's settings, read from the environment once."""
    return read_settings(Settings)


async def get_settings() -> Settings:
    """The routes' dependency (tests override it through ``create_app(settings)``).

    Async on purpose: FastAPI runs a plain ``def`` dependency in its threadpool, a thread
    round trip per request that cost more than the model's own work here.
    """
    return load_settings()
