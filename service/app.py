"""``create_app(settings)`` builds the whole service; nothing happens at import time."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.deps import Serving
from service.drain import DrainState, install_sigterm_drain
from service.errors import JsonCORSMiddleware, install_error_handlers
from service.inference import Predictor
from service.manifest import require_default_model
from service.middleware import AdmissionMiddleware, RequestMiddleware
from service.observability import ServiceMetrics, configure_logging
from service.preprocessing import INPUT_SIZE
from service.routers import health, info, metrics, oip, page, predict
from service.settings import Settings, get_settings, load_settings

DESCRIPTION = f"""
Facial-emotion detection. POST a photo to `/predict` and get, for its faces, one of eight
emotions with the probability of each. Images of any common format are converted to
grayscale, and each face (or, with `faces=none`, the whole image) is resized to
{INPUT_SIZE}x{INPUT_SIZE}; the models were trained on face crops of the Emotion Detection
dataset (press photos of public figures) and of FER-2013 (web-search faces).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    service_metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_level)
        # ManifestError: a clear start-up error
        predictor = Predictor.load(settings.models_dir, settings.resolved_onnx_threads,
                                   settings.limits, settings.max_faces_per_image,
                                   service_metrics)
        require_default_model(predictor.registry.manifest, settings.default_model,
                              settings.models_dir)
        registry = predictor.registry
        for name, model in registry.models.items():
            service_metrics.model_info.labels(name, model.sha256).set(1)
            for split, subsets in model.entry.metrics.items():
                for subset, values in subsets.items():
                    service_metrics.eval_macro_f1.labels(name, split, subset).set(values.macro_f1)
        # Model calls run on these threads, at most inference_concurrency at once; the rest
        # queue inside the executor without holding a thread. A plain executor rather than
        # anyio's to_thread with a limiter: about 50 us less per request on this machine.
        executor = ThreadPoolExecutor(settings.resolved_inference_concurrency,
                                      thread_name_prefix="inference")
        drain = DrainState()
        install_sigterm_drain(drain, settings.drain_seconds)
        app.state.serving = Serving(predictor, service_metrics, executor, drain)
        try:
            yield
        finally:
            # uvicorn cancels the requests past its shutdown timeout just before this: they
            # answer and log first (the process ended before they ran again)
            this = asyncio.current_task()
            cut = [t for t in asyncio.all_tasks() if t is not this and t.cancelling()]
            if cut:
                await asyncio.wait(cut, timeout=1.0)
            executor.shutdown(wait=True, cancel_futures=True)

    # /docs and /redoc come from install_page: their assets are served here, not by a CDN.
    app = FastAPI(title="Emotion detection", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  # a 307 to the path without its slash had no error body, and named http://
                  # behind a proxy ending TLS: a client re-sent its photo in the clear
                  redirect_slashes=False)
    if settings is not load_settings():
        async def these_settings() -> Settings:
            return settings

        app.dependency_overrides[get_settings] = these_settings
    routers = (predict.router, oip.router, info.router, health.router, metrics.router)
    for router in routers:
        app.include_router(router)
    page.install_page(app)
    install_error_handlers(app)
    # Innermost: admission control and the 500, so that CORS (next) adds its headers to them.
    app.add_middleware(AdmissionMiddleware, metrics=service_metrics,
                       max_in_flight=settings.max_in_flight,
                       max_body_bytes_in_flight=settings.resolved_max_body_bytes_in_flight)
    if settings.cors_origins:
        # Exposed, so that a page on another origin can read them (browsers hide the rest).
        app.add_middleware(JsonCORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After",
                                           "Inference-Header-Content-Length"])
    # Outermost: request id, metrics and access log for every answer, preflights included.
    # Metric labels use these paths; anything else is "unmatched", so label sets stay bounded.
    routes = {route.path for router in (*routers, page.router) for route in router.routes}
    routes |= {app.openapi_url, "/docs", "/redoc", "/static/{path}", "/docs-assets/{path}"}
    app.add_middleware(RequestMiddleware, metrics=service_metrics, routes=routes)
    return app
