"""The Open Inference Protocol v2 (KServe's REST protocol), beside ``/predict``.

Two ways in, per request: ``image``, FP32 ``[N, 1, 350, 350]`` already preprocessed (the
ONNX contract), or ``image_bytes``, BYTES ``[N]`` of encoded images that go through the
shared preprocessing and its limits (in JSON, each element base64). One way out:
``probabilities``, FP32 ``[N, 8]`` in class-list order. JSON and the binary tensor extension
(``Inference-Header-Content-Length``) both work. Errors are ``{"error": ...}``: 400 for a
client's mistake, 404 for an unknown model, 413 for too much, 503 for what the server lacks.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.admission import hold_body
from service.classes import NUM_CLASSES
from service.deps import ServingDep, SettingsDep
from service.errors import ApiError, status_of
from service.inference import (
    FacesUnavailableError,
    ImageInput,
    ModelUnavailableError,
    Predictor,
    PredictorError,
    UnknownModelError,
)
from service.oip import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    TooLargeError,
    decode_content,
    encode_infer_response,
)
from service.oip import parse_infer_request as parse_request
from service.preprocessing import INPUT_SIZE, PreprocessingError, shown
from service.settings import Settings
from service.uploads import read_body

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
SERVER = {"name": "emotion-detection", "version": "0.1.0",
          "extensions": ["binary_tensor_data"]}
OUTPUT = "probabilities"
ModelName = Annotated[str, Path(description="A model of the manifest: `cnn` or `knn`.")]


class ProtocolErrorBody(BaseModel):
    error: str


class ServerReadiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


def _errors(statuses: dict[int, str]) -> dict:
    """OpenAPI ``responses``: the protocol's error body, for each status and its meaning."""
    return {status: {"model": ProtocolErrorBody, "description": text}
            for status, text in statuses.items()}


_UNKNOWN = "no such model, or no such version of it"
_UNAVAILABLE = "the model failed to load (with Retry-After)"
_METADATA_ERRORS = _errors({404: _UNKNOWN, 503: _UNAVAILABLE})
_INFER_ERRORS = _errors({
    400: "a malformed request, a wrong tensor, or an input that is no image",
    404: _UNKNOWN,
    408: "the request body stopped arriving (EMOTION_BODY_IDLE_SECONDS)",
    413: "too many bytes, pixels or images",
    415: "a Content-Encoding other than gzip, deflate or identity (or none given)",
    503: _UNAVAILABLE + ", the face detector is missing, too many requests are in flight, or "
         "the worker stopped at its shutdown timeout",
})


def oip_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def model_version(predictor: Predictor, name: str) -> str:
    return predictor.registry.manifest.models[name].sha256[:12]


def _check_model(predictor: Predictor, name: str, version: str | None) -> JSONResponse | None:
    unavailable = None
    try:
        predictor.model(name)
    except UnknownModelError as exc:
        return oip_error(404, str(exc))
    except ModelUnavailableError as exc:
        unavailable = exc
    # the manifest knows the version of a refused model too: a version that never exists
    # is a 404, not a 503 to retry
    if version is not None and version != model_version(predictor, name):
        return oip_error(404, f"model {name!r} has no version {shown(version)}; it has "
                         f"{model_version(predictor, name)!r}")
    if unavailable is not None:
        return oip_error(503, str(unavailable), {"Retry-After": "60"})
    return None


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return SERVER


@router.get("/health/live", summary="The server is alive")
async def server_live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Every model and the face detector are loaded and the "
            "worker is not draining (200), or not (400, as the protocol says), as /readyz",
            response_model=ServerReadiness,
            responses={400: {"model": ServerReadiness, "description": "not ready"}})
async def server_ready(serving: ServingDep) -> JSONResponse:
    return JSONResponse({"ready": serving.ready}, status_code=200 if serving.ready else 400)


def _metadata(predictor: Predictor, name: str) -> dict:
    entry = predictor.registry.manifest.models[name]
    return {
        "name": name, "versions": [model_version(predictor, name)],
        "platform": "onnxruntime_onnx" if entry.kind == "onnx" else "scikit-learn",
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [-1, 1, INPUT_SIZE, INPUT_SIZE]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}]}


@router.get("/models/{name}", summary="Model metadata", responses=_METADATA_ERRORS)
async def model_metadata(name: ModelName, serving: ServingDep):
    return _check_model(serving.predictor, name, None) or _metadata(serving.predictor, name)


