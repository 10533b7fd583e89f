"""Crop each found face the way the training images are cropped.

The training images are face crops. A user's photo is a head with shoulders and a
background, so the service first finds the face (:class:`FaceDetector`), then cuts a region
around it placed so that the face sits where faces sit in the training crops
(:class:`CropGeometry`, learned by ``python -m training face-geometry``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from service.faces.detector import FaceDetector
from service.faces.spec import Box, FaceCropSpec
from service.preprocessing import RESAMPLE

REFINE_MIN_SIZE_RATIO = 0.5


def crop_region(gray: Image.Image, region: Box) -> Image.Image:
    """``region`` of the image; where it runs past the edges, the edge pixels repeat. Only
    the pixels inside are copied (the whole image as an array was 50 MB per face)."""
    left, top = round(region.x), round(region.y)
    right, bottom = round(region.x + region.width), round(region.y + region.height)
    width, height = gray.size
    if 0 <= left < right <= width and 0 <= top < bottom <= height:
        return gray.crop((left, top, right, bottom))  # inside: no pixel gathered one by one
    rows = np.clip(np.arange(top, bottom), 0, height - 1)  # each row's nearest inside
    columns = np.clip(np.arange(left, right), 0, width - 1)
    if not rows.size or not columns.size:
        return Image.new("L", (columns.size, rows.size))
    inside = np.asarray(gray.crop((int(columns[0]), int(rows[0]),
                                   int(columns[-1]) + 1, int(rows[-1]) + 1)))
    return Image.fromarray(np.ascontiguousarray(
        inside[np.ix_(rows - rows[0], columns - columns[0])]))


class FaceCropper:
    """Detector plus geometry: what the service uses for ``faces=auto|all``."""

    def __init__(self, spec: FaceCropSpec, models_dir: Path):
        self.spec = spec
        self.detector = FaceDetector(spec.detector, models_dir)

    def faces(self, gray: Image.Image) -> list[Box]:
        """The faces, largest first. Every one is refined before the largest are kept:
        refining reorders faces of similar size, so refining only the first few picked other
        faces in a crowd (a review: 4 of 6 grids under auto)."""
        found = self.detector.detect(np.asarray(gray))
        if self.spec.detector.refine:
            found = [self._refined(gray, face) for face in found]
            # refining moves sizes: largest first again, as auto (the first) and all promise
            found.sort(key=lambda face: face.width * face.height, reverse=True)
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
