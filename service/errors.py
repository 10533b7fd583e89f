"""Every error a client can cause: a status, a stable ``code`` and a message to act on."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Match, Mount

from service.inference import (
    FacesUnavailableError,
    ModelUnavailableError,
    PredictorError,
    UnknownModelError,
)
from service.preprocessing import (
    CorruptImageError,
    NotAnImageError,
    PreprocessingError,
    TooManyBytesError,
    TooManyPixelsError,
    TooManyScansError,
    shown,
)

PREPROCESSING_STATUS = {
    NotAnImageError: 400,
    CorruptImageError: 400,
    TooManyBytesError: 413,
    TooManyPixelsError: 413,
    TooManyScansError: 413,
}


class ErrorBody(BaseModel):
    detail: str
    code: str


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


# A model or the detector that failed verification is the server's state, not the client's
# mistake, and may come back after a redeploy: 503 with Retry-After.
PREDICTOR_STATUS = {UnknownModelError: 422, ModelUnavailableError: 503,
                    FacesUnavailableError: 503}


def status_of(error: PreprocessingError) -> int:
    return PREPROCESSING_STATUS.get(type(error), 400)


def predictor_error(error: PredictorError) -> ApiError:
    status = PREDICTOR_STATUS.get(type(error), 400)
    return ApiError(status, error.code, str(error),
                    headers={"Retry-After": "60"} if status == 503 else None)


def error_response(status: int, code: str, detail: str, headers: dict | None = None):
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in the service's error shape (its own is
    plain text: ``Disallowed CORS origin``)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items()
                   if k not in ("content-type", "content-length")}
        return error_response(response.status_code, "cors_refused",
                              f"CORS preflight refused: {response.body.decode()}", headers)


def openapi_without_unsent_422(app: FastAPI) -> dict:
    """The OpenAPI document, less the 422 FastAPI declares on its own for any route with a
    parameter: on a route whose only parameters are path strings, validation cannot fail,
    and this service's 422 is ``ErrorBody``, declared where it can be sent."""
    if app.openapi_schema is None:
        spec = FastAPI.openapi(app)  # FastAPI's own document, which it caches on the app
        for operations in spec["paths"].values():
            for operation in operations.values():
                unsent = operation.get("responses", {}).get("422", {})
                strings_in_path = all(p["in"] == "path" and p["schema"].get("type") == "string"
                                      for p in operation.get("parameters", ()))
                if "HTTPValidationError" in str(unsent) and strings_in_path \
                        and "requestBody" not in operation:
                    del operation["responses"]["422"]
        if "HTTPValidationError" not in str(spec["paths"]):
            schemas = spec.get("components", {}).get("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
    return app.openapi_schema


def _without_its_slash(request: Request) -> str | None:
    """The path less its trailing slash, where a route serves that (slashes are not
    redirected)."""
    path = request.url.path
    if len(path) < 2 or not path.endswith("/"):
        return None
    bare = path.rstrip("/") or "/"
    scope = {"type": "http", "path": bare, "method": request.method}
    # a route that answers this method there; not a mount, which takes any path under it
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    return bare if any(route.matches(scope)[0] == Match.FULL for route in routes) else None


def install_error_handlers(app: FastAPI) -> None:
    app.openapi = lambda: openapi_without_unsent_422(app)

    @app.exception_handler(ApiError)
    async def handle_api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(PredictorError)
    async def handle_predictor_error(request: Request, exc: PredictorError):
        error = predictor_error(exc)
        return error_response(error.status, error.code, error.detail, error.headers)

    @app.exception_handler(PreprocessingError)
    async def handle_preprocessing_error(request: Request, exc: PreprocessingError):
        return error_response(status_of(exc), exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = str(exc.detail)
        if exc.status_code == 404 and (bare := _without_its_slash(request)):
            detail += f"; this service's paths end without a slash: {shown(bare)}"
        body = {"detail": detail, "code": codes.get(exc.status_code, "http_error")}
        if request.url.path.startswith("/v2"):  # the Open Inference Protocol's error field
            body["error"] = body["detail"]
        return JSONResponse(body, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def handle_unexpected(request: Request, exc: Exception):
        # The log has the traceback; the client gets no internals.
        import logging

        logging.getLogger("service").exception("unhandled error on %r", request.url.path)
        return error_response(500, "internal_error", "internal error; it has been logged")
