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

from starlette.requests import Request

from service.errors import ApiError, ErrorBody, status_of
from service.inference import Predictor
from service.observability import ServiceMetrics
from service.routers.predict import to_response
from service.settings import load_settings
from service.uploads import read_uploads

_state: dict = {}


def _start() -> None:
    settings = load_settings()
    predictor = Predictor.load(settings.models_dir, settings.resolved_onnx_threads,
                               settings.limits, settings.max_faces_per_image, ServiceMetrics())
    _state.update(settings=settings, predictor=predictor,
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
    settings, predictor = _state["settings"], _state["predictor"]
    try:
        uploads = await read_uploads(Request(scope, receive), settings)
    except ApiError as exc:  # a benchmark's request should never get here; say why if it does
        await _send_error(send, exc.status, exc.code, exc.detail)
        return
    results = await asyncio.get_running_loop().run_in_executor(
        _state["executor"], predictor.predict, "cnn", uploads, "none")
    if results[0].error is not None:
        error = results[0].error
        await _send_error(send, status_of(error), error.code, str(error))
        return
    response = to_response("cnn", predictor.model("cnn").sha256, results, started)
    await _send_json(send, 200, response.model_dump_json().encode())
