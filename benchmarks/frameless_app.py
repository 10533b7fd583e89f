"""/predict's own work with no framework: what the 1.3x p50 goal would leave to FastAPI.

A raw ASGI app that does what the service's /predict does for one multipart upload, with
the service's own code: :func:`service.uploads.read_uploads` parses the body, the model
call runs on an executor thread (#6 requires inference off the event loop), and the answer
is a :class:`~service.schemas.PredictResponse` written by pydantic. What it leaves out is
FastAPI and Starlette (routing, dependencies, query validation, exception handling) and the
service's middleware (request id, admission control, metrics, access log).
``bench_service`` times it between the HTTP floor and the service.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from starlette.requests import Request

from service.errors import ApiError, ErrorBody, status_of
from service.inference import predict_uploads
from service.manifest import load_manifest
from service.models import load_models
from service.observability import ServiceMetrics
from service.preprocessing import PreprocessingError
from service.schemas import PredictResponse
from service.settings import load_settings
from service.uploads import read_uploads

_state: dict = {}


def _start() -> None:
    settings = load_settings()
    registry = load_models(load_manifest(settings.models_dir), settings.models_dir,
                           settings.resolved_onnx_threads)
    _state.update(settings=settings, model=registry.models["cnn"], metrics=ServiceMetrics(),
                  executor=ThreadPoolExecutor(settings.resolved_inference_concurrency))


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send, status: int, code: str, detail: str) -> None:
    await _send_json(send, status, ErrorBody(detail=detail, code=code).model_dump_json().encode())


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            _start()
            await send({"type": "lifespan.startup.complete"})
        _state["executor"].shutdown()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] != "POST":  # the readiness probe of tests.server
        await _send_json(send, 200, b'{"status": "ready"}')
        return
    started = time.perf_counter()
    settings, model = _state["settings"], _state["model"]
    try:
        uploads = await read_uploads(Request(scope, receive), settings)
    except ApiError as exc:  # a benchmark's request should never get here; say why if it does
        await _send_error(send, exc.status, exc.code, exc.detail)
        return
    results = await asyncio.get_running_loop().run_in_executor(_state["executor"], partial(
        predict_uploads, model, uploads, settings.limits, _state["metrics"]))
    if isinstance(results[0], PreprocessingError):
        await _send_error(send, status_of(results[0]), results[0].code, str(results[0]))
        return
    response = PredictResponse(model="cnn", model_sha256=model.sha256, predictions=results[0],
                               latency_ms=round((time.perf_counter() - started) * 1000, 3))
    await _send_json(send, 200, response.model_dump_json().encode())
