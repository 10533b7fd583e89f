"""Model speed: ONNX Runtime per image at batch 1 and 16, and the kNN's predict_proba.

    python -m benchmarks.bench_models [--threads 1 2] [--seconds 5]

Inputs are real dataset images through the shared preprocessing; prints milliseconds per image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from service.arguments import count
from service.manifest import load_manifest
from service.models import OnnxClassifier, SklearnClassifier
from service.preprocessing import preprocess_image
from service.settings import REPO_MODELS_DIR


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
                        help="ONNX Runtime intra-op threads to try (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="time per measurement (default: %(default)s)")
    args = parser.parse_args(argv)
    manifest = load_manifest(REPO_MODELS_DIR)
    images = real_images(64)
    cnn = manifest.models["cnn"]
    data = (REPO_MODELS_DIR / cnn.file).read_bytes()
    for threads in args.threads:
        model = OnnxClassifier(data, cnn, threads)
        for batch in (1, 16):
            p50, p99 = per_image_ms(model.predict_proba, images, batch, args.seconds)
            print(f"cnn onnx  threads={threads} batch={batch:2d}: {p50:6.2f} ms/image median, "
                  f"{p99:6.2f} p99")
    knn = SklearnClassifier((REPO_MODELS_DIR / manifest.models["knn"].file).read_bytes())
    for batch in (1, 16):
        p50, p99 = per_image_ms(knn.predict_proba, images, batch, args.seconds)
        print(f"knn sklearn           batch={batch:2d}: {p50:6.2f} ms/image median, {p99:6.2f} p99")


if __name__ == "__main__":
    main()
