"""The Open Inference Protocol v2, tested with a client nobody here wrote: tritonclient's
``InferenceServerClient``, against the real server, both input forms, JSON and binary."""

from __future__ import annotations

import base64
import gzip
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.classes import NUM_CLASSES
from service.manifest import load_manifest
from service.oip import ProtocolError, parse_infer_request
from service.preprocessing import preprocess_image
from service.settings import REPO_MODELS_DIR, Settings
from tests.api import metric_total
from tests.images import encode, gray_image
from tests.server import running_server

pytestmark = pytest.mark.dataset


@pytest.fixture(scope="module")
def faces(data_settings) -> list[bytes]:
    from training.splits import read_split

    split = read_split(data_settings.splits_dir / "identity.csv")
    names = split[split["split"] == "test"]["image"].iloc[:5]
    return [(data_settings.images_dir / name).read_bytes() for name in names]


@pytest.fixture(scope="module")
def server():
    with running_server(env={"EMOTION_ONNX_THREADS": "1"}) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.removeprefix("http://"))


def predict_probabilities(base: str, faces: list[bytes], model: str) -> np.ndarray:
    response = httpx.post(f"{base}/predict", params={"model": model, "faces": "none"},
                          files=[("files", (f"{i}.jpg", data, "image/jpeg"))
                                 for i, data in enumerate(faces)], timeout=60)
    assert response.status_code == 200
    return np.array([[p["probabilities"][c] for c in p["probabilities"]]
                     for p in response.json()["predictions"]], dtype=np.float32)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    for name in ("cnn", "knn"):
        assert client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        # the versioned ready path (a 404 before): the served version, and no other
        [version] = metadata["versions"]
        assert client.is_model_ready(name, version)
        assert not client.is_model_ready(name, "0" + version)
        # the whole answer: a client sizes its tensors from the shapes, and the README names
        # the version as the first 12 hex digits of the file's SHA-256
        entry = load_manifest(REPO_MODELS_DIR).models[name]
        assert metadata == {
            "name": name, "versions": [entry.sha256[:12]],
            "platform": {"cnn": "onnxruntime_onnx", "knn": "scikit-learn"}[name],
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 350, 350]},
                       {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, NUM_CLASSES]}]}
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("resnet")


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("model", ["cnn", "knn"])
def test_both_input_forms_give_predicts_probabilities(client, server, faces, model, binary):
    expected = predict_probabilities(server, faces, model)
    encoded = triton.InferInput("image_bytes", [len(faces)], "BYTES")
    if binary:
        encoded.set_data_from_numpy(np.array(faces, dtype=np.object_), binary_data=True)
    else:  # JSON carries no raw bytes: each image goes base64-encoded
        encoded.set_data_from_numpy(np.array([base64.b64encode(f) for f in faces],
                                             dtype=np.object_), binary_data=False)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(model, [encoded], outputs=[output])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)

    tensor = np.stack([preprocess_image(f) for f in faces])[:, None]
    image = triton.InferInput("image", list(tensor.shape), "FP32")
    image.set_data_from_numpy(tensor, binary_data=binary)
    result = client.infer(model, [image], outputs=[output])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(faces), NUM_CLASSES)
    np.testing.assert_array_equal(probabilities, expected)
    assert result.get_response()["model_version"] == client.get_model_metadata(model)[
        "versions"][0]


def test_inference_on_a_version_runs_only_the_served_one(client, faces):
    encoded = triton.InferInput("image_bytes", [1], "BYTES")
    encoded.set_data_from_numpy(np.array(faces[:1], dtype=np.object_), binary_data=True)
    [version] = client.get_model_metadata("cnn")["versions"]
    served = client.infer("cnn", [encoded]).as_numpy("probabilities")
    versioned = client.infer("cnn", [encoded], model_version=version)
    np.testing.assert_array_equal(versioned.as_numpy("probabilities"), served)
    with pytest.raises(InferenceServerException, match="has no version '0") as caught:
        client.infer("cnn", [encoded], model_version="0" + version)
    assert caught.value.status() == "404"


