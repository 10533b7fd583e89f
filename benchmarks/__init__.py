"""Benchmarks that print figures (see RESULTS.md); run each with ``python -m benchmarks.<name>``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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


def run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)``, a SIGTERM or SIGHUP cancelling it as asyncio's own Ctrl-C
    does, then raised as :class:`~service.signals.Stopped` for :func:`run`: raised at
    whatever line the loop ran, inside anyio's cancel scopes, a stop came out as another
    error (exit 1) or left the loop waiting for ever (a review)."""
    import asyncio
    import signal

    from service.signals import Stopped, handlers_swapped

    arrived: list[int] = []

    async def cancelled_by_a_stop() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()

        def cancel(number, frame) -> None:  # what asyncio.Runner does for SIGINT
            arrived.append(number)
            if not task.done():
                task.cancel()
                loop.call_soon_threadsafe(lambda: None)  # wakes the loop

        # Python's own handlers, not loop.add_signal_handler: that one dropped a signal that
        # came as the task ended, and restored SIG_DFL for a moment (the diff review)
        numbers = tuple(n for n in (signal.SIGTERM, signal.SIGHUP)
                        if signal.getsignal(n) != signal.SIG_IGN)  # nohup's SIGHUP stays
        with handlers_swapped(numbers, cancel):  # on the main thread only, where they live
            return await coroutine

    try:
        result = asyncio.run(cancelled_by_a_stop())
    except BaseException:  # the cancellation, or what the clean-up it ran raised
        if not arrived:
            raise
    if arrived:
        raise Stopped(arrived[0]) from None
    return result


def shipped_model_bytes(name: str):
    """The shipped model ``name``'s manifest entry and bytes, checked against the manifest's
    SHA-256 as the service checks them before loading (the kNN is a pickle: a file put in
    its place ran code when a benchmark loaded it)."""
    from service.manifest import load_manifest, read_pinned
    from service.settings import REPO_MODELS_DIR

    entry = load_manifest(REPO_MODELS_DIR).models[name]
    return entry, read_pinned(REPO_MODELS_DIR / entry.file, entry.sha256, "manifest.json")


def busy_warning(load: float, cpus: int) -> str | None:
    """A warning when other work held the CPUs as a benchmark started, else None. Its ratios
    time the bare path back to back but a server between idle gaps, and a busy scheduler
    favours the process that sleeps: under load 5 to 9 on 2 cores, /predict came out 0.89x
    the bare path, with a negative overhead, where an idle machine measures 1.57x (a review)."""
    if load < cpus / 2:
        return None
    return (f"WARNING: this machine was busy as the benchmark started (load average "
            f"{load:.1f} on {cpus} CPUs): the ratios to the bare path below are not "
            "comparable with an idle machine's; rerun with nothing else running")


def print_busy_warning() -> None:
    warning = busy_warning(os.getloadavg()[0], len(os.sched_getaffinity(0)))
    if warning:
        print(warning, flush=True)
