"""The shape the project keeps: the model work knows nothing of HTTP, and the service
nothing of training or torch."""

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


def test_the_service_and_the_command_line_import_no_training_and_no_torch():
    for module in ("service.main", "service.cli", "service.batch", "service.video"):
        modules = imported_by(module)
        assert not {m for m in modules if m.split(".")[0] in ("torch", "training",
                                                              "torchvision")}, module
