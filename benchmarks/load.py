"""A small asyncio load generator for POST /predict on loopback, shared by the benchmarks."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

# What request number i sends: a list of (filename, bytes) parts, one model call.
Payload = Callable[[int], list[tuple[str, bytes]]]


@dataclass
class Outcome:
    status: int            # 0: the connection failed
    latency: float         # seconds
    retry_after: str | None = None
    error: str | None = None
    sent_at: float = 0.0   # time.perf_counter() when it was sent
    retried: int = 0       # times sent again after its connection broke


def study_images_dir() -> Path:
    """The study's images, which every benchmark but bench_memory and bench_page sends; one
    line on how to get them where they are not (a traceback before, after a server start)."""
    from training.settings import get_training_settings

    settings = get_training_settings()
    if not settings.images_dir.is_dir():
        raise SystemExit(f"the study's dataset is not at {settings.dataset_dir}: set "
                         "EMOTION_DATASET_DIR or run `python -m training fetch`")
    return settings.images_dir


def load_faces(count: int, split: str = "test") -> list[bytes]:
    """Real images of the identity split's ``split`` subset, in a fixed order."""
    from training.settings import get_training_settings
    from training.splits import read_split

    images_dir = study_images_dir()
    table = read_split(get_training_settings().splits_dir / "identity.csv")
    names = table[table["split"] == split]["image"].iloc[:count]
    return [(images_dir / name).read_bytes() for name in names]


def one_face_each(faces: list[bytes]) -> Payload:
    return lambda i: [("face.jpg", faces[i % len(faces)])]


async def post_images(base: str, payload: Payload, clients: int, requests: int | None = None,
                      seconds: float | None = None, outcomes: list[Outcome] | None = None,
                      stop: Callable[[], bool] | None = None,
                      retries: int = 0) -> tuple[list[Outcome], float]:
    """``clients`` connections posting until ``requests`` are sent, ``seconds`` pass or
    ``stop()`` says so; a request whose connection broke is sent again up to ``retries``
    times, as ``emotion-detect --url`` does (a prediction is safe to repeat).

    Outcomes are appended to ``outcomes`` as they come, so a caller can watch progress.
    """
    if requests is None and seconds is None and stop is None:
        raise ValueError("give requests, seconds or stop")
    numbers = itertools.count()
    outcomes = [] if outcomes is None else outcomes
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            while time.perf_counter() < deadline and not (stop and stop()):
                i = next(numbers)
                if requests is not None and i >= requests:
                    return
                files = [("files", (name, data, "image/jpeg")) for name, data in payload(i)]
                outcomes.append(await post_once(client, f"{base}/predict", files, retries))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes, time.perf_counter() - started


async def post_once(client: httpx.AsyncClient, url: str, files: list,
                    retries: int) -> Outcome:
    """One request, sent again up to ``retries`` times while its connection breaks."""
    sent, retried = time.perf_counter(), 0
    while True:
        try:
            response = await client.post(url, files=files)
        except httpx.HTTPError as exc:
            # a timeout is a request accepted and not answered: sending it again loads more
            broken = (isinstance(exc, httpx.TransportError)
                      and not isinstance(exc, httpx.TimeoutException))
            if broken and retried < retries:
                retried += 1
                continue
            return Outcome(0, time.perf_counter() - sent, error=type(exc).__name__,
                           sent_at=sent, retried=retried)
        return Outcome(response.status_code, time.perf_counter() - sent,
                       response.headers.get("retry-after"), sent_at=sent, retried=retried)


def latency_ms(outcomes: list[Outcome], q: float) -> float:
    values = [o.latency for o in outcomes]
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def describe(outcomes: list[Outcome], wall: float) -> str:
    statuses = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == 200]
    errors = Counter(o.error for o in outcomes if o.error)
    broken = f" (connection errors {dict(errors)})" if errors else ""
    return (f"{len(outcomes)} requests in {wall:.1f} s, statuses {dict(sorted(statuses.items()))}"
            f"{broken}"
            f"; 200s: p50 {latency_ms(ok, 50):.1f} ms, p99 {latency_ms(ok, 99):.1f} ms, "
            f"{len(ok) / wall:.0f} requests/s")
