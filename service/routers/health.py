from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import RegistryDep
from service.schemas import HealthResponse, ReadinessResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
def read_health() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadinessResponse,
            responses={503: {"model": ReadinessResponse, "description": "a model was refused"}},
            summary="Every model in the manifest is loaded and verified")
def read_readiness(registry: RegistryDep):
    models = {name: "ready" for name in registry.models}
    models.update(registry.failures)
    body = ReadinessResponse(ready=registry.ready, models=models)
    return JSONResponse(body.model_dump(), status_code=200 if registry.ready else 503)
