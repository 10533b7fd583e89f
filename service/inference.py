"""One /predict request: preprocess every image, one model call for the batch."""

from __future__ import annotations

import time

import numpy as np

from service.classes import CLASS_NAMES
from service.models import LoadedModel
from service.observability import ServiceMetrics
from service.preprocessing import ImageLimits, PreprocessingError, preprocess_image
from service.schemas import Prediction
from service.uploads import Upload


def predict_uploads(model: LoadedModel, uploads: list[Upload], limits: ImageLimits,
                    metrics: ServiceMetrics) -> list[Prediction | PreprocessingError]:
    """CPU-bound: runs in the threadpool. Bad images come back as their error, in place."""
    results: list[Prediction | PreprocessingError | None] = [None] * len(uploads)
    arrays, positions = [], []
    for i, upload in enumerate(uploads):
        try:
            if upload.error is not None:
                raise upload.error
            arrays.append(preprocess_image(upload.data, limits))
            positions.append(i)
        except PreprocessingError as exc:
            results[i] = exc
            metrics.rejected.labels(exc.code).inc()
    if arrays:
        started = time.perf_counter()
        probabilities = model.classifier.predict_proba(np.stack(arrays))
        metrics.inference_latency.labels(model.name).observe(time.perf_counter() - started)
        for i, row in zip(positions, probabilities, strict=True):
            label_id = int(np.argmax(row))
            results[i] = Prediction(
                filename=uploads[i].filename, label=CLASS_NAMES[label_id], label_id=label_id,
                probabilities={name: float(p) for name, p in zip(CLASS_NAMES, row, strict=True)})
            metrics.predictions.labels(model.name, CLASS_NAMES[label_id]).inc()
            metrics.top_probability.labels(model.name).observe(float(row[label_id]))
    return results
