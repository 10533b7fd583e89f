"""``models/face_crop.json``: the detector's settings, the learned crop geometry, and boxes.

The file ties the face detector's three ONNX networks (each with its SHA-256) to the
placement of a face inside the training crops, which ``python -m training face-geometry``
learns, and records how ``faces=auto`` compared with ``none``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from service.manifest import FileEntry, SafeFileName, Sha256, read_pinned, sha256_bytes
from service.preprocessing import INPUT_SIZE

FACE_CROP_FILE = "face_crop.json"
STAGES = ("pnet", "rnet", "onet")  # MTCNN's three networks, in the order they run


@dataclass(frozen=True)
class Box:
    """A rectangle in pixels: left, top, width, height."""

    x: float
    y: float
    width: float
    height: float

    @property
    def area(self) -> float:
        return self.width * self.height

    def scaled(self, sx: float, sy: float) -> Box:
        return Box(self.x * sx, self.y * sy, self.width * sx, self.height * sy)

    def iou(self, other: Box) -> float:
        left, top = max(self.x, other.x), max(self.y, other.y)
        right = min(self.x + self.width, other.x + other.width)
        bottom = min(self.y + self.height, other.y + other.height)
        inter = max(0.0, right - left) * max(0.0, bottom - top)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


class NetworkFile(BaseModel):
    file: SafeFileName
    sha256: Sha256


class DetectorConfig(BaseModel):
    networks: dict[str, NetworkFile] = Field(description="MTCNN stage (pnet, rnet, onet) -> "
                                                         "its ONNX file in the models folder")
    thresholds: tuple[float, float, float] = Field(
        (0.6, 0.7, 0.7), description="face probability each stage keeps a candidate at")
    pyramid_factor: float = Field(0.709, gt=0.3, lt=1.0, description="scale step of the "
                                  "image pyramid the proposal network runs over")
    min_size_ratio: float = Field(0.125, gt=0, le=1,
                                  description="smallest face, as a share of the shorter side")
    max_side: int = Field(320, gt=0, description="longer side the image is shrunk to before "
                                                 "the search (the refinement restores detail)")
    refine: bool = Field(True, description="search once more inside the first crop, seen as "
                                           "the training crops are, and average the boxes")

    @field_validator("networks")
    @classmethod
    def _one_per_stage(cls, networks: dict[str, NetworkFile]) -> dict[str, NetworkFile]:
        if set(networks) != set(STAGES):
            raise ValueError(f"networks must name exactly {list(STAGES)}, got {sorted(networks)}")
        return networks


class CropGeometry(BaseModel):
    """Where the detector's face box sits in a training crop, relative to the crop."""

    center_x: float = Field(gt=0, lt=1)
    center_y: float = Field(gt=0, lt=1)
    width: float = Field(gt=0, le=2, description="face box width / crop width")
    height: float = Field(gt=0, le=2, description="face box height / crop height")

    def crop_for(self, face: Box) -> Box:
        """The region around ``face`` that frames it as the training crops do."""
        width, height = face.width / self.width, face.height / self.height
        center_x, center_y = face.x + face.width / 2, face.y + face.height / 2
        return Box(center_x - self.center_x * width, center_y - self.center_y * height,
                   width, height)

    def face_in(self, crop: Box) -> Box:
        """The inverse: where the face should be inside a crop of the training kind."""
        width, height = crop.width * self.width, crop.height * self.height
        return Box(crop.x + self.center_x * crop.width - width / 2,
                   crop.y + self.center_y * crop.height - height / 2, width, height)


class FaceCropSpec(BaseModel):
    """``models/face_crop.json``: the detector's settings, the geometry and how they did."""

    detector: DetectorConfig
    geometry: CropGeometry
    crop_size: int = Field(INPUT_SIZE, description="side of the crops it was learned from")
    learned_from: dict = Field(default_factory=dict)
    evaluation: dict = Field(default_factory=dict)
    code_commit: str = ""
    created_at: str = ""


def load_face_crop(models_dir: Path) -> FaceCropSpec:
    return FaceCropSpec.model_validate(json.loads((models_dir / FACE_CROP_FILE).read_text()))


def face_crop_entry(models_dir: Path) -> FileEntry | None:
    """The manifest's entry for the ``face_crop.json`` in ``models_dir``, if there is one."""
    path = models_dir / FACE_CROP_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    spec = FaceCropSpec.model_validate(json.loads(data))
    return FileEntry(file=FACE_CROP_FILE, sha256=sha256_bytes(data), bytes=len(data),
                     description="the face detector for faces=auto|all: MTCNN's settings, its "
                     "three ONNX networks by SHA-256, and the crop framing learnt on the "
                     "training crops", code_commit=spec.code_commit, created_at=spec.created_at)


def load_verified_face_crop(models_dir: Path, entry: FileEntry | None) -> FaceCropSpec:
    """The file the manifest pins, parsed from the bytes that were checked; ``ValueError``
    names what is wrong (no entry, another file's SHA-256)."""
    if entry is None:
        if (models_dir / FACE_CROP_FILE).exists():
            raise ValueError(f"{FACE_CROP_FILE} is not in manifest.json (no face_detector "
                             "entry pins it; `python -m training face-geometry` writes both): "
                             "refused")
        raise ValueError("this models folder ships no face detector (manifest.json has no "
                         "face_detector entry)")
    data = read_pinned(models_dir / entry.file, entry.sha256, "manifest.json")
    return FaceCropSpec.model_validate(json.loads(data))
