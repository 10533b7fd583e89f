"""Typed dependencies: routes get settings and the loaded state from here, never from globals.

Both are ``async def`` although neither awaits anything: FastAPI calls a plain ``def``
dependency through its threadpool, a thread round trip per request (with four of them,
/predict's body started 319 us after the middleware, against 117 us once they were async).
What the lifespan loads is one :class:`Serving` rather than a dependency per piece: FastAPI
spends its own time on every dependency of every request (measured here: four more async
dependencies cost about 100 us per request with both cores busy).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.drain import DrainState
from service.inference import Predictor
from service.observability import ServiceMetrics
from service.settings import Settings, get_settings


@dataclass(frozen=True)
class Serving:
    """What one worker loaded in its lifespan, read-only afterwards."""

    predictor: Predictor  # the models, the face cropper, the limits: all the model work
    metrics: ServiceMetrics
    # Model calls run on these threads, inference_concurrency of them in this worker.
    executor: ThreadPoolExecutor
    draining: DrainState

    @property
    def ready(self) -> bool:
        """Every model and the face detector loaded, and not draining: one rule for every
        protocol's readiness, since one pod serves them all."""
        return (self.predictor.registry.ready and self.predictor.cropper is not None
                and not self.draining.draining)


async def get_serving(request: Request) -> Serving:
    return request.app.state.serving


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingDep = Annotated[Serving, Depends(get_serving)]
