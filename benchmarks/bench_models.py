"""Model speed: ONNX Runtime per image at batch 1 and 16, and the kNN's predict_proba, alone
and in a worker per CPU at once.

    python -m benchmarks.bench_models [--threads 1 2] [--seconds 5]

Inputs are real dataset images through the shared preprocessing; prints milliseconds per image.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import time

import numpy as np

from benchmarks import run, shipped_model_bytes
from service.arguments import count, positive_seconds
from service.models import OnnxClassifier, SklearnClassifier
from service.preprocessing import preprocess_image
from service.settings import container_cpus


def real_images(count: int) -> np.ndarray:
    from benchmarks.load import study_images_dir

    paths = sorted(study_images_dir().iterdir())[:count]
    return np.stack([preprocess_image(p.read_bytes()) for p in paths])


def per_image_ms(predict, images: np.ndarray, batch: int, seconds: float) -> tuple[float, float]:
    predict(images[:batch])  # warm-up
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < 5:
        chunk = images[(i * batch) % len(images):][:batch]
        if len(chunk) < batch:
            chunk = images[:batch]
        started = time.perf_counter()
        predict(chunk)
        times.append((time.perf_counter() - started) * 1000 / batch)
        i += 1
    return float(np.median(times)), float(np.percentile(times, 99))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, nargs="+", default=[1, 2],
                        help="threads to try: ONNX Runtime's intra-op ones, and the kNN's "
                        "(default: %(default)s)")
    parser.add_argument("--seconds", type=positive_seconds, default=5.0,
                        help="time per measurement (default: %(default)s)")
    args = parser.parse_args(argv)
    images = real_images(64)
    cnn, data = shipped_model_bytes("cnn")
    for threads in args.threads:
        model = OnnxClassifier(data, cnn, threads)
        for batch in (1, 16):
            p50, p99 = per_image_ms(model.predict_proba, images, batch, args.seconds)
            print(f"cnn onnx  threads={threads} batch={batch:2d}: {p50:6.2f} ms/image median, "
                  f"{p99:6.2f} p99")
    _, knn_data = shipped_model_bytes("knn")
    for threads in (0, *args.threads):
        knn = SklearnClassifier(knn_data, threads)
        for batch in (1, 16):
            p50, p99 = per_image_ms(knn.predict_proba, images, batch, args.seconds)
            print(f"knn sklearn threads={threads or 'all'} batch={batch:2d}: {p50:6.2f} ms/image "
                  f"median, {p99:6.2f} p99")
    # As the service runs it: a worker per CPU, each calling the kNN at batch 1 at once
    workers, spawn = container_cpus(), multiprocessing.get_context("spawn")
    for threads in (0, 1):
        ready, results = spawn.Barrier(workers), spawn.Queue()
        processes = [spawn.Process(target=_knn_worker, args=(threads, args.seconds, ready,
                                                              results), daemon=True)
                     for _ in range(workers)]
        try:
            for process in processes:
                process.start()
            times = np.concatenate([_next_result(results, processes) for _ in processes])
        finally:  # a worker that died left the others at the barrier, and the run waiting
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        print(f"knn sklearn threads={threads or 'all'}, {workers} workers at once: "
              f"{len(times) / args.seconds / workers:6.1f} images/s each, "
              f"{np.median(times):6.2f} ms median, {np.percentile(times, 90):6.2f} p90")


def _next_result(results, processes) -> np.ndarray:
    """A worker's timings, or SystemExit once one of them has died without sending them."""
    while True:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            died = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if died:
                raise SystemExit(f"a kNN worker died (exit status {died[0]}); no figure for "
                                 "the workers at once") from None


def _knn_worker(threads: int, seconds: float, ready, results) -> None:
    knn = SklearnClassifier(shipped_model_bytes("knn")[1], threads)
    images = real_images(64)
    knn.predict_proba(images[:1])
    ready.wait()  # timed only once every worker has loaded: start-up is not the load
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        knn.predict_proba(images[len(times) % len(images)][None])
        times.append((time.perf_counter() - started) * 1000)
    results.put(np.array(times))


if __name__ == "__main__":
    raise SystemExit(run(main))