@router.get("/models/{name}/versions/{version}", summary="Model metadata, of one version",
            responses=_METADATA_ERRORS)
async def model_version_metadata(name: ModelName, version: str, serving: ServingDep):
    return (_check_model(serving.predictor, name, version)
            or _metadata(serving.predictor, name))


@router.get("/models/{name}/ready", summary="The model is loaded (200) or not (400 or 404)",
            response_model=ModelReadiness, responses={
                400: {"model": ModelReadiness, "description": "not ready"},
                **_errors({404: _UNKNOWN})})
async def model_ready(name: ModelName, serving: ServingDep) -> JSONResponse:
    return _readiness(serving, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="The model is loaded at this "
            "version (200) or not (400 or 404)", response_model=ModelReadiness, responses={
                400: {"model": ModelReadiness, "description": "not ready"},
                **_errors({404: _UNKNOWN})})
async def model_version_ready(name: ModelName, version: str, serving: ServingDep
                              ) -> JSONResponse:
    return _readiness(serving, name, version)


def _readiness(serving, name: str, version: str | None) -> JSONResponse:
    problem = _check_model(serving.predictor, name, version)
    if problem is not None and problem.status_code == 404:
        return problem
    ready = problem is None and not serving.draining.draining
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)


# what tritonclient and Triton's protocol set themselves; they ask nothing of this server
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "headers", "priority", "timeout",
                                 "sequence_id", "sequence_start", "sequence_end"})
# an input's and an output's own: the binary extension's, and MLServer's codec hint
INPUT_PARAMETERS = frozenset({"binary_data_size", "content_type"})
OUTPUT_PARAMETERS = frozenset({"binary_data", "classification"})
TAKES_FACES = "this server takes 'faces' ('none' or 'auto', with input 'image_bytes')"
FACES_GOES = f"{TAKES_FACES} among the request's parameters, beside 'inputs'"


def _check_parameter_names(request: InferRequest) -> None:
    """A misspelt name ("face"), or 'faces' on an input or an output, would otherwise run
    the default silently, as on /predict: the whole image classified, not the face."""
    unknown = sorted(key for key in request.parameters if key != "faces"
                     and key not in PROTOCOL_PARAMETERS)
    if unknown:
        raise ProtocolError(f"unknown request parameter(s) {shown(unknown)}; {TAKES_FACES}")
    owners = ([("input", t.name, t.parameters, INPUT_PARAMETERS) for t in request.inputs]
              + [("output", o.get("name"), o["parameters"], OUTPUT_PARAMETERS)
                 for o in request.outputs])
    for kind, name, parameters, known in owners:
        if unknown := sorted(set(parameters) - known):
            raise ProtocolError(f"unknown parameter(s) {shown(unknown)} of {kind} "
                                f"{shown(name)}; {FACES_GOES}")