def test_client_mistakes_are_400s_with_a_reason(client, faces):
    def infer(inputs, **kwargs):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("cnn", inputs, **kwargs)
        return caught.value

    wrong_shape = triton.InferInput("image", [1, 1, 48, 48], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 1, 48, 48), np.float32))
    error = infer([wrong_shape])
    assert error.status() == "400" and "[N, 1, 350, 350]" in error.message()

    for value in (255, -0.5, np.nan, np.inf):  # below 0 and not finite too, not only above 1
        out_of_range = triton.InferInput("image", [1, 1, 350, 350], "FP32")
        out_of_range.set_data_from_numpy(np.full((1, 1, 350, 350), value, np.float32))
        error = infer([out_of_range])
        assert error.status() == "400" and "[0, 1]" in error.message(), value

    not_an_image = triton.InferInput("image_bytes", [2], "BYTES")
    not_an_image.set_data_from_numpy(np.array([faces[0], b"hello"], dtype=np.object_))
    error = infer([not_an_image])
    assert error.status() == "400" and "image_bytes[1]" in error.message()

    as_bytes = triton.InferInput("image", [1, 1, 350, 350], "BYTES")
    as_bytes.set_data_from_numpy(np.zeros((1, 1, 350, 350), np.object_))
    error = infer([as_bytes])
    assert error.status() == "400" and "input 'image' is FP32" in error.message()

    top_two = triton.InferInput("image_bytes", [1], "BYTES")
    top_two.set_data_from_numpy(np.array([faces[0]], dtype=np.object_))
    error = infer([top_two], outputs=[triton.InferRequestedOutput("probabilities",
                                                                  class_count=2)])
    assert error.status() == "400" and "classification" in error.message()

    unknown = triton.InferInput("pixels", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([faces[0]], dtype=np.object_))
    assert "exactly one input" in infer([unknown]).message()


def test_a_misspelt_parameter_is_refused_and_tritonclients_own_pass(client, faces):
    encoded = triton.InferInput("image_bytes", [1], "BYTES")
    encoded.set_data_from_numpy(np.array(faces[:1], dtype=np.object_), binary_data=True)
    # tritonclient adds priority, timeout and binary_data_output itself: they still run
    result = client.infer("cnn", [encoded], priority=1, timeout=10_000_000,
                          parameters={"faces": "none"})
    assert result.as_numpy("probabilities").shape == (1, NUM_CLASSES)
    # "face" ran the whole image silently, as if faces had not been asked for
    with pytest.raises(InferenceServerException) as caught:
        client.infer("cnn", [encoded], parameters={"face": "auto"})
    assert caught.value.status() == "400" and "['face']" in caught.value.message()

    tensor = triton.InferInput("image", [1, 1, 350, 350], "FP32")
    tensor.set_data_from_numpy(preprocess_image(faces[0])[None, None])
    assert client.infer("cnn", [tensor], parameters={"faces": "none"}).as_numpy(
        "probabilities").shape == (1, NUM_CLASSES)
    # a preprocessed tensor has no face to find: "auto" (or "bogus") was ignored
    for mode in ("auto", "bogus"):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("cnn", [tensor], parameters={"faces": mode})
        assert caught.value.status() == "400" and "goes with input 'image_bytes'" in \
            caught.value.message(), mode


def binary_bytes_request(*elements: bytes) -> tuple[bytes, dict]:
    """A /v2 body of BYTES ``elements`` in the binary extension, with its header."""
    data = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                   "shape": [len(elements)],
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def binary_image_request(raw: bytes) -> tuple[bytes, dict]:
    """A /v2 body of one FP32 ``image`` [1, 1, 350, 350] whose ``raw`` bytes follow the JSON."""
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                   "shape": [1, 1, 350, 350],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


