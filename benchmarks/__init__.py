"""Benchmarks that print figures (see RESULTS.md); run each with ``python -m benchmarks.<name>``."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(main: Callable[[], int | None]) -> int:
    """``main``'s exit status, with SIGTERM and SIGHUP taken as Ctrl-C: a ``kill`` of the
    benchmark alone left the servers it had started running (a review)."""
    from service.signals import stops_taken_as_ctrl_c

    try:
        with stops_taken_as_ctrl_c():
            return main() or 0
    except KeyboardInterrupt as exc:  # its servers and workers stopped on the way out
        number = getattr(exc, "number", 2)
        print(f"benchmark stopped by signal {number}", file=sys.stderr)
        return 128 + number


def shipped_model_bytes(name: str):
    """The shipped model ``name``'s manifest entry and bytes, checked against the manifest's
    SHA-256 as the service checks them before loading (the kNN is a pickle: a file put in
    its place ran code when a benchmark loaded it)."""
    from service.manifest import load_manifest, read_pinned
    from service.settings import REPO_MODELS_DIR

    entry = load_manifest(REPO_MODELS_DIR).models[name]
    return entry, read_pinned(REPO_MODELS_DIR / entry.file, entry.sha256, "manifest.json")