def run_inference(predictor: Predictor, name: str, request: InferRequest,
                  settings: Settings) -> np.ndarray:
    """CPU-bound, on the inference threads: the one input to probabilities ``[N, 8]``."""
    for output in request.outputs:
        if output.get("name") != OUTPUT:
            raise ProtocolError(f"unknown output {shown(output.get('name'))}; the one output is "
                                f"{OUTPUT!r}")
        if "classification" in output["parameters"]:  # Triton's top-k strings: not offered
            raise ProtocolError(f"output {OUTPUT!r}: the classification extension is not "
                                "supported; the output is the probabilities tensor")
    if len(request.inputs) != 1 or request.inputs[0].name not in ("image", "image_bytes"):
        raise ProtocolError("send exactly one input: 'image' (FP32 [N, 1, 350, 350], "
                            "preprocessed) or 'image_bytes' (BYTES [N], encoded images); got "
                            f"{shown([t.name for t in request.inputs])}")
    # an input the codec left unread (value None: more BYTES elements than any request's
    # images) is refused below by its count, its datatype or its shape before it is read
    tensor = request.inputs[0]
    _check_parameter_names(request)
    count = tensor.shape[0] if tensor.shape else 0
    if not 1 <= count <= settings.max_images_per_request:
        error = TooLargeError if count > settings.max_images_per_request else ProtocolError
        raise error(f"input {tensor.name!r}: between 1 and "
                    f"{settings.max_images_per_request} images per request, got "
                    f"shape {tensor.shape}")
    if tensor.name == "image":
        if tensor.datatype != "FP32" or tensor.shape[1:] != [1, INPUT_SIZE, INPUT_SIZE]:
            raise ProtocolError(f"input 'image' is FP32 [N, 1, {INPUT_SIZE}, {INPUT_SIZE}], "
                                f"got {tensor.datatype} {tensor.shape}")
        if request.parameters.get("faces", "none") != "none":  # no face to find in pixels
            raise ProtocolError("parameter 'faces' goes with input 'image_bytes': input "
                                "'image' is already preprocessed, so only 'none' fits it, got "
                                f"{shown(request.parameters['faces'])}")
        images = tensor.value[:, 0]
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ProtocolError("input 'image' must hold finite values in [0, 1], the "
                                "preprocessing's output")
        return predictor.probabilities(name, np.ascontiguousarray(images, dtype=np.float32))
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        raise ProtocolError(f"input 'image_bytes' is BYTES [N], got {tensor.datatype} "
                            f"{tensor.shape}")
    mode = request.parameters.get("faces", settings.default_faces)
    if mode not in ("none", "auto"):
        raise ProtocolError(f"parameter 'faces' is 'none' or 'auto' (one face per image), got "
                            f"{shown(mode)}")
    batch = []
    for i, data in enumerate(tensor.value):
        try:
            batch.append(predictor.preprocess(ImageInput(f"image_bytes[{i}]", data), mode))
        except PreprocessingError as exc:
            raise type(exc)(f"image_bytes[{i}]: {exc}") from None
    return predictor.probabilities(name, np.stack(batch))


async def _infer(request: Request, name: str, version: str | None, settings: Settings,
                 serving) -> Response:
    predictor = serving.predictor
    problem = _check_model(predictor, name, version)
    if problem is not None:
        return problem
    if request.query_params:  # ?faces=auto, as on /predict, was run without finding faces
        return oip_error(400, f"unknown query parameter(s) {shown(sorted(request.query_params))}"
                         f"; {FACES_GOES}")
    try:
        body = await read_body(request, settings.max_oip_body_bytes, settings)
    except ApiError as exc:
        return oip_error(exc.status, exc.detail, exc.headers)
    encoding = request.headers.get("content-encoding")
    header_length = request.headers.get(HEADER_LENGTH)
    loop = asyncio.get_running_loop()

    def work() -> tuple[bytes, dict]:
        # the body and its inflated copy are both held until the parse
        plain = decode_content(body, encoding, settings.max_oip_body_bytes,
                               hold=lambda size: hold_body(request.scope, size))
        # the most values a real request holds: every pixel of the largest batch, as JSON
        parsed = parse_request(plain, header_length, max_values=(
            settings.max_images_per_request * INPUT_SIZE * INPUT_SIZE + 10_000),
            max_images=settings.max_images_per_request)
        probabilities = run_inference(predictor, name, parsed, settings)
        predictor.count_predictions(name, probabilities)
        serving.metrics.images_per_request.observe(len(probabilities))
        return encode_infer_response(name, model_version(predictor, name), parsed,
                                     {OUTPUT: probabilities})

    try:
        content, headers = await loop.run_in_executor(serving.executor, work)
    except ProtocolError as exc:
        return oip_error(exc.status, str(exc))
    except ApiError as exc:  # the body budget's 503
        return oip_error(exc.status, exc.detail, exc.headers)
    except PreprocessingError as exc:
        return oip_error(status_of(exc), str(exc))
    except FacesUnavailableError as exc:
        return oip_error(503, str(exc), {"Retry-After": "60"})
    except PredictorError as exc:
        return oip_error(400, str(exc))
    return Response(content, headers=headers)


@router.post("/models/{name}/infer", summary="Inference, JSON or binary tensors",
             responses=_INFER_ERRORS)
async def infer(name: ModelName, request: Request, settings: SettingsDep,
                serving: ServingDep) -> Response:
    return await _infer(request, name, None, settings, serving)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version",
             responses=_INFER_ERRORS)
async def infer_version(name: ModelName, version: str, request: Request,
                        settings: SettingsDep, serving: ServingDep) -> Response:
    return await _infer(request, name, version, settings, serving)