@pytest.fixture(scope="module")
def app_client():
    with TestClient(create_app(Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1,
                                        max_images_per_request=2))) as client:
        yield client


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b"{", {}, "not valid JSON"),
    (b'{"inputs": 3}', {}, "'inputs' list"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 350, 350], '
     b'"data": [0.5]}]}', {}, "1 values for a shape"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
     b'"data": ["%%%"]}]}', {}, "not valid base64"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "does not fit"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 350, 350], '
     b'"parameters": {"binary_data_size": 8}}]}', {"Inference-Header-Content-Length": "whole"},
     "runs past the body"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [0], '
     b'"data": []}]}', {}, "between 1 and 2 images"),
    # elements past the shape: answered as that many images, past the request's limit
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
     b'"data": ["", "", ""]}]}', {}, "3 elements for a shape of 1"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2], '
     b'"data": [""]}]}', {}, "1 elements for a shape of 2"),
    # a last element of no bytes is an empty upload, not a length cut short
    (*binary_bytes_request(encode(gray_image(8, 8)), b""), "image_bytes[1]: the upload is empty"),
    # 32 dimensions are within NumPy's: the contract's shape is what refuses them
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [' + b"1," * 31
     + b'1], "data": [0.5]}]}', {}, "is FP32 [N, 1, 350, 350]"),
    (binary_bytes_request(b"\x89PNG")[0] + b"JUNK", binary_bytes_request(b"\x89PNG")[1],
     "4 bytes of binary data belong to no input"),
    # binary FP32 of a length no whole image has: a short one was a 500 from NumPy, unchecked
    (*binary_image_request(bytes(489_998)), "489998 bytes of binary data for 122500 FP32"),
    (*binary_image_request(bytes(490_004)), "490004 bytes of binary data for 122500 FP32"),
    # a binary_data_size of the wrong type, and binary data without the header that says
    # where the JSON ends: each was "runs past the body", or a UTF-8 decoding error
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 350, 350], '
     b'"parameters": {"binary_data_size": "8"}}]}', {"Inference-Header-Content-Length": "119"},
     "binary_data_size must be a non-negative integer, not '8'"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
     b'"parameters": {"binary_data_size": 8}}]}\x04\x00\x00\x00\x89PNG', {},
     "binary data after the JSON needs the Inference-Header-Content-Length header"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
     b'"parameters": {"binary_data_size": 8}}]}', {},
     "has binary_data_size, but the request has no Inference-Header-Content-Length header"),
    # ... and that hint only then: not for a body that is no JSON, or JSON that is not UTF-8
    (b"\x89PNG\r\n\x1a\n", {}, "not valid JSON: 'utf-8' codec can't decode byte 0x89"),
    (b'{"id": "caf\xe9", "inputs": []}', {}, "codec can't decode byte 0xe9"),
    (b'{"inputs": []}}', {}, "Extra data"),
    # one character past ASCII made Python hold a long string at 4 bytes a character (3.9 GB
    # for a gzip body of 217 KB), raw or escaped; and a string of 224 MB was quoted back whole
    ('{"inputs": [{"name": "' + "A" * 70_000 + '\U0001f600"}]}', {}, "text past ASCII"),
    ('{"inputs": [{"name": "' + "A" * 70_000 + '\\ud83d\\ude00"}]}', {}, "text past ASCII"),
    ('{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["'
     + "A" * 70_000 + '\u00e9"]}]}', {}, "text past ASCII"),
    (b'{"inputs": [{"name": "' + b"A" * 300 + b'", "datatype": "BYTES", "shape": [1], '
     b'"data": [""]}]}', {}, "an input.name is a string of 300 characters; at most 256"),
    (b'{"id": "' + b"i" * 300 + b'", "inputs": []}', {}, "'id' is a string of 300 characters"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "' + b"B" * 300 + b'", "shape": [1]}]}',
     {}, "an input.datatype is a string of 300"),
    (b'{"parameters": {"faces": "' + b"x" * 300 + b'"}, "inputs": []}', {},
     "'parameters'.faces is a string of 300"),
    (b'{"parameters": {"' + b"k" * 300 + b'": 1}, "inputs": []}', {}, "'parameters': a key is"),
    # escaped quotes beside it hid a long string from the search for its ends (2.2 GB), and
    # text past ASCII with no quote near made each search run the whole body (35 s)
    ('{"id": "' + '\\"' * 65 + "\U0001f600" + "A" * 70_000 + '", "inputs": []}', {},
     "text past ASCII outside a string"),
    ("[" + " " * 40_000 + "é" * 2047 + " " * 40_000 + "]", {}, "text past ASCII outside"),
    # a byte-order mark and spaces before the JSON, as json.loads takes them: still told
    (b'\xef\xbb\xbf\n{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
     b'"parameters": {"binary_data_size": 8}}]}\x04\x00\x00\x00\x89PNG', {},
     "binary data after the JSON needs the Inference-Header-Content-Length header"),
    # Latin-1 JSON naming binary data, with nothing after it: not told of a header
    (b'{"id": "\xc3\xa9\xe9", "inputs": [{"name": "image_bytes", "datatype": "BYTES", '
     b'"shape": [1], "parameters": {"binary_data_size": 8}}]}', {}, "decode byte 0xe9"),
    # int() refuses more than 4,300 digits with a ValueError of its own
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "9" * 5000}, "does not fit"),
    (gzip.compress(b'{"inputs": []}')[:-6], {"Content-Encoding": "gzip"}, "cut short"),
    (b"not gzip at all", {"Content-Encoding": "gzip"}, "could not be inflated"),
    (gzip.compress(b'{"inputs": []}') + b"junk", {"Content-Encoding": "gzip"},
     "data after its end"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [""]}],'
     b' "outputs": [{"name": "logits"}]}', {}, "unknown output"),
    (b'{"inputs": [{"name": "image", "datatype": "INT8", "shape": [1], "data": [1000]}]}', {},
     "not INT8 numbers"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [""], '
     b'"parameters": "x"}]}', {}, "'parameters' must be an object"),
    (b"[" * 100_000 + b"]" * 100_000, {}, "arrays (100000)"),  # nesting: refused unparsed
    (b'{"id": ' + b"1" * 5000 + b', "inputs": []}', {}, "not valid JSON"),
    # 3 MB of empty arrays, refused before they become a million Python lists
    (b'{"inputs": [' + b"[]," * 1_000_000 + b"[]]}", {}, "largest allowed batch (2 images)"),
    # JSON numbers only, and a string id (it was echoed back as a Python repr)
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [2], '
     b'"data": ["0.5", "0.5"]}]}', {}, "not FP32 numbers"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [2], '
     b'"data": [0.5, true]}]}', {}, "not FP32 numbers"),
    (b'{"id": {"a": 1}, "inputs": []}', {}, "'id' must be a string"),
    # shapes NumPy cannot make were 500s
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [' + b"1," * 64
     + b'1], "data": [0.5]}]}', {}, "at most 32"),
    # dimensions past int64 (JSON allows 4,299 digits): refused before they are multiplied,
    # which held the GIL for seconds
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": ['
     + b",".join([b"9" * 4299] * 50) + b'], "data": [""]}]}', {}, "int64"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [0, 4611686018427387904, 4],'
     b' "data": []}]}', {}, "cannot be made"),
    # one image with more BYTES elements than a request has images: each was 413 "between 1
    # and 2 images", which sending fewer does not fix
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1, 350, 350], '
     b'"data": []}]}', {}, "input 'image' is FP32"),
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 3], '
     b'"data": ["", "", ""]}]}', {}, "is BYTES [N], got BYTES [1, 3]"),
    (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], '
     b'"data": ["", "", ""]}]}', {}, "exactly one input"),
    # Triton's top-k strings: answered with the FP32 tensor, which such a client misreads
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [""]}],'
     b' "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}', {},
     "classification extension is not supported"),
])
def test_malformed_requests_get_400_and_the_protocols_error_body(app_client, body, headers,
                                                                  message):
    if headers.get("Inference-Header-Content-Length") == "whole":  # a header and no binary
        headers = {"Inference-Header-Content-Length": str(len(body))}
    response = app_client.post("/v2/models/cnn/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]
    if "needs the Inference-Header-Content-Length" not in message:
        assert "needs the Inference-Header-Content-Length" not in response.json()["error"]


BYTES_INPUT = b'{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [""]}'
BIG_LIST = b"[" + b",".join([b"123456789012"] * 100_000) + b"]"  # 1.3 MB


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b'{"parameters": {"faces": ' + BIG_LIST + b'}, "inputs": [' + BYTES_INPUT + b"]}", {},
     "parameter 'faces' is 'none' or 'auto'"),
    (b'{"inputs": [' + BYTES_INPUT + b'], "outputs": [{"name": ' + BIG_LIST + b"}]}", {},
     "unknown output"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "parameters": '
     b'{"binary_data_size": ' + BIG_LIST + b"}}]}", {"Inference-Header-Content-Length": "whole"},
     "binary_data_size must be a non-negative integer"),
    (b'{"inputs": [' + b",".join([b'{"name": "' + b"x" * 250 + b'", "datatype": "FP32", '
                                  b'"shape": [1], "data": [0]}'] * 30) + b"]}", {},
     "exactly one input"),
    (b'{"parameters": {' + b",".join(b'"k%d": 1' % i for i in range(50_000)) + b'}, '
     b'"inputs": [' + BYTES_INPUT + b"]}", {}, "unknown request parameter(s)"),
])
def test_a_value_quoted_in_an_error_is_cut(app_client, body, headers, message):
    """Strings are bounded where they are read, but a list or object quoted in a message came
    back whole: a 1.3 MB list of faces, a 21 MB error body (a review)."""
    if headers:
        headers = {"Inference-Header-Content-Length": str(len(body))}
    response = app_client.post("/v2/models/cnn/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text[:300]
    assert message in response.json()["error"]
    assert len(response.content) < 1000, response.text[:300]


def test_a_header_or_path_quoted_in_an_error_is_cut(app_client):
    """Headers and path segments were quoted whole: a 5 MB Inference-Header-Content-Length
    came back as a 5 MB error body (the diff review)."""
    long = "9" * 5000 + "x" * 1_000_000
    body = b'{"inputs": []}'
    for response, status, says in [
        (app_client.post("/v2/models/cnn/infer", content=body,
                         headers={"Inference-Header-Content-Length": long}), 400, "does not fit"),
        (app_client.post("/v2/models/cnn/infer", content=body,
                         headers={"Content-Encoding": "x" * 300_000}), 415, "Content-Encoding"),
        (app_client.post(f"/v2/models/cnn/versions/{'v' * 30_000}/infer", content=body), 404,
         "has no version"),
        (app_client.post(f"/v2/models/{'m' * 30_000}/infer", content=body), 404,
         "unknown model")]:
        assert response.status_code == status, response.text[:300]
        assert says in response.json()["error"]
        assert len(response.content) < 1000, response.text[:300]


def test_binary_tensors_without_the_header_are_told_so_past_the_json_size_check(app_client):
    """A megabyte of binary data counts as JSON values when the header is missing: the size
    check refused it first, advising the binary extension the client was already using."""
    pixels = np.random.default_rng(0).random((2, 1, 350, 350), dtype=np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                     "shape": [2, 1, 350, 350],
                                     "parameters": {"binary_data_size": len(pixels)}}]})
    response = app_client.post("/v2/models/cnn/infer", content=header.encode() + pixels)
    assert response.status_code == 400, response.text
    assert "needs the Inference-Header-Content-Length header" in response.json()["error"]
    sent_right = app_client.post("/v2/models/cnn/infer", content=header.encode() + pixels,
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    assert sent_right.status_code == 200, sent_right.text


def test_short_text_beyond_ascii_passes_in_a_large_request(app_client, faces):
    """A large request with an id such as 'café-1' (httpx's json= sends UTF-8 as it is) was
    refused by the first rule, which asked that all of a large JSON be ASCII."""
    body = json.dumps({"id": "café-1", "inputs": [{
        "name": "image_bytes", "datatype": "BYTES", "shape": [1],
        "data": [base64.b64encode(faces[0] * 3).decode()]}]}, ensure_ascii=False).encode()
    assert len(body) > 65_536 and not body.isascii()
    response = app_client.post("/v2/models/cnn/infer", content=body)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "café-1"


def test_a_refused_body_is_not_copied_to_say_why():
    """The missing-header hint decoded the whole body again, as text of 2 to 4 bytes per
    byte, outside the body budget: 200 MB of inflated junk took 600 MB more."""
    import tracemalloc

    body = (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
            b'"parameters": {"binary_data_size": 8}}]}' + b"\x80" * 20_000_000)
    def peak_of(call) -> int:
        tracemalloc.start()
        try:
            with pytest.raises(ValueError):
                call()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    refusing = peak_of(lambda: json.loads(body))  # what the parse itself takes to refuse it
    with pytest.raises(ProtocolError, match="needs the Inference-Header-Content-Length"):
        parse_infer_request(body, None)
    telling = peak_of(lambda: parse_infer_request(body, None))
    assert telling < refusing + 1_000_000, f"{telling / 1e6:.0f} MB, {refusing / 1e6:.0f} MB"


def test_any_json_number_is_a_number_of_a_float_tensor():
    body = (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [3], '
            b'"data": [100000000000000000000, 0.5, 2]}]}')
    [tensor] = parse_infer_request(body, None).inputs
    np.testing.assert_array_equal(tensor.value, np.array([1e20, 0.5, 2], dtype=np.float32))


def test_binary_bytes_past_the_declared_shape_are_refused_before_they_pile_up():
    """The binary extension's BYTES, each element a 4-byte length: 224 MB of empty elements
    for a shape of [1] made 37 million bytes objects (2.6 GB) before the count was checked."""
    import tracemalloc

    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4_000_000}}]}).encode()
    body = header + bytes(4_000_000)  # a million elements of length 0
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="more than 1 BYTES elements"):
            parse_infer_request(body, str(len(header)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12e6, f"{peak / 1e6:.0f} MB"  # the body's slices, not a million objects
    huge = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                   "shape": [10**9], "data": []}]}).encode()
    # left unread, for the router to refuse by the input's name, datatype or image count
    assert parse_infer_request(huge, None, max_images=16).inputs[0].value is None


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [3], '
     b'"data": ["", "", ""]}]}', {}, 413, "between 1 and 2 images"),
    # 8 MB of zeros in 8 KB: refused once inflating crosses the limit (6 MB here)
    (gzip.compress(bytes(8_000_000)), {"Content-Encoding": "gzip"}, 413, "inflated request"),
    (b'{"inputs": []}', {"Content-Encoding": "br"}, 415, "not supported"),
])
def test_too_much_is_413_and_an_unknown_encoding_415(body, headers, status, message):
    settings = Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1, max_images_per_request=2,
                        max_upload_bytes=1_000_000)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v2/models/cnn/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]


