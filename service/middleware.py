"""Two pure ASGI middlewares: outermost, the request id, metrics and the access log
(:class:`RequestMiddleware`); innermost, admission control, the refusal of a body the server
dropped, and the 500 for a fault (:class:`AdmissionMiddleware`). CORS, when on, sits between
them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect

from service.admission import SCOPE_KEY, BodyBudget
from service.observability import ServiceMetrics

logger = logging.getLogger("service.access")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first
# The methods a metric label may name; any other a client sends is counted as "other".
LABELLED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# On every answer: no content sniffing (answers echo file names), no referrer sent on.
EVERY_ANSWER_HEADERS = ((b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer"))
# Where RequestMiddleware leaves the request id and the route's label for the layers below.
REQUEST_ID_KEY = "emotion.request_id"
ROUTE_KEY = "emotion.route"
# The routes that run models: admission control counts them.
LIMITED_ROUTES = ("/predict", "/v2/models/{name}/infer",
                  "/v2/models/{name}/versions/{version}/infer")


def _template(route: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(route)) + "$")


class RequestMiddleware:
    """The outermost layer: request id, metrics and the access log, for every answer (CORS
    preflights included), whichever layer below wrote it."""

    def __init__(self, app, metrics: ServiceMetrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = {r for r in routes if "{" not in r}
        # Routes with path parameters are labelled by their template, so label sets stay
        # bounded whatever model names clients try.
        self.templates = [(r, _template(r)) for r in sorted(routes) if "{" in r]

    def route_of(self, path: str) -> str:
        if path in self.routes:
            return path
        for route, pattern in self.templates:
            if pattern.match(path):
                return route
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"")
        # visible ASCII only, echoed and logged as sent: UTF-8 was echoed as raw bytes but
        # logged as its Latin-1 reading, so the client's id was not found in the log
        request_id = (incoming[:64].decode("ascii") if incoming and all(
            0x21 <= c <= 0x7E for c in incoming) else uuid.uuid4().hex)
        path = scope.get("path", "")
        route = self.route_of(path)
        method = scope.get("method", "")
        scope = {**scope, REQUEST_ID_KEY: request_id, ROUTE_KEY: route}
        if method == "HEAD":  # as GET without the body (RFC 9110); FastAPI routes GET only
            scope["method"] = "GET"
        status = {"code": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                present = {name.lower() for name, _ in message["headers"]}
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode("latin-1")),
                                      *(h for h in EVERY_ANSWER_HEADERS if h[0] not in present)]
            elif method == "HEAD" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # the client went away mid-upload: nobody to answer, and not the service's
            # fault (it was counted and logged as a 500 with a traceback)
            status["code"] = CLIENT_CLOSED
        except Exception:
            if status.get("started"):
                raise
            # AdmissionMiddleware answers a route's faults; this is for a layer above it
            await answer_internal_error(send_with_id, path, request_id)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, method if method in LABELLED_METHODS
                                         else "other", str(status["code"])).inc()
            self.metrics.request_latency.labels(route).observe(elapsed)
            if logger.isEnabledFor(logging.INFO):
                logger.info(json.dumps({"request_id": request_id, "method": method,
                                        "route": route, "status": status["code"],
                                        "latency_ms": round(elapsed * 1000, 2)}))


class AdmissionMiddleware:
    """The innermost layer: the in-flight bound and body budget of the routes that run
    models, the refusal of a body the server dropped, and the 500 for an unexpected fault.
    Inside CORS, so that a page on another origin can read these answers (a browser shows one
    without CORS headers as a network error, with no Retry-After)."""

    def __init__(self, app, metrics: ServiceMetrics, max_in_flight: int,
                 max_body_bytes_in_flight: int):
        self.app = app
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.body_budget = BodyBudget(max_body_bytes_in_flight,
                                      on_change=metrics.body_bytes_in_flight.inc,
                                      on_refusal=metrics.overloaded.inc)
        self.in_flight = 0  # this worker's predictions in progress, for admission only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if body_dropped_by_upgrade(scope.get("headers") or (), scope.get("method", "")):
            # closed: the parser would read the body's bytes still to come as new requests
            await reject(send, scope.get("path", ""), 400, "upgrade_not_supported",
                         "the service does not switch protocols, and a request that asks to "
                         "(Upgrade: h2c) loses its body on the way in; send it as plain "
                         "HTTP/1.1 (curl: --http1.1)", [(b"connection", b"close")])
            return
        started = {}

        async def send_seen(message):
            if message["type"] == "http.response.start":
                started["yes"] = True
            await send(message)

        # a POST's model work only: a GET /predict is the client's mistake (405), not load
        limited = scope.get(ROUTE_KEY) in LIMITED_ROUTES and scope.get("method") == "POST"
        if limited and self.in_flight >= self.max_in_flight:
            # Answer at once instead of queueing without bound; the client retries.
            self.metrics.overloaded.inc()
            await reject(send, scope.get("path", ""), 503, "overloaded",
                         "too many requests in flight; retry shortly", [(b"retry-after", b"1")])
            return
        ticket = None
        if limited:
            self.in_flight += 1
            self.metrics.in_flight.inc()
            ticket = self.body_budget.ticket()  # the body readers grow it
            scope = {**scope, SCOPE_KEY: ticket}
        try:
            await self.app(scope, receive, send_seen)
        except ClientDisconnect:
            raise  # RequestMiddleware counts it as 499
        except asyncio.CancelledError:
            # uvicorn cancels the requests still in hand past EMOTION_SHUTDOWN_TIMEOUT_SECONDS:
            # the client is told to retry (elsewhere), inside CORS like every answer, and
            # RequestMiddleware counts and logs it. Not raised again: the task ends anyway,
            # and uvicorn would log a traceback and answer a plain-text 500.
            if not started:
                with contextlib.suppress(Exception):
                    await reject(send, scope.get("path", ""), 503, "shutting_down",
                                 "the service is shutting down before this request was "
                                 "answered; send it again", [(b"retry-after", b"1")])
        except Exception:
            if started:
                raise
            # Answered here, not by Starlette's outermost handler, so that the 500 and its
            # log line carry the request id, and CORS headers, like every other answer.
            await answer_internal_error(send, scope.get("path", ""), scope.get(REQUEST_ID_KEY))
        finally:
            if limited:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
                ticket.release()


def body_dropped_by_upgrade(headers, method: str) -> bool:
    """Whether uvicorn's parser (httptools) dropped this request's body: it takes a request
    that asks to switch protocols (``Upgrade`` named in ``Connection``, as ``curl --http2`` and
    Java's HttpClient can send on ``http://``), and every CONNECT, to end at its head, and the
    service would read a declared body as empty (uvicorn#2722). Without a body, such a
    request is served."""
    connection = {token.strip().lower() for name, value in headers if name == b"connection"
                  for token in value.split(b",")}
    upgrade = any(name == b"upgrade" and value.strip() for name, value in headers)
    body = any(name == b"transfer-encoding" or (name == b"content-length"
                                                and value.strip().lstrip(b"0"))
               for name, value in headers)
    return body and (method == "CONNECT" or (b"upgrade" in connection and upgrade))


async def answer_internal_error(send, path: str, request_id: str | None) -> None:
    # %r: a path is the client's, and a decoded newline in it would start a forged log line
    logging.getLogger("service").exception("unhandled error on %r (request %s)", path,
                                           request_id)
    await reject(send, path, 500, "internal_error", "internal error; it has been logged")


async def reject(send, path: str, status: int, code: str, message: str, headers=()) -> None:
    # "error" is the Open Inference Protocol's field, on its paths only (as errors.py adds it)
    fields = {"detail": message, "code": code}
    if path.startswith("/v2"):
        fields["error"] = message
    body = json.dumps(fields).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), *headers,
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
