"""The face detector's cost, alone and as a share of /predict.

    python -m benchmarks.bench_faces [--repeats 30] [--requests 100]

Photos: a real test-split face pasted onto noise, at 640x480 and 1920x1080 (JPEG). Prints
the detector's milliseconds per image (search plus refinement, as the service runs it, on the
decoded grayscale image), then /predict p50 over HTTP with faces=auto and faces=none on a
real server, and the detector's share of the faces=auto latency.
"""

from __future__ import annotations

import argparse
import io
import time

import httpx
import numpy as np
from PIL import Image

from benchmarks import run
from benchmarks.load import load_faces
from service.arguments import count
from service.faces import FaceCropper, load_face_crop
from service.preprocessing import decode_grayscale
from service.settings import REPO_MODELS_DIR
from tests.server import running_server

SIZES = ((640, 480), (1920, 1080))


def photo(face: bytes, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8))
    side = size[1] // 2
    canvas.paste(Image.open(io.BytesIO(face)).convert("L").resize((side, side)),
                 (size[0] // 3, size[1] // 4))
    buffer = io.BytesIO()
    canvas.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def detector_ms(cropper: FaceCropper, data: bytes, repeats: int) -> tuple[float, int]:
    gray = decode_grayscale(data).gray
    found = cropper.faces(gray)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cropper.faces(gray)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000), len(found)


def predict_p50(base: str, data: bytes, faces: str, requests: int) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(requests + 5):
            started = time.perf_counter()
            response = client.post(f"{base}/predict?faces={faces}",
                                   files={"file": ("photo.jpg", data, "image/jpeg")})
            response.raise_for_status()
            if i >= 5:  # warm-up
                times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=count, default=30, help="detector runs per size")
    parser.add_argument("--requests", type=count, default=100, help="HTTP requests per mode")
    args = parser.parse_args(argv)
    cropper = FaceCropper(load_face_crop(REPO_MODELS_DIR), REPO_MODELS_DIR)
    photos = {size: photo(load_faces(1)[0], size) for size in SIZES}
    detector = {}
    for size, data in photos.items():
        detector[size], found = detector_ms(cropper, data, args.repeats)
        print(f"detector at {size[0]}x{size[1]}: {detector[size]:.1f} ms per image "
              f"(one thread, {found} face found)")
    with running_server() as base:
        for size, data in photos.items():
            auto = predict_p50(base, data, "auto", args.requests)
            none = predict_p50(base, data, "none", args.requests)
            print(f"/predict {size[0]}x{size[1]} JPEG: p50 faces=auto {auto:.1f} ms, "
                  f"faces=none {none:.1f} ms; the detector is {detector[size] / auto:.0%} of "
                  "the faces=auto latency")


if __name__ == "__main__":
    raise SystemExit(run(main))