def test_pixels_written_long_fit_whatever_the_upload_limit():
    """An image's pixels as JSON numbers of 19 characters (float64 as numpy writes them) come
    to 2.45 MB, whatever EMOTION_MAX_UPLOAD_BYTES says of encoded images: answered, not 413
    (a mutant that allowed half as many characters a number failed no test)."""
    settings = Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1, max_images_per_request=1,
                        max_upload_bytes=1000)
    body = ('{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 350, 350], '
            '"data": [' + ", ".join(["0.12345678901234567"] * 350 * 350) + "]}]}").encode()
    assert len(body) > 2_400_000
    with TestClient(create_app(settings)) as client:
        response = client.post("/v2/models/cnn/infer", content=body)
    assert response.status_code == 200, response.text


def test_the_protocols_encodings_fit_in_its_body_limit(faces):
    """Two images at the upload limit, base64 in JSON (a third larger than themselves), and
    a gzip body: answered as the same images are on /predict."""
    noise = np.random.default_rng(3).integers(0, 256, (560, 560), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    large = buffer.getvalue()
    limit = len(large) + 100
    settings = Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1, max_images_per_request=2,
                        max_upload_bytes=limit)
    body = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                                   "data": [base64.b64encode(large).decode()] * 2}]}).encode()
    assert len(body) > settings.max_body_bytes  # what the limit was before
    with TestClient(create_app(settings)) as client:
        plain = client.post("/v2/models/cnn/infer", content=body)
        assert plain.status_code == 200, plain.text
        zipped = client.post("/v2/models/cnn/infer", content=gzip.compress(body),
                             headers={"Content-Encoding": "gzip"})
        assert zipped.status_code == 200, zipped.text
        assert zipped.json()["outputs"] == plain.json()["outputs"]
        on_predict = client.post("/predict", params={"faces": "none"},
                                 files=[("files", ("a.png", large, "image/png"))] * 2).json()
    expected = [list(p["probabilities"].values()) for p in on_predict["predictions"]]
    np.testing.assert_allclose(np.array(plain.json()["outputs"][0]["data"]).reshape(2, -1),
                               expected, atol=1e-6)


