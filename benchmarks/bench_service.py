"""The service against its bare path, on loopback.

    python -m benchmarks.bench_service [--requests 300] [--concurrency 16]

Bare path: read bytes, preprocess, ONNX Runtime, one image at a time in this process.
Service: a real uvicorn server (one worker, the default settings) answering POST /predict,
first one request at a time (p50, p99), then ``--concurrency`` clients at once (images/s).
Goals: service p50 at most 1.3x the bare path's; throughput at least 0.8x the bare path's.
Floor: the same client against an ASGI app that only reads the upload (``floor_app``) under
uvicorn, so the printout also says what ratio is possible at all on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from benchmarks.load import load_faces, one_face_each, post_images
from service.manifest import load_manifest
from service.models import OnnxClassifier
from service.preprocessing import preprocess_image
from service.settings import REPO_MODELS_DIR, Settings
from tests.server import running_server


def bare_path(faces: list[bytes], requests: int) -> np.ndarray:
    manifest = load_manifest(REPO_MODELS_DIR)
    entry = manifest.models["cnn"]
    model = OnnxClassifier((REPO_MODELS_DIR / entry.file).read_bytes(), entry,
                           Settings().resolved_onnx_threads)
    model.predict_proba(preprocess_image(faces[0])[None])
    times = []
    for i in range(requests):
        started = time.perf_counter()
        model.predict_proba(preprocess_image(faces[i % len(faces)])[None])
        times.append(time.perf_counter() - started)
    return np.array(times)


def http_latencies(base: str, faces: list[bytes], requests: int, concurrency: int):
    """Latencies (s), failed requests and wall time of ``requests`` posts of one face each."""
    outcomes, wall = asyncio.run(post_images(base, one_face_each(faces), concurrency,
                                             requests=requests))
    return (np.array([o.latency for o in outcomes]), sum(o.status != 200 for o in outcomes),
            wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300,
                        help="requests per measurement (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="clients in the throughput run (default: %(default)s)")
    args = parser.parse_args(argv)
    faces = load_faces(64)
    bare = bare_path(faces, args.requests)
    bare_p50 = np.median(bare) * 1000
    bare_rate = 1 / bare.mean()
    print(f"bare path: p50 {bare_p50:.2f} ms, p99 {np.percentile(bare, 99) * 1000:.2f} ms, "
          f"{bare_rate:.0f} images/s single process")
    with running_server(app="benchmarks.floor_app:app") as base:
        http_latencies(base, faces, 20, 1)
        floor, _, _ = http_latencies(base, faces, args.requests, 1)
        _, _, floor_wall = http_latencies(base, faces, args.requests,
                                                      args.concurrency)
    floor_p50 = np.median(floor) * 1000
    print(f"HTTP floor (uvicorn, an app that only reads the upload): p50 {floor_p50:.2f} ms, "
          f"{args.requests / floor_wall:.0f} requests/s at concurrency {args.concurrency}; "
          f"best possible p50 ratio (bare + floor) / bare = {1 + floor_p50 / bare_p50:.2f}")
    with running_server() as base:
        http_latencies(base, faces, 20, 1)  # warm-up
        single, fails1, _ = http_latencies(base, faces, args.requests, 1)
        many, fails16, wall = http_latencies(base, faces, args.requests,
                                                         args.concurrency)
    p50 = np.median(single) * 1000
    rate = args.requests / wall
    print(f"/predict concurrency 1: p50 {p50:.2f} ms, p99 {np.percentile(single, 99) * 1000:.2f}"
          f" ms, failures {fails1}")
    print(f"/predict concurrency {args.concurrency}: {rate:.0f} images/s, p50 "
          f"{np.median(many) * 1000:.1f} ms, p99 {np.percentile(many, 99) * 1000:.1f} ms, "
          f"failures {fails16}")
    print(f"ratios: p50 {p50 / bare_p50:.2f}x the bare path (goal <= 1.3); throughput "
          f"{rate / bare_rate:.2f}x (goal >= 0.8)")


if __name__ == "__main__":
    main()
