"""Assertions and fixtures shared by the HTTP tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from service.settings import REPO_MODELS_DIR

# Nothing a client sees may reveal internals: tracebacks, source paths, the install.
LEAKS = ("Traceback", 'File "', str(REPO_MODELS_DIR.parent), "site-packages")


def assert_error(response, status: int, code: str) -> None:
    """A JSON error body with this status and stable ``code``, a message, and no internals."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["detail"]
    # README: {"detail", "code"}; the Open Inference Protocol's "error" on its paths only
    oip = response.request.url.path.startswith("/v2")
    assert set(body) == {"detail", "code", *(["error"] if oip else [])}, body
    if status == 503:  # every 503 says when to come back (README)
        assert int(response.headers["retry-after"]) > 0
    for leak in LEAKS:
        assert leak not in response.text


def models_copy(tmp_path: Path) -> Path:
    """A copy of the shipped models folder, ``tmp_path / "models"``, for a test to change."""
    folder = tmp_path / "models"
    shutil.copytree(REPO_MODELS_DIR, folder)
    return folder


def tampered_copy(tmp_path: Path, file: str) -> Path:
    """A copy of the shipped models folder in which one byte of ``file`` is flipped."""
    folder = models_copy(tmp_path)
    path = folder / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return folder


def metric_total(exposition: str, sample: str, **labels: str) -> float:
    """The sum of a Prometheus text exposition's ``sample`` values whose labels include
    ``labels`` (0 when there are none)."""
    return sum(s.value for family in text_string_to_metric_families(exposition)
               for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())


def status_kib(pid: int, field: str) -> int:
    """A memory figure of ``/proc/<pid>/status`` in KiB: ``VmRSS`` now, ``VmHWM`` its peak
    (reset by writing 5 to ``/proc/<pid>/clear_refs``)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