def test_tritonclient_can_compress_its_requests(client, server, faces):
    expected = predict_probabilities(server, faces, "cnn")
    encoded = triton.InferInput("image_bytes", [len(faces)], "BYTES")
    encoded.set_data_from_numpy(np.array(faces, dtype=np.object_), binary_data=True)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("cnn", [encoded], request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)


def test_a_wrong_path_or_method_under_v2_has_the_protocols_error_field(app_client):
    for response, status in ((app_client.get("/v2/models/cnn/infer"), 405),
                             (app_client.post("/v2/models/cnn/explain"), 404)):
        assert response.status_code == status
        assert response.json()["error"] == response.json()["detail"]
    assert "error" not in app_client.get("/predict").json()  # /predict keeps its own body


def test_oip_predictions_are_counted_and_a_string_false_is_not_true(app_client, faces):
    def counted() -> float:
        text = app_client.get("/metrics", headers={"accept": "text/plain"}).text
        return metric_total(text, "emotion_predictions_total", model="cnn")

    before = counted()
    request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(f).decode() for f in faces[:2]]}],
               "parameters": {"binary_data_output": "false"},
               "outputs": [{"name": "probabilities", "parameters": {"binary_data": "false"}}]}
    response = app_client.post("/v2/models/cnn/infer", json=request)
    assert response.status_code == 200
    [output] = response.json()["outputs"]  # JSON: the whole body parses, data inline
    assert len(output["data"]) == 2 * NUM_CLASSES
    assert counted() == before + 2  # as /predict counts its answers


