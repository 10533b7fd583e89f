"""Find faces in a photo and crop each one the way the training images are cropped.

The training images are tight face crops. A user's photo is a head with shoulders and a
background, so the service first finds the face with OpenCV's frontal-face Haar cascade
(its weights ship inside the opencv-python-headless wheel; nothing is downloaded), then cuts
a square around it placed so that the face sits where faces sit in the training crops. That
placement, :class:`CropGeometry`, is learned from the training split by
``python -m training face-geometry`` and shipped as ``models/face_crop.json``. Why this
detector over mediapipe, dlib or MTCNN: ``benchmarks/FACE_DETECTORS.md``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from service.preprocessing import INPUT_SIZE, RESAMPLE

FACE_CROP_FILE = "face_crop.json"
CASCADE_FILE = "haarcascade_frontalface_default.xml"
REFINE_MIN_SIZE_RATIO = 0.5


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


class DetectorConfig(BaseModel):
    cascade: str = CASCADE_FILE
    scale_factor: float = Field(1.1, gt=1.0)
    min_neighbors: int = Field(5, ge=0)
    min_size_ratio: float = Field(0.125, gt=0, le=1,
                                  description="smallest face, as a share of the shorter side")
    max_side: int = Field(320, gt=0, description="longer side the image is shrunk to before "
                                                 "the search (the refinement restores detail)")
    refine: bool = Field(True, description="search once more inside the first crop, seen as "
                                           "the training crops are, and average the boxes")


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


class FaceDetector:
    """The Haar cascade, one instance per thread (OpenCV does not promise that one
    classifier may be used from several threads at once)."""

    def __init__(self, config: DetectorConfig | None = None):
        import cv2

        self.config = config = config or DetectorConfig()
        self._path = str(Path(cv2.data.haarcascades) / config.cascade)
        self._local = threading.local()
        if self._classifier().empty():
            raise RuntimeError(f"cannot load the face cascade {self._path}")

    def _classifier(self):
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            import cv2

            classifier = self._local.classifier = cv2.CascadeClassifier(self._path)
        return classifier

    def detect(self, gray: np.ndarray, min_size_ratio: float | None = None) -> list[Box]:
        """Faces in a uint8 grayscale array, largest first, in its pixel coordinates."""
        height, width = gray.shape
        shrink = min(1.0, self.config.max_side / max(height, width))
        small = gray
        if shrink < 1.0:
            size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
            small = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR))
        ratio = min_size_ratio or self.config.min_size_ratio
        side = max(1, int(min(small.shape) * ratio))
        found = self._classifier().detectMultiScale(
            small, scaleFactor=self.config.scale_factor, minNeighbors=self.config.min_neighbors,
            minSize=(side, side))
        boxes = [Box(*map(float, b)).scaled(1 / shrink, 1 / shrink) for b in found]
        return sorted(boxes, key=lambda b: b.area, reverse=True)


def crop_region(gray: Image.Image, region: Box) -> Image.Image:
    """``region`` of the image; where it runs past the edges, the edge pixels repeat."""
    left, top = round(region.x), round(region.y)
    right, bottom = round(region.x + region.width), round(region.y + region.height)
    pixels = np.asarray(gray)
    height, width = pixels.shape
    pad = ((max(0, -top), max(0, bottom - height)), (max(0, -left), max(0, right - width)))
    if any(p for pair in pad for p in pair):
        pixels = np.pad(pixels, pad, mode="edge")
        left, top = left + pad[1][0], top + pad[0][0]
        right, bottom = right + pad[1][0], bottom + pad[0][0]
    return Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))


class FaceCropper:
    """Detector plus geometry: what the service uses for ``faces=auto|all``."""

    def __init__(self, spec: FaceCropSpec, threads: int | None = None):
        if threads:
            import cv2

            cv2.setNumThreads(threads)  # the worker's share of the CPUs, as ONNX Runtime's
        self.spec = spec
        self.detector = FaceDetector(spec.detector)

    def faces(self, gray: Image.Image) -> list[Box]:
        found = self.detector.detect(np.asarray(gray))
        if self.spec.detector.refine:
            found = [self._refined(gray, face) for face in found]
        return found

    def _refined(self, gray: Image.Image, face: Box) -> Box:
        """Average the box with a second search inside its crop at the training scale.

        The geometry was learned from detections in 350x350 crops; searching again at that
        scale halves the spread of one noisy box, which moves borderline labels less.
        """
        region = self.spec.geometry.crop_for(face)
        crop = crop_region(gray, region)
        size = self.spec.crop_size
        # In a training-like crop the face fills most of it: only large scales are searched.
        again = self.detector.detect(np.asarray(crop.resize((size, size), RESAMPLE)),
                                     min_size_ratio=REFINE_MIN_SIZE_RATIO)
        if not again:
            return face
        second = again[0].scaled(region.width / size, region.height / size)
        second = Box(second.x + region.x, second.y + region.y, second.width, second.height)
        return Box((face.x + second.x) / 2, (face.y + second.y) / 2,
                   (face.width + second.width) / 2, (face.height + second.height) / 2)

    def crop(self, gray: Image.Image, face: Box) -> Image.Image:
        return crop_region(gray, self.spec.geometry.crop_for(face))
