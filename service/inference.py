"""One /predict request: preprocess every image (finding faces if asked), one model call."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np

from service.classes import CLASS_NAMES
from service.faces import Box, FaceCropper
from service.models import LoadedModel
from service.observability import ServiceMetrics
from service.preprocessing import (
    DecodedImage,
    ImageLimits,
    PreprocessingError,
    decode_grayscale,
    pixels_to_input,
    resize_to_input,
)
from service.schemas import FaceBox, Prediction
from service.uploads import Upload

FacesMode = Literal["auto", "all", "none"]


def model_inputs(decoded: DecodedImage, mode: FacesMode, cropper: FaceCropper | None,
                 metrics: ServiceMetrics | None = None, max_faces: int = 16
                 ) -> list[tuple[np.ndarray, Box | None]]:
    """The uint8 350x350 inputs an upload gives, each with its face box (upload pixels).

    ``none``: the whole image. ``auto``: the largest face, else the whole image. ``all``:
    every face up to ``max_faces``, largest first, else the whole image.
    """
    if mode == "none" or cropper is None:
        return [(resize_to_input(decoded.gray), None)]
    faces = cropper.faces(decoded.gray)
    if not faces:
        if metrics:
            metrics.images_without_face.inc()
        return [(resize_to_input(decoded.gray), None)]
    chosen = faces[:1] if mode == "auto" else faces[:max_faces]
    if metrics:
        metrics.faces_found.inc(len(chosen))
    sx, sy = decoded.scale
    return [(resize_to_input(cropper.crop(decoded.gray, face)), face.scaled(sx, sy))
            for face in chosen]


def predict_uploads(model: LoadedModel, uploads: list[Upload], limits: ImageLimits,
                    metrics: ServiceMetrics, mode: FacesMode = "none",
                    cropper: FaceCropper | None = None, max_faces: int = 16
                    ) -> list[list[Prediction] | PreprocessingError]:
    """CPU-bound: runs in the threadpool. Per upload, its predictions (one per face used)
    or its error, in place."""
    results: list[list[Prediction] | PreprocessingError | None] = [None] * len(uploads)
    arrays, owners = [], []  # owners[k]: (upload index, face box) of arrays[k]
    for i, upload in enumerate(uploads):
        try:
            if upload.error is not None:
                raise upload.error
            decoded = decode_grayscale(upload.data, limits)
            for pixels, face in model_inputs(decoded, mode, cropper, metrics, max_faces):
                arrays.append(pixels)
                owners.append((i, face))
            results[i] = []
        except PreprocessingError as exc:
            results[i] = exc
            metrics.rejected.labels(exc.code).inc()
    if arrays:
        started = time.perf_counter()
        probabilities = model.classifier.predict_proba(pixels_to_input(np.stack(arrays)))
        metrics.inference_latency.labels(model.name).observe(time.perf_counter() - started)
        for (i, face), row in zip(owners, probabilities, strict=True):
            label_id = int(np.argmax(row))
            results[i].append(Prediction(
                filename=uploads[i].filename, label=CLASS_NAMES[label_id], label_id=label_id,
                face=None if face is None else FaceBox(
                    x=round(face.x), y=round(face.y), width=round(face.width),
                    height=round(face.height)),
                probabilities={name: float(p) for name, p in zip(CLASS_NAMES, row, strict=True)}))
            metrics.predictions.labels(model.name, CLASS_NAMES[label_id]).inc()
            metrics.top_probability.labels(model.name).observe(float(row[label_id]))
    return results
