from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.deps import ServingDep, SettingsDep
from service.errors import ApiError, ErrorBody, status_of
from service.inference import FacesMode, predict_uploads
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

**Faces.** The models were trained on tight face crops. For a photo with a background, use
`faces=auto`: the largest face is found and cropped the way the training images are framed
(the whole image is used when no face is found), and each prediction carries its `face` box
in the upload's pixels. `faces=all` classifies every face found, one prediction each.
`faces=none` classifies the whole image.

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
    503: "a model or the face detector is unavailable (`model_unavailable`, "
         "`faces_unavailable`), or too many requests are in flight (`overloaded`, with "
         "Retry-After)",
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
    serving: ServingDep,
    model: Annotated[str | None, Query(description="`cnn` or `knn`; default from settings.",
                                       examples=["cnn"])] = None,
    faces: Annotated[FacesMode | None, Query(description="`auto`, `all` or `none`; default "
                                             "from settings.", examples=["auto"])] = None,
) -> Response:
    started = time.perf_counter()
    name = model or settings.default_model
    mode = faces or settings.default_faces
    registry, metrics = serving.registry, serving.metrics
    if mode != "none" and serving.faces is None:
        raise ApiError(503, "faces_unavailable", "face detection is not available on this "
                       "server; use faces=none", headers={"Retry-After": "60"})
    if name not in registry.manifest.models:
        raise ApiError(422, "unknown_model", f"unknown model {name!r}; choose from "
                       f"{sorted(registry.manifest.models)}")
    loaded = registry.models.get(name)
    if loaded is None:
        raise ApiError(503, "model_unavailable", f"model {name!r} is not available: it failed "
                       "verification at start-up", headers={"Retry-After": "60"})
    uploads = await read_uploads(request, settings)
    metrics.images_per_request.observe(len(uploads))
    # Off the event loop, and at most inference_concurrency at once: the rest wait in the
    # executor's queue without holding a thread.
    results = await asyncio.get_running_loop().run_in_executor(serving.executor, partial(
        predict_uploads, loaded, uploads, settings.limits, metrics, mode, serving.faces,
        settings.max_faces_per_image))
    if len(results) == 1 and isinstance(results[0], PreprocessingError):
        raise ApiError(status_of(results[0]), results[0].code, str(results[0]))
    predictions = []
    for result, upload in zip(results, uploads, strict=True):
        if isinstance(result, PreprocessingError):
            predictions.append(Prediction(filename=upload.filename, error=str(result),
                                          code=result.code))
        else:
            predictions.extend(result)
    response = PredictResponse(model=name, model_sha256=loaded.sha256, predictions=predictions,
                               latency_ms=round((time.perf_counter() - started) * 1000, 3))
    # pydantic-core writes the JSON in one call; returning the model instead makes FastAPI
    # dump it, validate it again against response_model and encode it with json.dumps.
    return Response(response.model_dump_json(), media_type="application/json")
