from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.deps import ServingDep
from service.observability import wants_prometheus

router = APIRouter(tags=["metrics"])


# A plain def, so it runs in the threadpool: with several workers, rendering reads every
# worker's metric files.
@router.get("/metrics", summary="Evaluation metrics and live counters (JSON or Prometheus)",
            description="JSON (Accept `application/json`, `*/*` or none): each model's "
                        "evaluation metrics from the manifest and the live counters. "
                        "Prometheus text or OpenMetrics for a scraper that asks for them.")
def read_metrics(request: Request, serving: ServingDep) -> Response:
    registry, metrics = serving.predictor.registry, serving.metrics
    accept = request.headers.get("accept")
    if wants_prometheus(accept):
        body, content_type = metrics.render(accept or "")
        return Response(body, media_type=content_type)
    evaluation = {name: {"sha256": entry.sha256, "summary": entry.summary,
                         "metrics": {split: {subset: m.model_dump() for subset, m in s.items()}
                                     for split, s in entry.metrics.items()}}
                  for name, entry in registry.manifest.models.items()}
    return JSONResponse({"models": evaluation, "live": metrics.snapshot()})
