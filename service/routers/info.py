from __future__ import annotations

from fastapi import APIRouter

from service.classes import CLASS_NAMES
from service.deps import ServingDep, SettingsDep
from service.schemas import ClassInfo, ModelPublic

router = APIRouter(tags=["info"])


@router.get("/classes", response_model=list[ClassInfo], summary="The eight classes, in order")
async def list_classes() -> list[ClassInfo]:
    return [ClassInfo(id=i, name=name) for i, name in enumerate(CLASS_NAMES)]


@router.get("/models", response_model=list[ModelPublic], summary="The shipped models")
async def list_models(serving: ServingDep, settings: SettingsDep) -> list[ModelPublic]:
    registry = serving.predictor.registry
    return [
        ModelPublic(name=name, loaded=name in registry.models,
                    default=name == settings.default_model,
                    test_macro_f1={s: m["test"].macro_f1 for s, m in entry.metrics.items()
                                   if "test" in m},
                    **entry.model_dump(include={
                        "file", "sha256", "bytes", "kind", "description", "input", "output",
                        "classes", "preprocessing_version", "recipe", "data", "code_commit",
                        "created_at", "summary"}))
        for name, entry in registry.manifest.models.items()]
