"""Assertions shared by the HTTP tests."""

from __future__ import annotations

from service.settings import REPO_MODELS_DIR

# Nothing a client sees may reveal internals: tracebacks, source paths, the install.
LEAKS = ("Traceback", 'File "', str(REPO_MODELS_DIR.parent), "site-packages")


def assert_error(response, status: int, code: str) -> None:
    """A JSON error body with this status and stable ``code``, a message, and no internals."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["detail"]
    for leak in LEAKS:
        assert leak not in response.text
