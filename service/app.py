"""``create_app(settings)`` builds the whole service; nothing happens at import time."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from PIL import Image

from service.deps import Serving
from service.errors import install_error_handlers
from service.faces import FaceCropper, load_face_crop
from service.manifest import load_manifest
from service.middleware import RequestMiddleware
from service.models import load_models
from service.observability import ServiceMetrics, configure_logging
from service.preprocessing import INPUT_SIZE
from service.routers import health, info, metrics, predict
from service.settings import Settings, get_settings, load_settings

DESCRIPTION = f"""
Facial-emotion detection. POST a face crop to `/predict` and get one of eight emotions with
the probability of each. Images of any common format are converted to grayscale and resized
to {INPUT_SIZE}x{INPUT_SIZE}; the models were trained on tight face crops of celebrities and
actors, so they are meant for such crops.
"""


def load_face_cropper(models_dir) -> tuple[FaceCropper | None, str | None]:
    """The detector and crop geometry, or None and why: faces=none still serves without."""
    try:
        cropper = FaceCropper(load_face_crop(models_dir), models_dir)
        cropper.faces(Image.new("L", (INPUT_SIZE, INPUT_SIZE)))  # warm up
    except Exception as exc:  # a missing or broken file must not stop the models serving
        reason = f"face detection refused: {type(exc).__name__}: {exc}"
        logging.getLogger("service").error(reason)
        return None, reason
    return cropper, None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    service_metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_level)
        manifest = load_manifest(settings.models_dir)  # ManifestError: a clear start-up error
        registry = load_models(manifest, settings.models_dir, settings.resolved_onnx_threads)
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
        faces, faces_error = load_face_cropper(settings.models_dir)
        app.state.serving = Serving(registry, service_metrics, executor, faces, faces_error)
        try:
            yield
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="Emotion detection", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    if settings is not load_settings():
        async def these_settings() -> Settings:
            return settings

        app.dependency_overrides[get_settings] = these_settings
    routers = (predict.router, info.router, health.router, metrics.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    # Metric labels use these paths; anything else is "unmatched", so label sets stay bounded.
    routes = {route.path for router in routers for route in router.routes}
    routes |= {app.openapi_url, app.docs_url, app.redoc_url}
    app.add_middleware(RequestMiddleware, metrics=service_metrics,
                       max_in_flight=settings.max_in_flight, routes=routes)
    return app