@pytest.mark.parametrize(("request_level", "own", "binary"), [
    (True, None, True), (True, False, False), (None, True, True), (False, None, False),
    ("false", None, False), ("true", None, False)])  # JSON true only, at each level
def test_an_output_named_without_binary_data_follows_the_request(
        app_client, faces, request_level, own, binary):
    """binary_data_output is the default of every output that does not say for itself. The
    body's content type says which layout it is, and an empty id is echoed as any other."""
    output = {"name": "probabilities"} if own is None else {
        "name": "probabilities", "parameters": {"binary_data": own}}
    request = {"id": "", "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "data": [base64.b64encode(faces[0]).decode()]}],
               "outputs": [output]}
    if request_level is not None:
        request["parameters"] = {"binary_data_output": request_level}
    response = app_client.post("/v2/models/cnn/infer", json=request)
    assert response.status_code == 200, response.text
    header_length = response.headers.get("inference-header-content-length")
    if binary:
        assert response.headers["content-type"] == "application/octet-stream"
        header = json.loads(response.content[:int(header_length)])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == NUM_CLASSES * 4
        data = np.frombuffer(response.content[int(header_length):], dtype="<f4")
        assert data.shape == (NUM_CLASSES,) and data.sum() == pytest.approx(1, abs=1e-5)
    else:
        assert response.headers["content-type"] == "application/json"
        assert header_length is None
        header = response.json()
        assert len(header["outputs"][0]["data"]) == NUM_CLASSES
    assert header["id"] == ""


