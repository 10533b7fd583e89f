"""Peak memory of one worker serving the largest requests the limits allow.

    python -m benchmarks.bench_memory [--images 16] [--cases multipart,pixels,oip_json,...]

Each case starts a fresh one-worker server (so its high-water mark is that case's own), sends
the request (``--concurrent`` copies at once) and prints the worker's peak resident memory
(``VmHWM``). What the Kubernetes and KServe manifests' memory limits are sized from: a pod
runs ``EMOTION_WORKERS`` of these.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
from PIL import Image

from benchmarks import run
from service.arguments import count, non_negative_seconds
from service.preprocessing import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tests.server import server_process

MIN_NOISE_BYTES = 1024
CASES = ("idle", "multipart", "pixels", "float_tiff", "webp", "oip_json", "oip_binary",
         "oip_tensor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=count, default=16,
                        help="images per request (EMOTION_MAX_IMAGES_PER_REQUEST's default)")
    parser.add_argument("--bytes", type=count, default=DEFAULT_MAX_BYTES - 1024,
                        help="size of each noise PNG (just under the upload limit)")
    parser.add_argument("--pixels", type=count, default=DEFAULT_MAX_PIXELS - 100_000,
                        help="pixels of each image in the 'pixels' (smooth RGB PNG), "
                        "'float_tiff' and 'webp' (lossless, a few kB) cases")
    parser.add_argument("--concurrent", type=count, default=1, help="copies sent at once")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases, in order; "
                        "a+b sends one request of each case at once, and case:N gives that "
                        "case N images per request instead of --images")
    parser.add_argument("--stagger", type=non_negative_seconds, default=0.0,
                        help="seconds between the starts of an a+b case's parts (the worst "
                        "seen: a float TIFF sent while the largest JSON body is parsed)")
    args = parser.parse_args(argv)
    if args.bytes < MIN_NOISE_BYTES:  # a PNG's own bytes: smaller failed after other cases
        parser.error(f"argument --bytes: at least {MIN_NOISE_BYTES}")
    # every case named before the first is run: a typo in the last cost all the others
    for part in (p for case in args.cases.split(",") for p in case.split("+")):
        if part.partition(":")[0] not in CASES:
            parser.error(f"unknown case {part!r}; the cases are {', '.join(CASES)}")
        images_of(part, args.images)
    return args


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def noise_png(size: int) -> bytes:
    """Random RGB noise (incompressible), as large as fits in ``size`` bytes."""
    side = int((size / 3) ** 0.5)
    rng = np.random.default_rng(0)
    while True:
        data = png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        if len(data) <= size:
            return data
        side -= 8


def smooth_png(pixels: int) -> bytes:
    side = int(pixels ** 0.5)
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    return png(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, :]), -1))


def float_tiff(pixels: int) -> bytes:
    """A 32-bit float image of zeros, deflated: a few hundred kB for the pixel limit."""
    side = int(pixels ** 0.5)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.float32), "F").save(
        buffer, "TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def lossless_webp(pixels: int) -> bytes:
    """One colour, lossless: a few kB that decode to an RGBA canvas of ``pixels``."""
    side = int(pixels ** 0.5)
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (90, 120, 150, 255)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


def images_of(part: str, default: int) -> int:
    """The N of ``case:N``, else ``default``."""
    images = part.partition(":")[2]
    if not images:
        return default
    if not images.isdigit() or int(images) < 1:
        raise SystemExit(f"{part!r}: case:N takes a count of images, N at least 1")
    return int(images)


def requests_for(part: str, args) -> list[dict]:
    """httpx.post keyword arguments, one request per entry (a path and its body)."""
    case = part.partition(":")[0]
    args = argparse.Namespace(**{**vars(args), "images": images_of(part, args.images)})
    if case == "idle":
        return [{"url": "/predict", "params": {"faces": "none"},
                 "files": {"file": ("a.png", png(np.full((64, 64), 128, np.uint8)))}}]
    if case in ("multipart", "pixels", "float_tiff", "webp"):
        image = (noise_png(args.bytes) if case == "multipart" else smooth_png(args.pixels)
                 if case == "pixels" else float_tiff(args.pixels) if case == "float_tiff"
                 else lossless_webp(args.pixels))
        return [{"url": "/predict", "params": {"faces": "none"},
                 "files": [("files", (f"{i}.png", image)) for i in range(args.images)]}]
    infer = "/v2/models/cnn/infer"
    if case == "oip_json":
        text = base64.b64encode(noise_png(args.bytes)).decode()
        return [{"url": infer, "content": json.dumps({"inputs": [{
            "name": "image_bytes", "datatype": "BYTES", "shape": [args.images],
            "data": [text] * args.images}], "parameters": {"faces": "none"}}).encode()}]
    if case == "oip_binary":
        image = noise_png(args.bytes)
        raw = b"".join(struct.pack("<I", len(image)) + image for _ in range(args.images))
        header = json.dumps({"inputs": [{
            "name": "image_bytes", "datatype": "BYTES", "shape": [args.images],
            "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"faces": "none"}}).encode()
        return [{"url": infer, "content": header + raw,
                 "headers": {"Inference-Header-Content-Length": str(len(header))}}]
    if case == "oip_tensor":
        values = np.random.default_rng(1).random((args.images, 1, 350, 350), dtype=np.float32)
        return [{"url": infer, "content": json.dumps({"inputs": [{
            "name": "image", "datatype": "FP32", "shape": list(values.shape),
            "data": values.ravel().tolist()}]}).encode()}]
    raise SystemExit(f"unknown case {case!r}; the cases are {', '.join(CASES)}")


def peak_resident_bytes(pid: int) -> int:
    """The process's high-water mark of resident memory (``VmHWM``), not its resident memory
    now: a request's decode is freed by the time the answer is read."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status
                    if line.startswith("VmHWM:"))


