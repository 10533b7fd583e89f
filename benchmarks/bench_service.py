"""The service against its bare path, on loopback.

    python -m benchmarks.bench_service [--requests 1000] [--rounds 3] [--concurrency 16]

Bare path: read bytes, preprocess, ONNX Runtime, one image at a time in this process, with
the ONNX Runtime threads of one server worker (the p50 reference) and, where that differs,
with every CPU (the single-process throughput reference takes the faster of the two).
Service: a real uvicorn server (``python -m service``, the default settings: one worker per
CPU) answering POST /predict with one multipart image per request, first one
request at a time (p50, p99), then ``--concurrency`` connections at once (images/s); the
same with the image as a raw ``image/jpeg`` body.
Goals: service p50 at most 1.3x the bare path's; throughput at least 0.8x the bare path's.

The client is :mod:`benchmarks.wire` (requests built in advance, keep-alive, about 50 us per
round trip) rather than httpx, whose own Python costs more per request than the model here.
Bare and service run in alternating rounds, so drift in this machine's speed reaches both.
The floor, an ASGI app that only reads the upload (``floor_app``), says what uvicorn and the
client cost before any framework, parsing or model work; ``frameless_app``, the service's
own parsing, executor hop, model call and JSON with no framework around them, says how much
of the rest is FastAPI's and the middleware's.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from benchmarks import print_busy_warning, run, run_loop, shipped_model_bytes
from benchmarks.load import load_faces
from benchmarks.wire import multipart_request, raw_request, send_requests
from service.arguments import count, non_negative
from service.models import OnnxClassifier
from service.preprocessing import preprocess_image
from service.settings import Settings
from tests.server import running_server


class BarePath:
    """The shipped CNN without HTTP: what the service would cost with nothing around it."""

    def __init__(self, threads: int):
        entry, data = shipped_model_bytes("cnn")
        self.model = OnnxClassifier(data, entry, threads)

    def times(self, faces: list[bytes], requests: int) -> list[float]:
        out = []
        for i in range(requests):
            started = time.perf_counter()
            self.model.predict_proba(preprocess_image(faces[i % len(faces)])[None])
            out.append(time.perf_counter() - started)
        return out


def http_times(base: str, requests: list[bytes], count: int, concurrency: int
               ) -> tuple[list[float], int, float]:
    """Latencies (s) of the 200s, the other answers' count and the wall time of ``count``
    requests (a refusal's latency is not the service's work, and made failures look fast)."""
    outcomes, wall = run_loop(send_requests(base, requests, concurrency, count))
    return ([o.latency for o in outcomes if o.status == 200],
            sum(o.status != 200 for o in outcomes), wall)


def ms(values, q: float = 50) -> float:
    return float(np.percentile(values, q) * 1000) if len(values) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=count, default=1000,
                        help="requests per round and per measurement (default: %(default)s)")
    parser.add_argument("--rounds", type=count, default=3,
                        help="alternating bare/service rounds (default: %(default)s)")
    parser.add_argument("--concurrency", type=count, default=16,
                        help="connections in the throughput run (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative, default=0,
                        help="uvicorn workers of the service; 0: one per CPU, the service's "
                             "default (default: %(default)s)")
    args = parser.parse_args(argv)
    print_busy_warning()
    n = args.requests
    faces = load_faces(64)
    server_settings = Settings(workers=args.workers)
    workers, threads = server_settings.resolved_workers, server_settings.resolved_onnx_threads
    all_cpus = Settings(workers=1).resolved_onnx_threads
    bare = BarePath(threads)
    bare.times(faces, 50)  # warm-up

    with running_server(app="benchmarks.floor_app:app") as base:
        host = base.removeprefix("http://")
        posts = [multipart_request(host, "/predict", [("face.jpg", f)]) for f in faces]
        http_times(base, posts, 50, 1)
        floor, _, _ = http_times(base, posts, n, 1)
    print(f"HTTP floor (uvicorn, an app that only reads the upload): p50 {ms(floor):.3f} ms")

    bare_times, single, frameless = [], [], []
    with contextlib.ExitStack() as servers:
        # One worker with the service's per-worker threads: at concurrency 1, one worker works.
        lean = servers.enter_context(running_server(
            app="benchmarks.frameless_app:app", env={"EMOTION_ONNX_THREADS": str(threads)}))
        base = servers.enter_context(running_server(workers=workers))
        host = base.removeprefix("http://")
        posts = [multipart_request(host, "/predict", [("face.jpg", f)]) for f in faces]
        lean_posts = [multipart_request(lean.removeprefix("http://"), "/predict",
                                        [("face.jpg", f)]) for f in faces]
        raws = [raw_request(host, "/predict", f) for f in faces]
        http_times(base, posts, 50, 1)  # warm-up
        http_times(lean, lean_posts, 50, 1)
        failures = lean_failures = 0
        for _ in range(args.rounds):
            bare_times += bare.times(faces, n)
            times, failed, _ = http_times(base, posts, n, 1)
            single += times
            failures += failed
            times, failed, _ = http_times(lean, lean_posts, n, 1)
            frameless += times
            lean_failures += failed
        raw_single, raw_failed, _ = http_times(base, raws, n, 1)
        many, many_failed, wall = http_times(base, posts, n * args.rounds, args.concurrency)
        raw_many, raw_many_failed, raw_wall = http_times(base, raws, n * args.rounds,
                                                         args.concurrency)
        # A batch of 16 images is one request and one model call.
        batches = [multipart_request(host, "/predict", [(f"face{k}.jpg", faces[(i + k) % 64])
                                                         for k in range(16)])
                   for i in range(0, 64, 16)]
        http_times(base, batches, 10, 1)
        batch16, batch_failed, _ = http_times(base, batches, max(n // 10, 20), 1)
    bare_p50, bare_rate = ms(bare_times), 1 / np.mean(bare_times)
    # answered ones only, as the latencies: a refusal is not throughput
    rate, raw_rate = len(many) / wall, len(raw_many) / raw_wall
    print(f"bare path (decode, preprocess, ONNX Runtime, {threads} thread(s)): p50 "
          f"{bare_p50:.3f} ms, p99 {ms(bare_times, 99):.3f} ms, {bare_rate:.0f} images/s "
          "single process")
    best_rate = bare_rate
    if all_cpus != threads:
        wide = BarePath(all_cpus)
        wide.times(faces, 50)
        wide_times = wide.times(faces, n * args.rounds)
        best_rate = max(bare_rate, 1 / np.mean(wide_times))
        print(f"bare path with {all_cpus} threads: p50 {ms(wide_times):.3f} ms, "
              f"{1 / np.mean(wide_times):.0f} images/s single process")
    print(f"/predict ({workers} worker(s), {threads} ONNX thread(s) each) multipart, "
          f"concurrency 1: p50 {ms(single):.3f} ms, p99 "
          f"{ms(single, 99):.3f} ms, failures {failures}")
    print(f"/predict's work without a framework (frameless_app: same parsing, executor hop, "
          f"model and JSON), concurrency 1: p50 {ms(frameless):.3f} ms, "
          f"{ms(frameless) / bare_p50:.2f}x the bare path, failures {lean_failures}")
    print(f"/predict raw image/jpeg body, concurrency 1: p50 {ms(raw_single):.3f} ms, p99 "
          f"{ms(raw_single, 99):.3f} ms, failures {raw_failed}")
    print(f"/predict concurrency {args.concurrency}: multipart {rate:.0f} images/s (p50 "
          f"{ms(many):.2f} ms, p99 {ms(many, 99):.2f} ms, failures {many_failed}); raw body "
          f"{raw_rate:.0f} images/s (failures {raw_many_failed})")
    print(f"/predict batch of 16 images, concurrency 1: p50 {ms(batch16):.2f} ms, p99 "
          f"{ms(batch16, 99):.2f} ms ({ms(batch16) / 16:.3f} ms per image), failures "
          f"{batch_failed}")
    print(f"service overhead at p50: {ms(single) - bare_p50:.3f} ms per request, of which "
          f"the HTTP floor is {ms(floor):.3f} ms and FastAPI with the middleware "
          f"{ms(single) - ms(frameless):.3f} ms")
    print(f"ratios: p50 {ms(single) / bare_p50:.2f}x the bare path (goal <= 1.3); throughput "
          f"{rate / best_rate:.2f}x the faster single-process bare path (goal >= 0.8)")
    failed = (failures + lean_failures + raw_failed + many_failed + raw_many_failed
              + batch_failed)
    if failed:
        print(f"FAILED: {failed} requests were not answered 200 (their times are left out)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run(main))
