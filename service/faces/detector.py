"""MTCNN on ONNX Runtime: find faces in a grayscale image.

Zhang et al. 2016: a proposal network over an image pyramid, then two networks that refine
and re-score each candidate. The three networks run in ONNX Runtime, already the models'
runtime, from ``models/face_{pnet,rnet,onet}.onnx``, each checked against its SHA-256 before
it is loaded. ``python -m training face-geometry`` exports them from the weights inside the
facenet-pytorch wheel (``training/face_detector.py``). Why this detector:
``benchmarks/FACE_DETECTORS.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from service.faces.spec import FACE_CROP_FILE, STAGES, Box, DetectorConfig
from service.manifest import read_pinned
from service.onnx_runtime import onnx_session

CELL = 12  # the proposal network's window: the smallest face it sees at scale 1


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
            data = read_pinned(models_dir / network.file, network.sha256, FACE_CROP_FILE)
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
