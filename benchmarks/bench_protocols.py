"""Latency of one image through each protocol the service speaks, on one real server.

    python -m benchmarks.bench_protocols [--requests 300] [--rounds 3]

One request at a time (p50 and p99, milliseconds) to ``python -m service`` with one worker
and one ONNX thread: ``/predict`` as multipart and as a raw body, and the Open Inference
Protocol's infer with ``image_bytes`` (binary extension, and JSON with base64) and with
``image`` (FP32 [1, 1, 350, 350], binary and JSON). The kinds take turns in each round so
that drift in this machine's speed reaches all of them. tritonclient is not used as the
client here: its Python costs more per request than the model does.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import time

import httpx
import numpy as np

from benchmarks import run
from benchmarks.load import load_faces
from service.arguments import count
from service.preprocessing import preprocess_image
from tests.server import running_server


def oip_bytes_binary(image: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + struct.pack("<I", len(image)) + image, {
        "Inference-Header-Content-Length": str(len(header))}


def oip_bytes_json(image: bytes) -> tuple[bytes, dict]:
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(image).decode()]}]}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def oip_tensor_binary(image: bytes) -> tuple[bytes, dict]:
    tensor = preprocess_image(image)[None, None].astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                     "shape": [1, 1, 350, 350],
                                     "parameters": {"binary_data_size": len(tensor)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + tensor, {"Inference-Header-Content-Length": str(len(header))}


def oip_tensor_json(image: bytes) -> tuple[bytes, dict]:
    tensor = preprocess_image(image)
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 350, 350],
                        "data": np.round(tensor.ravel(), 6).tolist()}]}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=count, default=300, help="requests per kind and round")
    parser.add_argument("--rounds", type=count, default=3,
                        help="rounds, the kinds interleaved")
    args = parser.parse_args(argv)
    faces = load_faces(50)
    kinds = {
        "/predict multipart": lambda f: ("/predict", None, {"files": {"file": (
            "face.jpg", f, "image/jpeg")}}),
        "/predict raw body": lambda f: ("/predict", f, {"headers": {
            "Content-Type": "image/jpeg"}}),
        "OIP image_bytes, binary": lambda f: ("/v2/models/cnn/infer", *_split(
            oip_bytes_binary(f))),
        "OIP image_bytes, JSON base64": lambda f: ("/v2/models/cnn/infer", *_split(
            oip_bytes_json(f))),
        "OIP image FP32, binary": lambda f: ("/v2/models/cnn/infer", *_split(
            oip_tensor_binary(f))),
        "OIP image FP32, JSON": lambda f: ("/v2/models/cnn/infer", *_split(
            oip_tensor_json(f))),
    }
    prepared = {name: [make(f) for f in faces] for name, make in kinds.items()}
    sizes = {name: len(r[0][1] or b"") for name, r in prepared.items()}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    env = {"EMOTION_ONNX_THREADS": "1", "EMOTION_LOG_LEVEL": "warning"}
    with running_server(workers=1, env=env) as base, httpx.Client(base_url=base) as client:
        for _ in range(args.rounds):
            for name, requests in prepared.items():
                for i in range(args.requests):
                    path, body, extra = requests[i % len(requests)]
                    started = time.perf_counter()
                    response = client.post(path, content=body, **extra) if body is not None \
                        else client.post(path, **extra)
                    times[name].append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text[:200]
    reference = np.percentile(times["/predict multipart"], 50)
    for name, values in times.items():
        p50, p99 = np.percentile(values, 50) * 1000, np.percentile(values, 99) * 1000
        print(f"{name:32s} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({p50 / 1000 / reference:.2f}x "
              f"multipart; body {sizes[name] / 1000:.0f} kB where prepared)", flush=True)
    return 0


def _split(prepared: tuple[bytes, dict]) -> tuple[bytes, dict]:
    body, headers = prepared
    return body, {"headers": headers}


if __name__ == "__main__":
    raise SystemExit(run(main))
