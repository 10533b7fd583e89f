"""Typed dependencies: routes get settings, models and metrics from here, never from globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.faces import FaceCropper
from service.models import ModelRegistry
from service.observability import ServiceMetrics
from service.settings import Settings, get_settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_faces(request: Request) -> FaceCropper | None:
    """The face detector, or None where it could not be loaded (see /readyz)."""
    return request.app.state.faces


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
FacesDep = Annotated[FaceCropper | None, Depends(get_faces)]
