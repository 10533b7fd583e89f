from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.deps import MetricsDep, RegistryDep, SettingsDep
from service.errors import ApiError, ErrorBody, status_of
from service.inference import predict_uploads
from service.preprocessing import ALLOWED_FORMATS, INPUT_SIZE, PreprocessingError
from service.schemas import Prediction, PredictResponse
from service.uploads import read_uploads

router = APIRouter(prefix="/predict", tags=["predict"])

DESCRIPTION = f"""
Classify face images into one of eight emotions.

**Input contract.** A face crop like the training images (a tight crop of one face, as in the
Emotion Detection dataset), in any common format ({", ".join(ALLOWED_FORMATS)}). Every image
is converted to grayscale and resized to {INPUT_SIZE}x{INPUT_SIZE}, whatever its size.

Send either `multipart/form-data` with one `file` field or several `files` fields (up to the
configured limit), or the image itself as the body with an `image/*` content type.

A batch is one model call. A bad image in a batch gets its own entry with `error` and `code`
while the others are predicted; a request with a single image that is bad gets a 4xx.
"""

_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in {
    400: "not an image, corrupt or truncated (`not_an_image`, `corrupt_image`), or a "
         "malformed multipart body",
    413: "too many bytes or pixels (`too_many_bytes`, `too_many_pixels`)",
    415: "unsupported content type (`unsupported_media_type`)",
    422: "unknown model, no file, a file field holding text, too many files (`unknown_model`, "
         "`no_file`, `not_a_file`, `too_many_files`)",
    503: "a model is unavailable, or too many requests are in flight (with Retry-After)",
}.items()}

_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary", "description": "One image."},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Several images, one model call."}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
}}}


@router.post("", response_model=PredictResponse, responses=_ERRORS, summary="Predict emotions",
             description=DESCRIPTION, openapi_extra=_REQUEST_BODY)
async def predict_emotions(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
    model: str | None = Query(None, description="`cnn` or `knn`; default from settings.",
                              examples=["cnn"]),
) -> PredictResponse:
    started = time.perf_counter()
    name = model or settings.default_model
    if name not in registry.manifest.models:
        raise ApiError(422, "unknown_model", f"unknown model {name!r}; choose from "
                       f"{sorted(registry.manifest.models)}")
    loaded = registry.models.get(name)
    if loaded is None:
        raise ApiError(503, "model_unavailable", f"model {name!r} is not available: it failed "
                       "verification at start-up", headers={"Retry-After": "60"})
    uploads = await read_uploads(request, settings)
    metrics.images_per_request.observe(len(uploads))
    results = await run_in_threadpool(predict_uploads, loaded, uploads, settings.limits, metrics)
    if len(results) == 1 and isinstance(results[0], PreprocessingError):
        raise ApiError(status_of(results[0]), results[0].code, str(results[0]))
    predictions = [
        r if isinstance(r, Prediction) else
        Prediction(filename=u.filename, error=str(r), code=r.code)
        for r, u in zip(results, uploads, strict=True)]
    return PredictResponse(model=name, model_sha256=loaded.sha256, predictions=predictions,
                           latency_ms=round((time.perf_counter() - started) * 1000, 3))
