from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.classes import CLASS_NAMES
from service.deps import ServingDep, SettingsDep
from service.errors import ApiError, ErrorBody, status_of
from service.inference import FacesMode, ImagePrediction
from service.preprocessing import ALLOWED_FORMATS, INPUT_SIZE, shown
from service.schemas import FaceBox, Prediction, PredictResponse
from service.uploads import read_uploads

router = APIRouter(prefix="/predict", tags=["predict"])
QUERY_PARAMETERS = frozenset({"model", "faces"})

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
    400: "not an image, corrupt or truncated (`not_an_image`, `corrupt_image`), a "
         "malformed multipart body (`malformed_multipart`), or a body with a protocol "
         "upgrade (`upgrade_not_supported`)",
    408: "the request body stopped arriving (`body_timeout`, EMOTION_BODY_IDLE_SECONDS)",
    413: "too many bytes, pixels or JPEG scans (`too_many_bytes`, `too_many_pixels`, "
         "`too_many_scans`)",
    415: "unsupported content type (`unsupported_media_type`)",
    422: "unknown model, no file, a file field holding text, too many files or other "
         "fields, a query parameter unknown or out of its choices (`unknown_model`, `no_file`, "
         "`not_a_file`, `too_many_files`, `too_many_fields`, `invalid_request`)",
    503: "a model or the face detector is unavailable (`model_unavailable`, "
         "`faces_unavailable`), too many requests are in flight (`overloaded`), or the worker "
         "stopped at its shutdown timeout (`shutting_down`); all with Retry-After",
}.items()}

_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary", "description": "One image."},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Several images, one model call."}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
}}}


def to_response(model: str, sha256: str, results: list[ImagePrediction],
                started: float) -> PredictResponse:
    predictions = []
    for result in results:
        if result.error is not None:
            predictions.append(Prediction(filename=result.name, error=str(result.error),
                                          code=result.error.code))
            continue
        for p in result.predictions:
            face = None if p.face is None else FaceBox(
                x=round(p.face.x), y=round(p.face.y), width=round(p.face.width),
                height=round(p.face.height))
            predictions.append(Prediction(
                filename=result.name, label=p.label, label_id=p.label_id, face=face,
                probabilities={n: float(v) for n, v in zip(CLASS_NAMES, p.probabilities,
                                                           strict=True)},
                faces_found=result.faces_found))
    return PredictResponse(model=model, model_sha256=sha256, predictions=predictions,
                           latency_ms=round((time.perf_counter() - started) * 1000, 3))


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
    # a misspelt name (modle=knn) was ignored, and the default answered as if asked for
    unknown = sorted(set(request.query_params) - QUERY_PARAMETERS)
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown query parameter(s) {shown(unknown)}; "
                       f"/predict takes {' and '.join(sorted(QUERY_PARAMETERS))}")
    name = settings.default_model if model is None else model  # model= empty: unknown, as faces=
    mode = faces or settings.default_faces
    predictor = serving.predictor
    # the model first, as /v2 and the command line: a misspelt name got the detector's 503
    loaded = predictor.model(name)  # PredictorError: a 4xx or 503 with a reason
    predictor.require_faces(mode)
    uploads = await read_uploads(request, settings)
    # Off the event loop, and at most inference_concurrency at once: the rest wait in the
    # executor's queue without holding a thread.
    results = await asyncio.get_running_loop().run_in_executor(
        serving.executor, predictor.predict, name, uploads, mode)
    if len(results) == 1 and results[0].error is not None:
        error = results[0].error
        raise ApiError(status_of(error), error.code, str(error))
    # answered requests only, as /v2 counts them: a refused one image was counted too
    serving.metrics.images_per_request.observe(len(uploads))
    response = to_response(name, loaded.sha256, results, started)
    # pydantic-core writes the JSON in one call; returning the model instead makes FastAPI
    # dump it, validate it again against response_model and encode it with json.dumps.
    return Response(response.model_dump_json(), media_type="application/json")
