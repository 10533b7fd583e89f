"""The shape the project keeps: the model work knows nothing of HTTP (that the service
imports nothing of training or torch is tests/test_boundaries.py's)."""

from __future__ import annotations

import subprocess
import sys

from tests.server import REPO


def imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    return set(result.stdout.split())


def test_the_predictor_imports_no_http_layer():
    modules = imported_by("service.inference")
    http = {m for m in modules if m.split(".")[0] in ("fastapi", "starlette", "uvicorn",
                                                      "httpx", "prometheus_client")}
    ours = {m for m in modules if m in ("service.uploads", "service.schemas",
                                        "service.observability", "service.errors",
                                        "service.deps", "service.app", "service.routers")}
    assert not http and not ours, sorted(http | ours)