def test_an_inflating_body_is_refused_by_the_budget_before_it_is_inflated():
    """A 200 kB gzip body inflates to 200 MB: the budget is asked before each step, so a
    refusal costs a step (1 MiB), not the whole inflated body."""
    import tracemalloc

    from service.oip import TooLargeError, decode_content

    class Full(Exception):
        pass

    def hold(size: int) -> None:
        if size > 10_000_000:
            raise Full(size)

    bomb = gzip.compress(bytes(200_000_000), compresslevel=9)
    tracemalloc.start()
    try:
        with pytest.raises(Full):
            decode_content(bomb, "gzip", 300_000_000, hold=hold)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 15_000_000  # whatever INFLATE_STEP says
    # and past the limit with the budget to spare: at 1 GiB steps, 449 MB before the 413
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError):
            decode_content(bomb, "gzip", 6_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12_000_000
    # and bodies that take many steps inflate whole, to the byte
    payload = np.random.default_rng(0).integers(0, 4, 5_000_000, dtype=np.uint8).tobytes()
    assert bytes(decode_content(gzip.compress(payload), "gzip", 6_000_000)) == payload


def test_an_inflated_body_is_held_to_its_limit_to_the_byte_and_counted_whole():
    """At the limit exactly a body inflates, a byte past it or a step past it is refused;
    the budget is told the compressed body too, and never more than body + limit + 1;
    the encoding's name is read as HTTP reads it, in any case, and x-gzip is gzip."""
    from service.oip import TooLargeError, decode_content

    limit = 5_000_000
    payload = np.random.default_rng(1).integers(0, 256, limit, dtype=np.uint8).tobytes()
    compressed = gzip.compress(payload)
    held: list[int] = []
    assert bytes(decode_content(compressed, "gzip", limit, hold=held.append)) == payload
    assert min(held) > len(compressed)
    assert max(held) == len(compressed) + limit + 1
    for extra in (1, 500_000):
        with pytest.raises(TooLargeError, match="over the limit of 5,000,000 bytes"):
            decode_content(gzip.compress(payload + bytes(extra)), "gzip", limit)
    for name in ("GZIP", "x-gzip", " X-Gzip "):
        assert bytes(decode_content(compressed, name, limit)) == payload


def test_a_header_length_of_no_ascii_digits_or_past_the_body_is_refused():
    """'²' is a digit to str.isdigit() and not to int(): through uvicorn it was a 500 when
    the isascii() check was dropped (TestClient cannot send such a header)."""
    from service.oip import ProtocolError, parse_infer_request

    body = b'{"inputs": []}'
    for header in ("\u00b2", "", " 1", str(len(body) + 1)):
        with pytest.raises(ProtocolError, match="does not fit the body of 14 bytes"):
            parse_infer_request(body, header)
    assert parse_infer_request(body, str(len(body))).inputs == []


def test_faces_parameter_finds_the_face_as_predict_does(app_client, faces):
    photo = gray_image(640, 480, seed=3)
    face = Image.open(io.BytesIO(faces[0])).convert("L").resize((220, 220))
    photo.paste(face, (200, 120))
    data = encode(photo, "JPEG", quality=92)
    request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(data).decode()]}],
               "parameters": {"faces": "auto"}}
    oip = app_client.post("/v2/models/cnn/infer", json=request).json()["outputs"][0]["data"]
    predicted = app_client.post("/predict", params={"faces": "auto"},
                                files={"file": ("p.jpg", data, "image/jpeg")}).json()
    assert predicted["predictions"][0]["face"] is not None
    assert oip == list(predicted["predictions"][0]["probabilities"].values())


