"""The format of ``models/manifest.json``: what each shipped artifact is and how it did."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.classes import CLASS_NAMES
from service.settings import ModelName

MANIFEST_FILE = "manifest.json"


# A bare file name inside the models folder: a manifest cannot point elsewhere.
SafeFileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ManifestError(RuntimeError):
    """The manifest is missing or malformed: the service cannot start."""


# Far past the shipped files (manifest 52 kB; the largest artifact, the kNN, 9.5 MB)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_PINNED_BYTES = 256 * 1024 * 1024


class FileTooLargeError(ValueError):
    def __init__(self, path: Path, size: int, most: int):
        super().__init__(f"{path.name} has {size} bytes, more than the {most} it may have")
        self.size = size


def read_regular_file(path: Path, most: int) -> bytes:
    """``path``'s bytes when it is a regular file of at most ``most`` bytes, told from its
    metadata before a byte is read; else ``ValueError`` (``OSError`` where it cannot be
    opened). A FIFO under a model's name held start-up for ever, and /dev/zero or a stray
    multi-GB file was read whole before its size was checked."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open waits for a writer
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if info.st_size > most:
            raise FileTooLargeError(path, info.st_size, most)
        # its size sizes the read, not most: a manifest's "bytes" of 2**40 was allocated whole;
        # one byte over, a file grown since fails the size or hash that pins it
        return handle.read(info.st_size + 1)


class Strict(BaseModel):
    # json.loads takes NaN and Infinity, which /metrics then failed to send (a 500)
    model_config = ConfigDict(allow_inf_nan=False)


class TensorSpec(Strict):
    name: str
    dtype: str = "float32"
    shape: list[int | str]
    range: tuple[float, float] | None = None


class ClassMetrics(Strict):
    precision: float
    recall: float
    f1: float
    support: int


class EvalMetrics(Strict):
    n: int
    accuracy: float
    macro_f1: float
    macro_f1_six_large_classes: float | None = None
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]


class DatasetProvenance(Strict):
    """One dataset a model was trained or scored on, pinned to its commit and checksums."""

    repository: str
    commit: str
    checksums_sha256: Sha256  # of the checksum list in data/ that pins every image
    legend_sha256: Sha256 | None = None
    split_sha256: dict[str, Sha256] = Field(default_factory=dict)
    used: dict[str, str] = Field(default_factory=dict)  # subset -> what of the dataset it is
    citation: str = ""
    terms: str = ""


class ModelEntry(Strict):
    file: SafeFileName
    sha256: Sha256
    bytes: int
    kind: Literal["onnx", "sklearn"]
    description: str = ""
    input: TensorSpec
    output: TensorSpec
    classes: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    preprocessing_version: str
    recipe: dict
    data: dict[str, DatasetProvenance]  # dataset name -> provenance
    code_commit: str
    created_at: str
    # evaluation set (identity: this dataset's identity split; fer2013) -> subset -> metrics
    metrics: dict[str, dict[str, EvalMetrics]]
    summary: dict = Field(default_factory=dict)


class FileEntry(Strict):
    """A shipped file that is not a model, such as the face detector's ``face_crop.json``
    (which pins its own networks by SHA-256): the manifest pins it in turn."""

    file: SafeFileName
    sha256: Sha256
    bytes: int
    description: str = ""
    code_commit: str = ""
    created_at: str = ""


class Manifest(Strict):
    schema_version: Literal[2] = 2  # another format is refused, not read as this one
    # The names requests and EMOTION_DEFAULT_MODEL take: another was served under any name
    models: dict[ModelName, ModelEntry]
    face_detector: FileEntry | None = None  # absent: faces=none only


# Past any manifest's nesting (the shipped one: 10 levels); past Python's stack it was a
# traceback, and a 900-level list in the free-form summary made /models a 500.
MAX_DEPTH = 32


def _refuse_constant(name: str):
    # json.loads takes NaN and Infinity anywhere, the free-form summary too: /metrics and
    # /models then failed to send them (a 500)
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e999 reads as inf without passing parse_constant: /metrics was a 500 again
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past a float's range")
    return value


def _depth(value) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [item for node in level if isinstance(node, (dict, list))
                 for item in (node.values() if isinstance(node, dict) else node)]
    return depth - 1


def load_manifest(models_dir: Path) -> Manifest:
    path = models_dir / MANIFEST_FILE
    try:
        raw = read_regular_file(path, MAX_MANIFEST_BYTES)
    except OSError as exc:
        raise ManifestError(f"cannot read the model manifest {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ManifestError(f"cannot read the model manifest {path}: {exc}") from None
    try:
        parsed = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
        if _depth(parsed) > MAX_DEPTH:
            raise RecursionError
        manifest = Manifest.model_validate(parsed)
    except ValidationError as exc:  # one line, not pydantic's report with its links
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the top level'}: {e['msg']}"
                             for e in exc.errors())
        raise ManifestError(f"the model manifest {path} is malformed: {problems}") from None
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past Python
        reason = (f"nested deeper than {MAX_DEPTH} levels" if isinstance(exc, RecursionError)
                  else exc)
        raise ManifestError(f"the model manifest {path} is malformed: {reason}") from None
    if not manifest.models:
        raise ManifestError(f"the model manifest {path} lists no models")
    for name, entry in manifest.models.items():
        if entry.classes != list(CLASS_NAMES):
            raise ManifestError(f"the model manifest {path} gives model {name!r} the classes "
                                f"{entry.classes}, the service expects {list(CLASS_NAMES)}")
    return manifest


def require_default_model(manifest: Manifest, default_model: str, models_dir: Path) -> None:
    """A default model the manifest lacks refused every request that names none as the
    client's mistake (422 unknown_model) while the service said it was ready."""
    if default_model not in manifest.models:
        raise ManifestError(f"EMOTION_DEFAULT_MODEL is {default_model!r}, which the model "
                            f"manifest {models_dir / MANIFEST_FILE} does not list (it lists "
                            f"{sorted(manifest.models)})")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_pinned(path: Path, sha256: str, pinned_in: str) -> bytes:
    """The file's bytes if they have the SHA-256 that ``pinned_in`` gives it; else
    ``ValueError`` naming both, before anything parses them."""
    data = read_regular_file(path, MAX_PINNED_BYTES)
    digest = sha256_bytes(data)
    if digest != sha256:
        raise ValueError(f"{path.name} has sha256 {digest[:12]}…, {pinned_in} says "
                         f"{sha256[:12]}…: refused")
    return data
