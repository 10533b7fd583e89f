"""Fuzzing: schemathesis against the app's own OpenAPI, hypothesis against preprocessing and
the Open Inference Protocol's request codec.

All are bounded so they fit in the suite; schemathesis's totals are counted and checked when
the module's tests end.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.python import asgi

from service.app import create_app
from service.oip import ProtocolError, parse_infer_request
from service.preprocessing import (
    INPUT_SIZE,
    ImageLimits,
    PreprocessingError,
    preprocess_image,
)
from service.settings import REPO_MODELS_DIR, Settings
from tests.images import encode, gray_image, rgb_image

FUZZ_EXAMPLES = 100  # per operation
OUTCOMES: Counter[tuple[str, int]] = Counter()  # (operation, status) -> requests


# Building the app loads nothing (models load in its lifespan), so it can exist at import.
APP = create_app(Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def asgi_client(request):
    with asgi.get_client(APP) as client:  # runs the lifespan once: models load one time
        yield client
    # After the module's schemathesis cases, in whatever order they ran: the totals for the
    # record, and, when every operation was selected, every one of them answered.
    print(f"\nfuzzed requests: {sum(OUTCOMES.values())}")
    for (operation, status), count in sorted(OUTCOMES.items()):
        print(f"  {operation} -> {status}: {count}")
    selected = sum(item.originalname == "test_api_conforms_to_its_own_schema"
                   for item in request.session.items)
    if selected == len(list(schema.get_all_operations())):
        assert {"POST /predict", "GET /classes", "GET /metrics", "GET /readyz",
                "GET /healthz", "GET /models"} <= {operation for operation, _ in OUTCOMES}


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_own_schema(case, asgi_client):
    # Two checks cannot hold for image uploads. Random bytes sent as image/png match the
    # schema but are no image, so they rightly get a 400, not a 2xx. And a multipart part is
    # bytes whatever the schema says its type is, so a batch of non-images is a 200 whose
    # entries each carry their own error, by design. Every other check runs.
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        positive_data_acceptance,
    )

    excluded = [positive_data_acceptance]
    if case.path == "/predict":
        excluded.append(negative_data_rejection)
    response = case.call_and_validate(session=asgi_client, excluded_checks=excluded)
    OUTCOMES[f"{case.method} {case.path}", response.status_code] += 1
    assert response.status_code < 500


# --- the Open Inference Protocol's codec: any body parses or is a ProtocolError (a 400) ------
# The infer routes read their body themselves, so schemathesis cannot reach it: this does.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
TEMPLATE = {"id": "r", "parameters": {"faces": "none"},
            "inputs": [{"name": "image", "datatype": "INT8", "shape": [2, 2],
                        "data": [[1, 2], [3, 4]], "parameters": {"binary_data_size": 4}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
PATHS = [(), ("id",), ("parameters",), ("inputs",), ("inputs", 0), ("inputs", 0, "name"),
         ("inputs", 0, "datatype"), ("inputs", 0, "shape"), ("inputs", 0, "shape", 0),
         ("inputs", 0, "data"), ("inputs", 0, "data", 0, 1), ("inputs", 0, "parameters"),
         ("inputs", 0, "parameters", "binary_data_size"), ("outputs",), ("outputs", 0),
         ("outputs", 0, "parameters"), ("outputs", 0, "parameters", "binary_data")]


@st.composite
def infer_bodies(draw) -> tuple[bytes, str | None]:
    """A valid request (binary or JSON data) with a few of its members replaced by any JSON."""
    header = json.loads(json.dumps(TEMPLATE))
    binary = draw(st.booleans())
    if not binary:
        del header["inputs"][0]["parameters"]
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3)):
        value = draw(JSON_VALUES)
        if not path:
            header = value
            continue
        node = header
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier replacement removed this member
    text = json.dumps(header).encode()
    tail = draw(st.binary(max_size=8)) if binary else b""
    length = draw(st.sampled_from([str(len(text)), "0", "\u00b2", "-1", " 3", None]))
    return text + tail, (length if binary else None)


@given(infer_bodies())
@settings(max_examples=500, deadline=None)
def test_any_infer_body_parses_or_is_a_protocol_error(body_and_length):
    body, header_length = body_and_length
    try:
        request = parse_infer_request(body, header_length)
    except ProtocolError as exc:
        assert str(exc)
        return
    for tensor in request.inputs:  # what parsed is what the shape says
        if tensor.datatype == "BYTES":
            assert len(tensor.value) == math.prod(tensor.shape)
        else:
            assert tensor.value.shape == tuple(tensor.shape)
    for output in request.outputs:
        request.binary_output(str(output.get("name")))


@pytest.fixture(scope="module")
def small_batch_client():
    """Two images a request at most, so that a fuzzed BYTES input is often past the bound
    the codec leaves unread, for the router to refuse."""
    from fastapi.testclient import TestClient

    app = create_app(Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1,
                              max_images_per_request=2))
    with TestClient(app) as client:
        yield client


@given(infer_bodies(), st.sampled_from(["BYTES", "FP32", "INT8"]),
       st.sampled_from(["image", "image_bytes"]))
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_infer_body_is_refused_with_a_4xx_never_a_5xx(small_batch_client, body_and_length,
                                                          datatype, name):
    """Through the router too, both inputs' branches: whatever the codec gives it (an input
    left unread included), a client's broken body gets the protocol's error with a 4xx."""
    body, header_length = body_and_length
    body = body.replace(b'"INT8"', json.dumps(datatype).encode(), 1)
    body = body.replace(b'"name": "image"', f'"name": "{name}"'.encode(), 1)
    # as bytes: '²' is what a server reads from the Latin-1 byte a client may send
    headers = ({"Inference-Header-Content-Length": header_length.encode("latin-1")}
               if header_length else {})
    response = small_batch_client.post("/v2/models/cnn/infer", content=body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize(("body", "header_length", "message"), [
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1000]}]}', None,
     "not INT8 numbers"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [4294967296, 4294967296], '
     b'"data": []}]}', None, "0 values for a shape"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], '
     b'"parameters": "x"}]}', None, "'parameters' must be an object"),
    (b'{"inputs": [], "outputs": [{"name": "p", "parameters": 3}]}', None,
     "'parameters' must be an object"),
    (b'{"inputs": [{"name": "x", "datatype": ["FP32"], "shape": [1], "data": [1]}]}', None,
     "'datatype' must be a string"),
    # '²', as a server decodes the Latin-1 byte 0xb2: a digit to str.isdigit(), not to int()
    (b'{"inputs": []}', "\u00b2", "does not fit"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
], ids=["int8-overflow", "huge-shape", "input-parameters", "output-parameters",
        "datatype-list", "superscript-length", "deep-json"])
def test_the_codecs_edge_cases_are_protocol_errors(body, header_length, message):
    with pytest.raises(ProtocolError, match=message):
        parse_infer_request(body, header_length)


# --- preprocessing: any bytes give the contract or a typed error ----------------------------

def seed_images() -> list[bytes]:
    return [encode(gray_image(40, 30), "PNG"), encode(rgb_image(40, 30), "JPEG"),
            encode(gray_image(40, 30).convert("P"), "GIF"), encode(rgb_image(40, 30), "WEBP"),
            encode(gray_image(40, 30), "TIFF"), encode(rgb_image(40, 30), "BMP"),
            encode(gray_image(40, 30), "TIFF", big_tiff=True),
            encode(rgb_image(40, 30).convert("RGBA"), "PNG"),
            encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40)), "PNG")]


SEEDS = seed_images()
SMALL_LIMITS = ImageLimits(max_bytes=64 * 1024, max_pixels=4_000_000)


def assert_contract_or_typed_error(data: bytes) -> None:
    try:
        result = preprocess_image(data, SMALL_LIMITS)
    except PreprocessingError as exc:
        assert exc.code and str(exc)
        return
    assert result.shape == (INPUT_SIZE, INPUT_SIZE) and result.dtype == np.float32
    assert result.min() >= 0.0 and result.max() <= 1.0


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_the_contract_or_a_typed_error(data):
    assert_contract_or_typed_error(data)


@st.composite
def mutated_images(draw) -> bytes:
    """A real encoded image with bytes flipped, cut, or spliced: deep inside the decoders."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 8))):
        operation = draw(st.sampled_from(["flip", "cut", "splice", "overwrite"]))
        at = rng.randrange(len(data)) if data else 0
        if operation == "flip" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif operation == "cut":
            del data[at:]
        elif operation == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif data:
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                          b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
    return bytes(data)


@given(mutated_images())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_images_give_the_contract_or_a_typed_error(data):
    assert_contract_or_typed_error(data)


@pytest.fixture(scope="module", autouse=True)
def _quiet_pillow_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