@pytest.mark.parametrize("place", ["input", "output", "query"])
def test_faces_anywhere_but_the_requests_parameters_is_refused_not_ignored(app_client, faces,
                                                                           place):
    """'faces' on the input (KServe's InferInput(parameters=...)), on an output, or in the
    query as /predict takes it ran the whole image with 200, not the face (a review)."""
    request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(faces[0]).decode()]}],
               "outputs": [{"name": "probabilities"}]}
    params = None
    if place == "query":
        params = {"faces": "auto"}
    else:
        request[f"{place}s"][0]["parameters"] = {"faces": "auto"}
    response = app_client.post("/v2/models/cnn/infer", json=request, params=params)
    assert response.status_code == 400, response.text
    assert "'faces'" in response.json()["error"]
    assert "among the request's parameters" in response.json()["error"]
    # the protocol's own parameters of an input and an output still pass
    request = {"inputs": [{**request["inputs"][0], "parameters": {"content_type": "base64"}}],
               "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    assert app_client.post("/v2/models/cnn/infer", json=request).status_code == 200


def test_base64_as_encoders_write_it_is_read(app_client, faces):
    """Line-wrapped (MIME, openssl), unpadded and URL-safe base64 were refused as "not valid
    base64" (a review): each decodes to the same image."""
    data = faces[0] + b"\xfb\xff"  # bytes after a JPEG's end: '+', '/' and padding in base64
    standard = base64.b64encode(data).decode()
    assert "+" in standard or "/" in standard
    forms = [standard, base64.encodebytes(data).decode(), standard.rstrip("="),
             base64.urlsafe_b64encode(data).decode().rstrip("="),
             "\r\n".join(standard[i:i + 64] for i in range(0, len(standard), 64)),
             {"b64": standard}]  # the object some clients send, as the docstring says
    outputs = []
    for text in forms:
        request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                               "data": [text]}], "parameters": {"faces": "none"}}
        response = app_client.post("/v2/models/cnn/infer", json=request)
        assert response.status_code == 200, (str(text)[:80], response.text)
        outputs.append(response.json()["outputs"][0]["data"])
    assert all(output == outputs[0] for output in outputs)
    # still refused: not base64 at all, cut, of two alphabets, or spaced by other than lines
    for text in ("%%%", "QQ=A", "Q", "ab+-", "a/b_", "QUJD\x1cRA==\n", "QUJD\x0bRA== "):
        request["inputs"][0]["data"] = [text]
        response = app_client.post("/v2/models/cnn/infer", json=request)
        assert response.status_code == 400 and "not valid base64" in response.json()["error"]


IMAGES_2 = [2, 1, 350, 350]


@pytest.mark.parametrize(("shape", "data"), [
    (IMAGES_2, [[0.5] * 10, [0.5] * (2 * 350 * 350 - 10)]),  # ragged rows, the right count
    (IMAGES_2, [[0.5] * 350 * 350, [0.5] * 350 * 350]),      # nested, but not as the shape
    ([1], [[], 0.5]),                 # an empty list and a value beside it
    ([2, 1], [[[0.5]], [[0.5]]]),     # a level deeper than the shape
    ([2, 1], [[0.5], 0.5]),           # a value beside a row
])
def test_data_nested_otherwise_than_its_shape_is_refused(shape, data):
    """A ragged or otherwise-shaped nesting was read as its values in order: a client's cut
    or transposed rows got an answer as if right (a review)."""
    body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": shape,
                                   "data": data}]}).encode()
    with pytest.raises(ProtocolError, match="nested, but not as its shape"):
        parse_infer_request(body, None)


@pytest.mark.parametrize("shape", [[2, 1, 3, 4], [2, 0, 3], [1, 0, 350, 350], [3, 0]])
def test_data_nested_as_its_shape_or_flat_is_read_the_same(shape):
    """A dimension of 0 nests no deeper ([2, 0, 3] is [[], []]): it was taken as not
    nested as its shape (the second diff review)."""
    values = np.random.default_rng(0).random(shape).round(3)
    read = []
    for data in (values.tolist(), values.ravel().tolist()):
        body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                       "shape": shape, "data": data}]}).encode()
        read.append(parse_infer_request(body, None).inputs[0].value)
    assert read[0].shape == tuple(shape) and np.array_equal(read[0], read[1])
    assert np.allclose(read[0], values)
