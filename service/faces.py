"""Find faces in a photo and crop each one the way the training images are cropped.

The training images are tight face crops. A user's photo is a head with shoulders and a
background, so the service first finds the face with MTCNN (Zhang et al. 2016: a proposal
network over an image pyramid, then two networks that refine and re-score each candidate),
then cuts a square around it placed so that the face sits where faces sit in the training
crops. The three networks run in ONNX Runtime, already the models' runtime, from
``models/face_{pnet,rnet,onet}.onnx``, each checked against its SHA-256 before it is loaded.
``python -m training face-geometry`` exports them from the weights inside the
facenet-pytorch wheel (``training/face_detector.py``) and learns the crop placement,
:class:`CropGeometry`, from the training split; ``models/face_crop.json`` records both. Why
this detector: ``benchmarks/FACE_DETECTORS.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, field_validator

from service.manifest import SafeFileName, Sha256, sha256_bytes
from service.models import onnx_session
from service.preprocessing import INPUT_SIZE, RESAMPLE

FACE_CROP_FILE = "face_crop.json"
REFINE_MIN_SIZE_RATIO = 0.5
STAGES = ("pnet", "rnet", "onet")
CELL = 12  # the proposal network's window: the smallest face it sees at scale 1


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


def non_max_suppression(boxes: np.ndarray, threshold: float, method: str = "union"
                        ) -> np.ndarray:
    """Indices of the boxes (rows x1, y1, x2, y2, score) kept, best score first."""
    x1, y1, x2, y2, score = boxes[:, :5].T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = np.argsort(-score, kind="stable"), []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        width = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = width * height
        overlap = inter / (np.minimum(area[i], area[rest]) if method == "min"
                           else area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.array(keep, dtype=int)


def _regress(boxes: np.ndarray, offsets: np.ndarray, plus_one: bool = True) -> np.ndarray:
    extra = 1.0 if plus_one else 0.0
    width = boxes[:, 2] - boxes[:, 0] + extra
    height = boxes[:, 3] - boxes[:, 1] + extra
    out = boxes.copy()
    out[:, :4] += offsets[:, :4] * np.stack([width, height, width, height], axis=1)
    return out


def _square(boxes: np.ndarray) -> np.ndarray:
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    out = boxes.copy()
    out[:, 0] += (width - side) / 2
    out[:, 1] += (height - side) / 2
    out[:, 2:4] = out[:, :2] + side[:, None]
    return out


class FaceDetector:
    """MTCNN on ONNX Runtime, as facenet-pytorch runs it, on one gray channel.

    ONNX Runtime sessions may be used from several threads at once, so one instance serves
    every request of a worker. Each session runs on one thread: the networks are so small
    that a second thread only adds synchronisation (a 640x480 photo took 21 ms on one
    thread, 46 ms on two).
    """

    def __init__(self, config: DetectorConfig, models_dir: Path):
        self.config = config
        self.sessions = {}
        for stage in STAGES:
            network = config.networks[stage]
            data = (models_dir / network.file).read_bytes()
            digest = sha256_bytes(data)
            if digest != network.sha256:
                raise ValueError(f"{network.file} has sha256 {digest[:12]}…, expected "
                                 f"{network.sha256[:12]}…: refused")
            self.sessions[stage] = onnx_session(data, threads=1)

    def _run(self, stage: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offsets, probability = self.sessions[stage].run(None, {"pixels": pixels})
        return offsets, probability

    def detect(self, gray: np.ndarray, min_size_ratio: float | None = None) -> list[Box]:
        """Faces in a uint8 grayscale array, largest first, in its pixel coordinates."""
        height, width = gray.shape
        shrink = min(1.0, self.config.max_side / max(height, width))
        image = Image.fromarray(gray)
        if shrink < 1.0:
            image = image.resize((max(1, round(width * shrink)), max(1, round(height * shrink))),
                                 Image.Resampling.BILINEAR)
        ratio = min_size_ratio or self.config.min_size_ratio
        boxes = self._propose(image, max(CELL, min(image.size) * ratio))
        boxes = self._check(image, boxes, "rnet", 24)
        boxes = self._check(image, boxes, "onet", 48)
        found = [Box(x1, y1, x2 - x1, y2 - y1).scaled(1 / shrink, 1 / shrink)
                 for x1, y1, x2, y2 in boxes[:, :4].tolist()]
        return sorted(found, key=lambda b: b.area, reverse=True)

    def _propose(self, image: Image.Image, min_face: float) -> np.ndarray:
        """Stage 1: the proposal network over a pyramid that starts where a face of
        ``min_face`` pixels fills its 12-pixel window."""
        width, height = image.size
        scale = CELL / min_face
        shorter = min(width, height) * scale
        found = []
        while shorter >= CELL:
            size = (int(width * scale + 1), int(height * scale + 1))
            pixels = np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32)
            offsets, probability = self._run("pnet", pixels[None, None])
            rows, cols = np.nonzero(probability[0] >= self.config.thresholds[0])
            if rows.size:
                # Each output cell is a 12x12 window every 2 pixels of the scaled image.
                boxes = np.column_stack([
                    np.floor((2 * cols + 1) / scale), np.floor((2 * rows + 1) / scale),
                    np.floor((2 * cols + CELL) / scale), np.floor((2 * rows + CELL) / scale),
                    probability[0, rows, cols], offsets[0][:, rows, cols].T])
                found.append(boxes[non_max_suppression(boxes, 0.5)])
            scale *= self.config.pyramid_factor
            shorter *= self.config.pyramid_factor
        if not found:
            return np.zeros((0, 5))
        boxes = np.concatenate(found)
        boxes = boxes[non_max_suppression(boxes, 0.7)]
        return _square(_regress(boxes[:, :5], boxes[:, 5:9], plus_one=False))

    def _check(self, image: Image.Image, boxes: np.ndarray, stage: str, side: int
               ) -> np.ndarray:
        """Stages 2 and 3: re-score each candidate on its own crop and refine its box."""
        if not len(boxes):
            return boxes
        width, height = image.size
        corners = np.trunc(boxes[:, :4]).astype(int)
        x, y = np.maximum(corners[:, 0], 1), np.maximum(corners[:, 1], 1)
        ex, ey = np.minimum(corners[:, 2], width), np.minimum(corners[:, 3], height)
        inside = (ex > x - 1) & (ey > y - 1)
        boxes = boxes[inside]
        if not len(boxes):
            return boxes
        crops = np.stack([np.asarray(image.resize((side, side), Image.Resampling.BOX,
                                                  box=(int(a) - 1, int(b) - 1, int(c), int(d))))
                          for a, b, c, d in zip(x[inside], y[inside], ex[inside], ey[inside],
                                                strict=True)])
        offsets, probability = self._run(stage, crops[:, None].astype(np.float32))
        keep = probability > self.config.thresholds[STAGES.index(stage)]
        boxes = np.column_stack([boxes[keep, :4], probability[keep]])
        offsets = offsets[keep]
        if stage == "rnet":
            picked = non_max_suppression(boxes, 0.7)
            return _square(_regress(boxes[picked], offsets[picked]))
        boxes = _regress(boxes, offsets)
        return boxes[non_max_suppression(boxes, 0.7, method="min")]


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

    def __init__(self, spec: FaceCropSpec, models_dir: Path):
        self.spec = spec
        self.detector = FaceDetector(spec.detector, models_dir)

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
