"""emotion-detect's images per second, beside the bare path, on this machine.

    python -m benchmarks.bench_cli [--images 1200] [--batch-size 8] [--faces none]
                                   [--resume-rows 100000]

A folder of ``--images`` real test-split files (copies, so the disk cache is warm for all).
Bare path: read, preprocess, ONNX Runtime on one thread, in one process, at batch 1 and at
``--batch-size``. In-process: :class:`service.batch.LocalRunner`, the command line's own
runner, with 1 and 2 worker processes (compared with the bare path for ``--faces none``
only, since the bare path finds no faces); the figure counts from the first result, so the
workers' start-up (loading the models) is left out and given apart. Remote: ``--url``'s
runner against ``python -m service`` on loopback. Goals: in-process at least 0.9x the bare
path's single-process throughput per worker, and close to linear in workers (on 2 cores,
2 workers can at best double it). Last, ``--resume`` reading an output of ``--resume-rows``
rows, one in ten of them unreadable and so done again (its time grew with the square of
the rows once: 19 s at 100,000).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import print_busy_warning, run, shipped_model_bytes
from benchmarks.load import load_faces
from service.arguments import count
from service.batch import (
    COLUMNS,
    LocalRunner,
    RemoteRunner,
    Row,
    RowWriter,
    batches,
    finished_paths,
)
from service.models import OnnxClassifier
from service.preprocessing import pixels_to_input, preprocess_image_uint8
from service.settings import REPO_MODELS_DIR
from tests.server import running_server


def bare(paths: list[str], batch_size: int) -> float:
    entry, data = shipped_model_bytes("cnn")
    model = OnnxClassifier(data, entry, threads=1)
    started = time.perf_counter()
    for chunk in batches(paths, batch_size):
        # stacked as uint8 and scaled once, as the runner's Predictor does: converting each
        # image apart made the reference 10-15% slower per image (a review)
        model.predict_proba(pixels_to_input(np.stack(
            [preprocess_image_uint8(Path(p).read_bytes()) for p in chunk])))
    return len(paths) / (time.perf_counter() - started)


def consume(runner, paths: list[str]) -> tuple[float, float]:
    """(images/s from the first result on, seconds until the first result)."""
    started = time.perf_counter()
    first, done = None, 0
    for batch in runner.run(paths):
        if first is None:
            first, done = time.perf_counter(), 0
        else:
            done += len(batch)
    return done / (time.perf_counter() - first), first - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=count, default=1200,
                        help="dataset images classified per run")
    parser.add_argument("--batch-size", type=count, default=8,
                        help="files per model call")
    parser.add_argument("--faces", default="none", choices=("none", "auto", "all"),
                        help="face mode")
    parser.add_argument("--resume-rows", type=count, default=100_000,
                        help="rows in the output that --resume reads")
    args = parser.parse_args(argv)
    print_busy_warning()
    faces = load_faces(200)
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as folder:
        paths = []
        for i in range(args.images):
            path = Path(folder) / f"{i:05d}.jpg"
            path.write_bytes(faces[i % len(faces)])
            paths.append(str(path))
        bare_1 = bare(paths, 1)
        bare_b = bare(paths, args.batch_size)
        print(f"bare path, 1 process, 1 thread: {bare_1:.1f} images/s at batch 1, "
              f"{bare_b:.1f} at batch {args.batch_size}", flush=True)
        for workers in (1, 2):
            runner = LocalRunner(REPO_MODELS_DIR, "cnn", args.faces, workers, args.batch_size)
            rate, startup = consume(runner, paths)
            # the bare path runs no face detector: beside faces=auto, "0.16x" read as a
            # slowdown that is not there (a review)
            ratio = (f"{rate / workers / bare_b:.2f}x the bare path per worker at the same "
                     "batch" if args.faces == "none" else
                     f"no ratio: the bare path finds no faces, faces={args.faces} does")
            print(f"in-process, {workers} worker(s): {rate:.1f} images/s ({ratio}; start-up "
                  f"{startup:.1f} s)", flush=True)
        env = {"EMOTION_LOG_LEVEL": "warning"}
        with running_server(workers=2, env=env) as base:
            runner = RemoteRunner(base, "cnn", args.faces, concurrency=4,
                                  batch_size=args.batch_size)
            rate, startup = consume(runner, paths)
            print(f"--url, a local service with 2 workers, 4 connections: {rate:.1f} images/s",
                  flush=True)
        print(resume_figure(Path(folder) / "rows.csv", args.resume_rows), flush=True)
    return 0


def resume_figure(out: Path, rows: int) -> str:
    names = [f"/photos/{n:07d}.jpg" for n in range(rows)]
    writer = RowWriter(out, COLUMNS)
    writer.write([Row.error(name, "cannot read the file: permission denied", "unreadable")
                  if n % 10 == 0 else Row({**dict.fromkeys(COLUMNS), "path": name,
                                           "label": "NEUTRAL"})
                  for n, name in enumerate(names)])
    writer.close()
    started = time.perf_counter()
    done = finished_paths(out, names, apply=False)
    read = time.perf_counter() - started
    started = time.perf_counter()
    finished_paths(out, names)
    rewritten = time.perf_counter() - started
    return (f"--resume over {rows:,} rows ({rows - len(done):,} to do again): "
            f"{read:.2f} s to read them, {rewritten:.2f} s to read and rewrite")


if __name__ == "__main__":
    raise SystemExit(run(main))