def measure(case: str, args) -> dict:
    # "a+b": one request of each case, sent together (each --concurrent times)
    requests = [r for part in case.split("+") for r in requests_for(part, args)
                ] * args.concurrent
    body_mb = sum(len(r.get("content") or b"") + sum(
        len(f[1][1]) for f in (r["files"].items() if isinstance(r.get("files"), dict)
                               else r.get("files", []))) for r in requests) / 1e6
    # the largest request's images: a case:N above --images was refused with 422
    most = max(images_of(part, args.images) for part in case.split("+"))
    env = {"EMOTION_ONNX_THREADS": "1", "EMOTION_MAX_IMAGES_PER_REQUEST": str(most)}
    parts = len(case.split("+"))

    def send(numbered: tuple[int, dict]):
        i, kwargs = numbered
        time.sleep(i % parts * args.stagger)  # the k-th part of each copy, k staggers in
        return client.post(**kwargs)

    with server_process(env=env) as (base, process):
        worker = psutil.Process(process.pid)
        idle = worker.memory_full_info().rss
        started = time.perf_counter()
        try:
            with httpx.Client(base_url=base, timeout=900) as client, \
                    ThreadPoolExecutor(len(requests)) as pool:
                statuses = dict(sorted(Counter(r.status_code for r in pool.map(
                    send, enumerate(requests))).items()))
        except httpx.TransportError:  # the worker died (the kernel's OOM killer, say)
            code = process.wait(10)
            return {"case": case, "requests": len(requests), "body_mb": body_mb,
                    "status": {f"killed:{-code}" if code < 0 else f"exit:{code}": 1},
                    "idle_mb": idle / 1e6, "peak_mb": float("nan"),
                    "wall_s": time.perf_counter() - started}
        wall = time.perf_counter() - started
        peak = peak_resident_bytes(process.pid)
    return {"case": case, "requests": len(requests), "body_mb": body_mb, "status": statuses,
            "idle_mb": idle / 1e6, "peak_mb": peak / 1e6, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"one worker, EMOTION_ONNX_THREADS=1, {args.images} images per request unless a "
          f"case says (multipart:N), {args.concurrent} at once")
    print(f"{'case':<12} {'body MB':>9} {'status':>10} {'idle MB':>8} {'peak MB':>8} "
          f"{'wall s':>7}")
    failed = False
    for case in args.cases.split(","):
        row = measure(case, args)
        # with several at once, the body budget may answer some 503 (retry shortly)
        failed |= 200 not in row["status"] or not set(row["status"]) <= {200, 503}
        statuses = ",".join(f"{code}x{n}" for code, n in row["status"].items())
        print(f"{row['case']:<12} {row['body_mb']:>9.1f} {statuses:>10} "
              f"{row['idle_mb']:>8.0f} {row['peak_mb']:>8.0f} {row['wall_s']:>7.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run(main))
