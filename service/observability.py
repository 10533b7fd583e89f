"""Prometheus metrics, correct under several uvicorn workers.

Each app owns its metrics in its own registry (no module-level state, so tests can build
many apps). With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client writes every worker's
values to files there and the exposition aggregates all workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TRACE = 5  # uvicorn's TRACE_LOG_LEVEL

# One exposition whatever the worker count: multiprocess mode has no `_created` series.
disable_created_metrics()


def configure_logging(level: str) -> None:
    """Lines of the ``service`` loggers (the JSON access log among them) go to stderr.

    uvicorn configures only its own loggers; without a handler here, INFO lines would be
    dropped. Idempotent, since tests build many apps in one process.
    """
    logger = logging.getLogger("service")
    # uvicorn's "trace" (5) is a level the logging module knows only once uvicorn is imported
    logger.setLevel(TRACE if level.lower() == "trace" else level.upper())
    if not any(getattr(h, "emotion_service", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler.emotion_service = True
        logger.addHandler(handler)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _NoWebSocketAdvice) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_NoWebSocketAdvice())


class _NoWebSocketAdvice(logging.Filter):
    """uvicorn advises installing a WebSocket library at every upgrade request when its
    WebSocket support is off, which the launcher does on purpose (``SERVER_OPTIONS``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No supported WebSocket library")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


PID_MAX_LIMIT = 4 * 1024 * 1024  # Linux's highest possible pid


def forget_dead_workers(directory: str) -> None:
    """Drop the live gauges (in flight) of workers that died without saying so (an OOM kill,
    then uvicorn starts a new one): their last value would otherwise be added up forever.
    Counters and histograms keep their files: what a dead worker counted did happen."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isascii() and pid.isdigit() and not process_alive(int(pid)):
            # another worker's /metrics may have removed it first
            with contextlib.suppress(FileNotFoundError):
                mark_process_dead(int(pid), directory)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a number no process can have is not one (0 and below
    name process groups to kill, and one past a C int was an OverflowError)."""
    if not 0 < pid <= PID_MAX_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("emotion_http_requests", "HTTP requests by route, method and "
                                "status.", ["route", "method", "status"], registry=r)
        self.request_latency = Histogram("emotion_http_request_duration_seconds",
                                         "HTTP request latency.", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram("emotion_inference_duration_seconds",
                                           "Model call latency for one batch.", ["model"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.images_per_request = Histogram("emotion_images_per_request",
                                            "Images in one answered model request (/predict "
                                            "or /v2 infer).",
                                            buckets=IMAGES_BUCKETS, registry=r)
        self.predictions = Counter("emotion_predictions", "Predicted class per model.",
                                   ["model", "label"], registry=r)
        self.top_probability = Histogram("emotion_top_probability",
                                         "Probability of the predicted class (drift watch).",
                                         ["model"], buckets=PROBABILITY_BUCKETS, registry=r)
        self.rejected = Counter("emotion_rejected_inputs",
                                "Images refused one by one, by error code.", ["reason"],
                                registry=r)
        self.in_flight = Gauge("emotion_predictions_in_flight", "Model requests (/predict and "
                               "inference) admitted and not yet answered.", registry=r,
                               multiprocess_mode="livesum")
        self.overloaded = Counter("emotion_overload_rejections",
                                  "Requests answered 503 because too many requests, or too "
                                  "many request bytes, were in flight.", registry=r)
        self.body_bytes_in_flight = Gauge(
            "emotion_request_body_bytes_in_flight", "Request-body bytes the model requests "
            "in progress hold (EMOTION_MAX_BODY_BYTES_IN_FLIGHT bounds it per worker).",
            registry=r, multiprocess_mode="livesum")
        self.faces_found = Counter("emotion_faces_found", "Faces the detector found and "
                                   "cropped in uploads, as they are cropped (faces=all: at most "
                                   "EMOTION_MAX_FACES_PER_IMAGE an image; faces=auto: the one "
                                   "it used).", registry=r)
        self.images_without_face = Counter("emotion_images_without_face",
                                           "Uploads searched for a face where none was found.",
                                           registry=r)
        self.model_info = Gauge("emotion_model_info", "Loaded models (value 1) by sha256.",
                                ["model", "sha256"], registry=r, multiprocess_mode="max")
        self.eval_macro_f1 = Gauge("emotion_model_eval_macro_f1",
                                   "Macro-F1 from the manifest's evaluation.",
                                   ["model", "split", "subset"], registry=r,
                                   multiprocess_mode="max")

    # The predictor's hooks (service.inference.PredictionHooks).
    def on_rejected(self, code: str) -> None:
        self.rejected.labels(code).inc()

    def on_faces(self, cropped: int) -> None:
        if cropped:
            self.faces_found.inc(cropped)
        else:
            self.images_without_face.inc()

    def on_inference(self, model: str, seconds: float) -> None:
        self.inference_latency.labels(model).observe(seconds)

    def on_prediction(self, model: str, label: str, probability: float) -> None:
        self.predictions.labels(model, label).inc()
        self.top_probability.labels(model).observe(probability)

    def exposition_registry(self) -> CollectorRegistry:
        directory = multiprocess_dir()
        if not directory:
            return self.registry
        forget_dead_workers(directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return registry

    def render(self, accept: str) -> tuple[bytes, str]:
        try:
            encoder, content_type = choose_encoder(accept)
        except (TypeError, ValueError):  # e.g. "version=abc": a client's typo, plain text then
            encoder, content_type = choose_encoder("")
        return encoder(self.exposition_registry()), content_type

    def snapshot(self) -> dict:
        """Live counters as JSON: totals summed over label sets (all workers where shared)."""
        wanted = {"emotion_http_requests", "emotion_predictions", "emotion_rejected_inputs",
                  "emotion_overload_rejections", "emotion_faces_found",
                  "emotion_images_without_face"}
        out: dict[str, list] = {}
        for family in self.exposition_registry().collect():
            if family.name not in wanted:
                continue
            rows = [{**sample.labels, "value": sample.value} for sample in family.samples
                    if sample.name.endswith("_total")]
            out[family.name] = rows
        return out


PROMETHEUS_TYPES = ("text/plain", "application/openmetrics-text")


def wants_prometheus(accept: str | None) -> bool:
    """Prometheus and OpenMetrics scrapers name their formats; people and JSON clients don't.
    A client naming both (axios: ``application/json, text/plain, */*``) gets the one it
    ranks higher by q, and the first named on a tie."""
    if not accept:
        return False
    best: dict[str, tuple[float, int]] = {}  # "prometheus" | "json" -> (q, -position)
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip().lower() for p in part.split(";"))
        kind = ("prometheus" if media in PROMETHEUS_TYPES
                else "json" if media == "application/json" else None)
        if kind is None:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 1.0  # a malformed weight counts as the default
        rank = (q, -position)
        if q > 0 and rank > best.get(kind, (0.0, 0)):
            best[kind] = rank
    if "prometheus" not in best:
        return False
    return "json" not in best or best["prometheus"] > best["json"]
