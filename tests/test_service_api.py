"""The HTTP API end to end through TestClient, on the shipped models and real images."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import re
import threading

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.classes import CLASS_NAMES
from service.manifest import ManifestError, load_manifest, sha256_bytes
from service.preprocessing import byte_count, preprocess_image
from service.settings import REPO_MODELS_DIR, Settings
from tests.api import assert_error, metric_total, models_copy, tampered_copy
from tests.images import encode, png_bytes


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def faces(data_settings) -> dict[str, bytes]:
    """A few real test-split images, colour and grayscale."""
    from training.splits import read_split

    split = read_split(data_settings.splits_dir / "identity.csv")
    test = split[split["split"] == "test"]
    names = [*test["image"].iloc[:3], *test[test["image"].str.match(r"^[A-Z][a-z]+[A-Z]")]
             ["image"].iloc[:1]]
    return {name: (data_settings.images_dir / name).read_bytes() for name in names}


def post_file(client, data: bytes, name="face.jpg", ctype="image/jpeg", model=None):
    params = {"model": model} if model else {}
    return client.post("/predict", params=params, files={"file": (name, data, ctype)})


def test_health_classes_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    classes = client.get("/classes").json()
    assert classes == [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES)]
    models = {m["name"]: m for m in client.get("/models").json()}
    assert set(models) == {"cnn", "knn"}
    assert all(m["loaded"] and len(m["sha256"]) == 64 for m in models.values())
    assert {name: m["default"] for name, m in models.items()} == {"cnn": True, "knn": False}
    # What a user compares models by is the manifest's own figures, read here as plain JSON.
    shipped = json.loads((REPO_MODELS_DIR / "manifest.json").read_text())["models"]
    for name, model in models.items():
        assert model["sha256"] == shipped[name]["sha256"]
        assert model["test_macro_f1"] == {
            dataset: by_subset["test"]["macro_f1"]
            for dataset, by_subset in shipped[name]["metrics"].items()}
        assert set(model["test_macro_f1"]) == {"identity", "fer2013"}


@pytest.mark.parametrize("path", ["/", "/static/index.html", "/static/app.js"])
def test_the_page_has_its_headers_wherever_it_is_served(client, path):
    """The page was also at /static/index.html, without its CSP and framing refusal."""
    response = client.get(path)
    assert response.status_code == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    # revalidated on every load: browsers kept an old app.js under a new page after upgrades
    assert response.headers["cache-control"] == "no-cache"
    if path.startswith("/static/"):  # cheaply, by its ETag
        again = client.get(path, headers={"if-none-match": response.headers["etag"]})
        assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/docs-assets/swagger-ui.css",
                                  "/examples/two_people.jpg"])
def test_a_file_is_sent_whole_whatever_its_range(client, path):
    """Starlette answered a malformed or unsatisfiable Range in plain text (400, 416), where
    every error body here is JSON (a review): these small files are sent whole instead."""
    whole = client.get(path)
    assert whole.status_code == 200 and "accept-ranges" not in whole.headers
    for given in ("bytes=5-1,zz", "bytes=abc", "bytes=99999999-", "bytes=0-10"):
        answer = client.get(path, headers={"range": given})
        assert answer.status_code == 200 and answer.content == whole.content, given


def test_every_answer_refuses_content_sniffing(client):
    """An error echoes a client's file name; a JSON answer sniffed as HTML would run it."""
    answers = [client.get("/metrics"), client.get("/static/nope.js"), client.get("/predict"),
               client.get("/docs"), post_file(client, b"<html><script>x</script>", "a.html")]
    assert [a.status_code for a in answers] == [200, 404, 405, 200, 400]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["referrer-policy"] == "no-referrer"
    # the page's own values are kept, not doubled
    page = client.get("/")
    assert page.headers.get_list("x-content-type-options") == ["nosniff"]


def test_openapi_documents_the_contract(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "350x350" in predict["description"] and "face crop" in predict["description"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"400", "413", "415", "422"} <= set(predict["responses"])
    assert "too_many_fields" in predict["responses"]["422"]["description"]
    # FastAPI's own 422 body ({"detail": [...]}) is never sent: the service's is ErrorBody,
    # and routes with only path strings cannot fail validation (the docs review)
    assert "HTTPValidationError" not in json.dumps(spec)
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}", "/examples/{name}"):
        assert "422" not in next(iter(spec["paths"][path].values()))["responses"]
    assert client.get("/docs").status_code == 200


def test_admission_control_counts_every_route_that_runs_a_model(client):
    """Its routes are templates written out by hand: a path parameter renamed in a router
    would have switched it off for that route without a word (a code review)."""
    from service.middleware import LIMITED_ROUTES

    paths = client.get("/openapi.json").json()["paths"]
    assert {path for path, methods in paths.items() if "post" in methods} == set(LIMITED_ROUTES)


@pytest.mark.parametrize("model", ["cnn", "knn"])
def test_single_prediction_matches_running_the_model_directly(client, faces, model, settings):
    manifest = load_manifest(settings.models_dir)
    name, data = next(iter(faces.items()))
    response = post_file(client, data, name, model=model)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model and body["model_sha256"] == manifest.models[model].sha256
    (prediction,) = body["predictions"]
    probs = np.array([prediction["probabilities"][c] for c in CLASS_NAMES])
    assert prediction["filename"] == name
    assert prediction["label"] == CLASS_NAMES[int(probs.argmax())] == \
        CLASS_NAMES[prediction["label_id"]]
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    image = preprocess_image(data)
    if model == "cnn":
        session = ort.InferenceSession(str(settings.models_dir / manifest.models["cnn"].file))
        expected = session.run(["probabilities"], {"image": image[None, None]})[0][0]
    else:
        import joblib

        pipeline = joblib.load(settings.models_dir / manifest.models["knn"].file)
        expected = pipeline.predict_proba(image.reshape(1, -1))[0]
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_raw_body_prediction_equals_multipart(client, faces):
    data = next(iter(faces.values()))
    raw = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
    form = post_file(client, data)
    assert raw.status_code == 200
    assert raw.json()["predictions"][0]["filename"] is None
    assert raw.json()["predictions"][0]["probabilities"] == form.json()["predictions"][0][
        "probabilities"]


def test_batch_is_predicted_and_a_bad_image_does_not_sink_it(client, faces):
    files = [("files", (name, data, "image/jpeg")) for name, data in faces.items()]
    files.insert(1, ("files", ("notes.jpg", b"this is not an image", "image/jpeg")))
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [f[1][0] for f in files]
    assert predictions[1]["code"] == "not_an_image" and predictions[1]["label"] is None
    # first of the batch, too: a 400 is for a request of that one image alone
    bad_first = client.post("/predict", files=[files[1], files[0]])
    assert bad_first.status_code == 200, bad_first.text
    assert [(p["code"], bool(p["label"])) for p in bad_first.json()["predictions"]] == [
        ("not_an_image", False), (None, True)]
    for (name, data), prediction in zip(faces.items(), [predictions[0], *predictions[2:]],
                                        strict=True):
        single = post_file(client, data, name).json()["predictions"][0]
        assert prediction["label"] == single["label"]
        for c in CLASS_NAMES:
            assert prediction["probabilities"][c] == pytest.approx(
                single["probabilities"][c], abs=1e-5)


def test_limits_give_413(settings, faces):
    data = next(iter(faces.values()))
    small = settings.model_copy(update={"max_upload_bytes": len(data) - 1})
    with TestClient(create_app(small)) as limited:
        assert_error(post_file(limited, data), 413, "too_many_bytes")
        raw = limited.post("/predict", content=data, headers={"content-type": "image/jpeg"})
        assert_error(raw, 413, "too_many_bytes")
    # at the limit, to the byte: taken by each way in (three comparisons, each once >=), with
    # one image allowed, so that the multipart framing around it must fit in the body's limit
    exact = settings.model_copy(update={"max_upload_bytes": len(data),
                                        "max_images_per_request": 1})
    with TestClient(create_app(exact)) as limited:
        assert post_file(limited, data).status_code == 200
        for content in (data, iter([data[:1000], data[1000:]])):  # with a length, chunked
            assert limited.post("/predict", content=content, headers={
                "content-type": "image/jpeg"}).status_code == 200
    # sizes read as people read them: "10485760 bytes" was the default limit's message
    big = settings.model_copy(update={"max_upload_bytes": 10 * 2**20})
    with TestClient(create_app(big)) as client:
        answer = post_file(client, bytes(10 * 2**20 + 1))
    assert_error(answer, 413, "too_many_bytes")
    assert "10,485,760 bytes (10 MiB)" in answer.json()["detail"]
    # a body past the whole request's limit: told only that limit (160.1 MiB by default), a
    # user sent 150 MB and was refused again at 10 MiB
    few_small = settings.model_copy(update={"max_upload_bytes": 1000,
                                            "max_images_per_request": 2})
    with TestClient(create_app(few_small)) as client:
        answer = post_file(client, bytes(few_small.max_body_bytes + 1))
    assert_error(answer, 413, "too_many_bytes")
    assert answer.json()["detail"].endswith(
        f"the limit of {byte_count(few_small.max_body_bytes)}: at most 2 images of 1,000 "
        "bytes each"), answer.json()["detail"]
    assert byte_count(1_610_612_736) == "1,610,612,736 bytes (1.5 GiB)"  # was 1.54e+03 MiB
    assert byte_count(999) == "999 bytes"
    assert byte_count(2**30 - 1) == "1,073,741,823 bytes (1 GiB)"  # not 1,024 MiB
    few = settings.model_copy(update={"max_pixels": 100 * 100})
    with TestClient(create_app(few)) as limited:
        assert_error(post_file(limited, png_bytes(101, 100)), 413, "too_many_pixels")
        assert post_file(limited, png_bytes(100, 100)).status_code == 200


@pytest.mark.parametrize(("declared", "refused"), [
    ("0" * 5000 + "5", False),  # 5 bytes: int() of its 5,001 digits raised, a 500
    ("1" * 5000, True), ("00000000000000000000000020000000", True)])
def test_a_content_length_of_many_digits_is_read_not_a_500(declared, refused):
    from starlette.requests import Request

    from service.errors import ApiError
    from service.uploads import check_content_length

    request = Request({"type": "http", "headers": [(b"content-length", declared.encode())]})
    if refused:
        with pytest.raises(ApiError) as caught:
            check_content_length(request, 10 * 2**20)
        assert caught.value.status == 413
    else:
        check_content_length(request, 10 * 2**20)


def test_request_errors(client, settings):
    image = png_bytes()
    assert_error(client.post("/predict", content=b"x", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/predict", content=image), 415, "unsupported_media_type")
    assert_error(post_file(client, image, model="resnet9000"), 422, "unknown_model")
    assert_error(client.post("/predict", files={"image": ("a.png", image, "image/png")}),
                 422, "no_file")
    assert_error(client.post("/predict", data={"file": "not a file"},
                             files={"other": ("a.txt", b"x", "text/plain")}), 422, "not_a_file")
    too_many = [("files", (f"{i}.png", image, "image/png"))
                for i in range(settings.max_images_per_request + 1)]
    assert_error(client.post("/predict", files=too_many), 422, "too_many_files")
    # 2.8 million parts besides the images cost a worker 47 s (a review); 1,000 still pass
    fields = {f"field{i}": "" for i in range(1000)}
    upload = {"file": ("a.png", image, "image/png")}
    assert client.post("/predict", data=fields, files=upload).status_code == 200
    assert_error(client.post("/predict", data={**fields, "one more": ""}, files=upload), 422,
                 "too_many_fields")
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.delete("/predict"), 405, "method_not_allowed")
    # a client's value is quoted cut: a 5 MB content type came back as a 5 MB 415 (a review)
    for response in (
            client.post("/predict", content=image, headers={"content-type": "x" * 5_000_000}),
            client.post("/predict", content=image, headers={"content-type": "image/png",
                                                            "content-encoding": "x" * 300_000}),
            client.post("/predict", params={f"p{i}": "" for i in range(5000)}, content=image,
                        headers={"content-type": "image/png"}),
            post_file(client, image, model="m" * 30_000)):
        assert response.status_code in (415, 422), response.text[:300]
        assert len(response.content) < 1000, response.text[:300]
    missing = client.get("/examples/" + "a" * 30_000)  # the page's photos (the diff review)
    assert missing.status_code == 404 and len(missing.content) < 1000


def test_a_rejected_image_does_not_hold_its_requests_uploads(client):
    """A rejected image's error kept its traceback, whose frames led back to the batch: each
    request with one bad image held all its uploads until a full collection (47 MB more per
    request of 16 files of 9 MB; the diff review). With the collector off, a batch with a
    bad image now grows memory as one without does (other cycles of the test client's)."""
    import gc

    from tests.api import status_kib

    good = png_bytes() + bytes(9_000_000)  # a PNG with 9 MB after its end still decodes
    bad = b"\x89PNG\r\n\x1a\n" + bytes(9_000_000)
    grown = {}
    for last in (good, bad):
        files = [("files", (f"{i}.png", data, "image/png"))
                 for i, data in enumerate([good, good, good, last])]
        gc.collect()
        gc.disable()
        try:
            before = status_kib(os.getpid(), "VmRSS")
            for _ in range(8):
                assert client.post("/predict", files=files).status_code == 200
            grown[last is bad] = status_kib(os.getpid(), "VmRSS") - before
        finally:
            gc.enable()
            gc.collect()
    assert grown[True] < grown[False] + 100_000, grown  # 8 x 36 MB more before


def test_metrics_json_has_evaluation_and_live_counters(client, faces):
    post_file(client, next(iter(faces.values())))
    body = client.get("/metrics").json()
    for accept in ("application/json", "*/*"):
        other = client.get("/metrics", headers={"accept": accept})
        assert other.headers["content-type"] == "application/json"
        assert set(other.json()) == {"models", "live"}
    shipped = json.loads((REPO_MODELS_DIR / "manifest.json").read_text())["models"]
    assert {name: (m["sha256"], m["summary"]) for name, m in body["models"].items()} == {
        name: (m["sha256"], m["summary"]) for name, m in shipped.items()}
    cnn = body["models"]["cnn"]["metrics"]
    assert {"identity"} <= set(cnn) and {"val", "test"} <= set(cnn["identity"])
    test = cnn["identity"]["test"]
    assert set(test["per_class"]) == set(CLASS_NAMES) and len(test["confusion_matrix"]) == 8
    live = body["live"]["emotion_http_requests"]
    assert any(r["route"] == "/predict" and r["status"] == "200" and r["value"] >= 1
               for r in live)


def _samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.mark.parametrize("accept", ["text/plain; version=0.0.4",
                                    "application/openmetrics-text; version=1.0.0"])
def test_prometheus_exposition_and_counters_move(client, faces, accept):
    before = client.get("/metrics", headers={"accept": accept})
    assert before.status_code == 200
    assert before.headers["content-type"].startswith(accept.split(";")[0])
    [answer] = post_file(client, next(iter(faces.values()))).json()["predictions"]
    post_file(client, b"junk")
    after = _samples(client.get("/metrics", headers={"accept": accept}).text)
    first = _samples(before.text)
    model = (("model", "cnn"),)
    predicted = ("emotion_predictions_total", (("label", answer["label"]), *model))
    assert after[predicted] == first.get(predicted, 0) + 1
    top = ("emotion_top_probability_sum", model)
    assert after[top] - first.get(top, 0) == pytest.approx(
        answer["probabilities"][answer["label"]], abs=1e-3)
    key = ("emotion_http_requests_total",
           (("method", "POST"), ("route", "/predict"), ("status", "200")))
    assert after[key] == first.get(key, 0) + 1
    rejected = ("emotion_rejected_inputs_total", (("reason", "not_an_image"),))
    assert after[rejected] == first.get(rejected, 0) + 1
    names = {name for name, _ in after}
    for wanted in ("emotion_http_request_duration_seconds_bucket",
                   "emotion_inference_duration_seconds_bucket",
                   "emotion_images_per_request_bucket", "emotion_predictions_total",
                   "emotion_top_probability_bucket", "emotion_model_info",
                   "emotion_model_eval_macro_f1"):
        assert wanted in names, wanted
    # one worker served a `_created` gauge beside each counter and histogram, which several
    # workers (prometheus-client's multiprocess mode) never do: two expositions by worker count
    assert not {name for name in names if name.endswith("_created")}


@pytest.mark.parametrize(("accept", "prometheus"), [
    # Prometheus's own scrape header, and OpenMetrics alone
    ("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,"
     "*/*;q=0.1", True),
    ("text/plain", True),
    # axios's default: JSON named first, at the same weight
    ("application/json, text/plain, */*", False),
    ("application/json;q=1, text/plain;q=0.5", False),
    ("text/plain;q=0.9, application/json;q=0.5", True),
    ("text/plain;q=0, application/json;q=0.1", False),  # q=0: not acceptable
    ("text/plain;q=oops", True),
    ("*/*", False), ("text/html,application/xhtml+xml", False), (None, False),
])
def test_metrics_answer_the_format_the_client_ranks_first(client, accept, prometheus):
    response = client.get("/metrics", headers={"accept": accept} if accept else {})
    assert response.status_code == 200
    kind = response.headers["content-type"].split(";")[0]
    assert (kind != "application/json") == prometheus, kind


def test_a_trailing_slash_is_a_json_404_naming_the_path_without_it(client):
    """Starlette redirected it, 307 with no body, to an http:// Location built from Host:
    behind a proxy ending TLS, a client was sent to post its photo in the clear (a review)."""
    for method, path, body in (("POST", "/predict/", None), ("GET", "/healthz/", None),
                               ("POST", "/v2/models/cnn/infer/", b"{}"), ("GET", "/v2//", None)):
        answer = client.request(method, path, content=body, follow_redirects=False,
                                headers={"host": "emotion.example", "x-forwarded-proto": "https"})
        assert_error(answer, 404, "not_found")
        assert "location" not in answer.headers
        assert answer.json()["detail"].endswith(
            f"paths end without a slash: {path.rstrip('/')!r}")
        assert path.startswith("/v2") == ("error" in answer.json())  # the protocol's field
    # no hint where the path without its slash serves nothing to this method, or only a
    # mount's 404 (the diff review)
    for path in ("/no/such/", "/predict/", "/static/nosuch.js/"):
        assert client.get(path).json()["detail"] == "Not Found", path


def test_metric_labels_stay_bounded_whatever_clients_send(client):
    """Paths are their route templates or "unmatched", methods a fixed set or "other"."""
    for method, path in (("PROPFIND", "/healthz"), ("MKCOL", "/x/y"), ("GET", "/no/such"),
                         ("POST", "/v2/models/no-such-model/infer"), ("PURGE", "/predict")):
        assert client.request(method, path).status_code < 500
    text = client.get("/metrics", headers={"accept": "text/plain"}).text
    labels = [s.labels for family in text_string_to_metric_families(text)
              for s in family.samples if s.name == "emotion_http_requests_total"]
    assert {"PROPFIND", "MKCOL", "PURGE"}.isdisjoint(label["method"] for label in labels)
    assert metric_total(text, "emotion_http_requests_total", method="other") >= 3
    routes = {label["route"] for label in labels}
    assert not routes & {"/x/y", "/no/such"} and "unmatched" in routes
    assert "/v2/models/{name}/infer" in routes


def test_an_unreadable_metrics_version_gets_plain_text_not_a_500(client):
    for accept in ("text/plain; version=abc", "application/openmetrics-text; version=x.y"):
        response = client.get("/metrics", headers={"accept": accept})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "emotion_http_requests_total" in response.text


@pytest.mark.parametrize(("broken", "healthy"), [("knn", "cnn"), ("cnn", "knn")])
def test_a_tampered_artifact_is_refused_and_the_other_model_serves(
        tmp_path, settings, monkeypatch, broken, healthy):
    manifest = load_manifest(REPO_MODELS_DIR)
    folder = tampered_copy(tmp_path, manifest.models[broken].file)
    loaded = []
    import joblib
    import onnxruntime

    # What each loader is handed, by SHA-256 (the face detector's networks load too).
    real_joblib, real_session = joblib.load, onnxruntime.InferenceSession
    monkeypatch.setattr(joblib, "load", lambda file, *a, **k: loaded.append(
        sha256_bytes(file.getvalue())) or real_joblib(file, *a, **k))
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda data, *a, **k: loaded.append(
        sha256_bytes(data)) or real_session(data, *a, **k))
    with TestClient(create_app(settings.model_copy(update={"models_dir": folder}))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "refused" in ready.json()["models"][broken]
        assert ready.json()["models"][healthy] == "ready"
        assert manifest.models[healthy].sha256 in loaded
        assert sha256_bytes((folder / manifest.models[broken].file).read_bytes()) not in loaded
        listed = {m["name"]: m["loaded"] for m in client.get("/models").json()}
        assert listed == {broken: False, healthy: True}
        v2_ready = client.get("/v2/health/ready")
        assert v2_ready.status_code == 400 and v2_ready.json() == {"ready": False}
        assert_error(post_file(client, png_bytes(), model=broken), 503, "model_unavailable")
        assert post_file(client, png_bytes(), model=healthy).status_code == 200
        # The Open Inference Protocol says the same, in its own error shape.
        request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(png_bytes()).decode()]}]}
        for oip in (client.get(f"/v2/models/{broken}"),
                    client.post(f"/v2/models/{broken}/infer", json=request)):
            assert oip.status_code == 503 and "not available" in oip.json()["error"], oip.text
            assert int(oip.headers["retry-after"]) > 0
        # a version it never had is no reason to retry, refused or not
        for oip in (client.get(f"/v2/models/{broken}/versions/nosuch"),
                    client.get(f"/v2/models/{broken}/versions/nosuch/ready"),
                    client.post(f"/v2/models/{broken}/versions/nosuch/infer", json=request)):
            assert oip.status_code == 404 and "has no version 'nosuch'" in oip.json()["error"]
        assert client.post(f"/v2/models/{healthy}/infer", json=request).status_code == 200


@pytest.mark.parametrize(("field", "value", "says"), [
    # a models folder exported after a preprocessing change, mounted into an older image
    ("preprocessing_version", "2", "built for preprocessing version 2, this service runs 1"),
    ("bytes", 1, "bytes, the manifest says 1; refused"),
    # allocated before the file's size was checked: MemoryError or OverflowError, the start-up
    # and the other model gone (the mutation review)
    ("bytes", 1 << 40, "bytes, the manifest says 1099511627776; refused"),
    ("bytes", 1 << 64, f"bytes, the manifest says {1 << 64}; refused"),
    # /models publishes these shapes: an edited one stayed ready
    ("input", {"name": "image", "dtype": "float32", "shape": ["N", 1, 48, 48]},
     "the contract is float32 ['N', 1, 350, 350] -> float32 ['N', 8]; refused"),
    # the batch fixed, or another type: published as such (the whole-diff review)
    ("input", {"name": "image", "dtype": "float32", "shape": [1, 1, 350, 350]},
     "gives emotion_cnn.onnx float32 [1, 1, 350, 350] -> float32 ['N', 8], the contract"),
    ("output", {"name": "probabilities", "dtype": "uint8", "shape": ["N", 8]},
     "-> uint8 ['N', 8], the contract"),
    # no shape at all: an IndexError that stopped the start-up, the other model too
    ("output", {"name": "probabilities", "dtype": "float32", "shape": []},
     "-> float32 [], the contract")])
def test_a_model_the_manifest_misdescribes_is_refused(tmp_path, settings, field, value, says):
    folder = models_copy(tmp_path)
    edit_model_entry(folder, "cnn", **{field: value})
    assert_only_the_cnn_refused(settings, folder, says)


def edit_model_entry(folder, model: str, **fields) -> None:
    """Set ``fields`` of ``model``'s entry in ``folder``'s manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["models"][model].update(fields)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def assert_only_the_cnn_refused(settings, folder, says: str) -> None:
    """Served from ``folder``: the cnn refused for ``says``, the knn ready beside it."""
    with TestClient(create_app(settings.model_copy(update={"models_dir": folder}))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert says in ready.json()["models"]["cnn"] and ready.json()["models"]["knn"] == "ready"
        assert_error(post_file(client, png_bytes(), model="cnn"), 503, "model_unavailable")


@pytest.mark.parametrize("kind", ["huge", "fifo", "device"])
def test_what_is_no_model_file_is_refused_from_its_metadata(tmp_path, settings, kind):
    """A stray file was read whole before its size was checked (a terabyte: MemoryError, the
    start-up and the other model gone), a FIFO under the model's name held the start-up for
    ever, and /dev/zero read until memory ran out (the model-loading review)."""
    folder = models_copy(tmp_path)
    cnn = folder / "emotion_cnn.onnx"
    cnn.unlink()
    if kind == "huge":
        with cnn.open("wb") as handle:
            handle.truncate(1 << 40)  # sparse: no disk
        says = f"has {1 << 40} bytes, the manifest says 330770; refused without loading"
    else:
        os.mkfifo(cnn) if kind == "fifo" else cnn.symlink_to("/dev/zero")
        says = "emotion_cnn.onnx is not a regular file; refused without loading"
    assert_only_the_cnn_refused(settings, folder, says)


def test_a_manifest_or_detector_that_is_no_regular_file_is_one_line(tmp_path, settings):
    folder = models_copy(tmp_path)
    (folder / "face_pnet.onnx").unlink()
    os.mkfifo(folder / "face_pnet.onnx")
    with TestClient(create_app(settings.model_copy(update={"models_dir": folder}))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "face_pnet.onnx is not a regular file" in ready.json()["faces"]
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json is not a regular file"):
        load_manifest(folder)


# Networks answering the same row for every image, under the contract's names: rows that
# are no probabilities, and one whose rows are but in float64.
CONSTANT_ROWS = {"logits": [61.25] * 8, "outside_0_1": [1.5, -0.5, 0, 0, 0, 0, 0, 0],
                 "negative": [0.6, 0.6, -0.2, 0, 0, 0, 0, 0],
                 "summing_to_1.3": [1.3 / 8] * 8, "summing_to_0.99": [0.99 / 8] * 8,
                 "float64": [1 / 8] * 8}


def onnx_breaking_the_contract(kind: str) -> bytes:
    """A CNN file that loads but breaks the contract: the shipped one with its batch fixed
    at 1 or its metadata's classes in another order, or a network in ``CONSTANT_ROWS``."""
    import onnx
    from onnx import TensorProto, helper

    if kind in ("fixed_batch", "classes_reversed", "preprocessing_version_2"):
        model = onnx.load(REPO_MODELS_DIR / "emotion_cnn.onnx")
        for tensor in (*model.graph.input, *model.graph.output):
            if kind == "fixed_batch":
                tensor.type.tensor_type.shape.dim[0].dim_value = 1
        for prop in model.metadata_props:
            if prop.key == "classes" and kind == "classes_reversed":
                prop.value = ",".join(reversed(prop.value.split(",")))
            if prop.key == "preprocessing_version" and kind == "preprocessing_version_2":
                prop.value = "2"
        return model.SerializeToString()
    weights = helper.make_tensor("weights", TensorProto.FLOAT, [350 * 350, 8],
                                 np.zeros(350 * 350 * 8, np.float32))
    row = helper.make_tensor("row", TensorProto.FLOAT, [8],
                             np.asarray(CONSTANT_ROWS[kind], np.float32))
    wide = kind == "float64"
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weights"], ["zeros"]),
             helper.make_node("Add", ["zeros", "row"], ["rows" if wide else "probabilities"])]
    if wide:
        nodes.append(helper.make_node("Cast", ["rows"], ["probabilities"],
                                      to=TensorProto.DOUBLE))
    graph = helper.make_graph(
        nodes, kind,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 350, 350])],
        [helper.make_tensor_value_info("probabilities",
                                       TensorProto.DOUBLE if wide else TensorProto.FLOAT,
                                       ["N", 8])],
        [weights, row])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


@pytest.mark.parametrize(("kind", "says"), [
    # ready, then a 500 for every request of two images
    ("fixed_batch", "image is tensor(float) [1, 1, 350, 350], the contract is tensor(float) "
                    "['N', 1, 350, 350]"),
    # its logits served as "probabilities" of 61.25
    ("logits", "its outputs are not probabilities"),
    # each taken by a mutant of its check (the mutation review): labels served in another
    # order, rows outside [0, 1] or not summing to 1, or float64 where float32 is the contract
    ("classes_reversed", "its metadata gives classes 'CONTEMPT,SADNESS,"),
    ("outside_0_1", "its outputs are not probabilities: from -0.5 to 1.5"),
    ("summing_to_1.3", "rows summing to 1.3000, 1.3000"),
    # each passed every test without its own check (a later mutation review): a network
    # for another preprocessing, a negative "probability" in rows summing to 1, rows at 0.99
    ("preprocessing_version_2", "its metadata gives preprocessing_version '2', the service "),
    ("negative", "its outputs are not probabilities: from -0.2 to 0.6"),
    ("summing_to_0.99", "rows summing to 0.9900, 0.9900"),
    ("float64", "probabilities is tensor(double) ['N', 8], the contract is tensor(float)")])
def test_a_pinned_cnn_that_breaks_the_contract_is_refused(tmp_path, settings, kind, says):
    folder = models_copy(tmp_path)
    data = onnx_breaking_the_contract(kind)
    (folder / "emotion_cnn.onnx").write_bytes(data)
    edit_model_entry(folder, "cnn", sha256=sha256_bytes(data), bytes=len(data))
    assert_only_the_cnn_refused(settings, folder, says)


def shipped_manifest_where(path: str, value) -> str:
    """The shipped manifest's text, the value at ``path`` (keys joined by dots) replaced:
    ``value`` in JSON, or a ``str`` as the literal text it is."""
    manifest = json.loads((REPO_MODELS_DIR / "manifest.json").read_text())
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[key]
    node[last] = "VALUE"
    return json.dumps(manifest).replace('"VALUE"', value if isinstance(value, str)
                                        else json.dumps(value))


SHIPPED_CNN_SHA256 = load_manifest(REPO_MODELS_DIR).models["cnn"].sha256


@pytest.mark.parametrize(("content", "says"), [
    (None, "No such file"), ("{not json", "Expecting property name"),
    # each taken by a mutant of its check (the mutation review): a number past a float's
    # range read as inf, which /metrics then failed to send (a 500 while ready), in the typed
    # metrics and the free-form summary; classes in another order; a hash in capitals; and a
    # manifest past its size
    (shipped_manifest_where("models.cnn.metrics.identity.test.macro_f1", "1e999"),
     "1e999 is past a float's range"),
    (shipped_manifest_where("models.cnn.summary.given", "-1E400"),
     "-1E400 is past a float's range"),
    (shipped_manifest_where("models.cnn.classes", list(reversed(CLASS_NAMES))),
     "gives model 'cnn' the classes ['CONTEMPT', 'SADNESS',"),
    (shipped_manifest_where("models.cnn.sha256", json.dumps(SHIPPED_CNN_SHA256.upper())),
     "models.cnn.sha256: String should match pattern"),
    (shipped_manifest_where("models.cnn.summary.given", json.dumps(" " * (16 << 20))),
     "more than the 16777216 it may have"),
    # one line naming the field (pydantic's report ran to four, with a link)
    ('{"models": {"cnn": {"file": 1}}}', "models.cnn.file: Input should be a valid string"),
    ("{}", "models: Field required"),
    # the default model missing: every request naming none was a 422 while ready
    (json.dumps({**json.loads((REPO_MODELS_DIR / "manifest.json").read_text()), "models": {
        "knn": json.loads((REPO_MODELS_DIR / "manifest.json").read_text())["models"]["knn"]}}),
     "EMOTION_DEFAULT_MODEL is 'cnn', which the model manifest")])
def test_missing_or_malformed_manifest_is_a_clear_startup_error(tmp_path, settings, content,
                                                               says):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    app = create_app(settings.model_copy(update={"models_dir": tmp_path}))
    with pytest.raises(ManifestError, match="manifest") as caught, TestClient(app):
        pass
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_pinned_knn_with_other_classes_is_refused(tmp_path, settings):
    """A pipeline fitted on labels 1..8 answers 8 columns that pass the probability check,
    each a class over from the service's (the mutation review: the check's mutant served it)."""
    import io

    import joblib
    from sklearn.neighbors import KNeighborsClassifier

    folder = models_copy(tmp_path)
    pipeline = KNeighborsClassifier(1).fit(
        np.random.default_rng(0).random((8, 350 * 350), np.float32), np.arange(1, 9))
    buffer = io.BytesIO()
    joblib.dump(pipeline, buffer)
    data = buffer.getvalue()
    (folder / "emotion_knn.joblib").write_bytes(data)
    edit_model_entry(folder, "knn", sha256=sha256_bytes(data), bytes=len(data))
    with TestClient(create_app(settings.model_copy(update={"models_dir": folder}))) as client:
        ready = client.get("/readyz").json()["models"]
        assert ready["cnn"] == "ready"
        assert "the pipeline's classes are [1, 2, 3, 4, 5, 6, 7, 8], expected 0..7" in ready["knn"]
        assert_error(post_file(client, png_bytes(), model="knn"), 503, "model_unavailable")


@pytest.mark.parametrize("file", ["../../etc/passwd", "..", ".hidden.onnx", "/etc/passwd"])
def test_a_manifest_cannot_point_outside_the_models_folder(tmp_path, settings, file):
    """Nor at the folder above or a hidden file: a leading dot passed every test (the
    mutation review), since the slash refused the one path tried."""
    import json

    manifest = json.loads((REPO_MODELS_DIR / "manifest.json").read_text())
    manifest["models"]["cnn"]["file"] = file
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="models.cnn.file"):
        load_manifest(tmp_path)


def test_overload_answers_503_with_retry_after_at_once(settings, monkeypatch):
    with one_request_held(settings, monkeypatch, png_bytes(), max_in_flight=1) as (
            client, answer_it):
        def overloads() -> float:
            return metric_total(client.get("/metrics", headers={"accept": "text/plain"}).text,
                                "emotion_overload_rejections_total")

        before = overloads()
        second = post_file(client, png_bytes())
        counted = overloads() - before  # a mutant that never counted passed every test
        answer_it()  # and the held one is answered 200
    assert_error(second, 503, "overloaded")
    assert second.headers["retry-after"] == "1" and counted == 1


def test_each_latency_is_reported_in_its_unit(client, monkeypatch, caplog):
    """A model call slowed by 50 ms: the answer's and the access log's latency_ms, and the
    inference histogram's seconds. Mutants reporting seconds as milliseconds, and observing
    0 s for every call, passed every test (the mutation reviews)."""
    import time

    from service.models import OnnxClassifier

    real = OnnxClassifier.predict_proba
    monkeypatch.setattr(OnnxClassifier, "predict_proba",
                        lambda self, images: time.sleep(0.05) or real(self, images))

    def inference_seconds() -> float:
        return metric_total(client.get("/metrics", headers={"accept": "text/plain"}).text,
                            "emotion_inference_duration_seconds_sum", model="cnn")

    before = inference_seconds()
    with caplog.at_level("INFO"):
        answer = post_file(client, png_bytes())
    assert answer.status_code == 200
    observed = inference_seconds() - before
    assert 0.05 <= observed < 5
    assert 50 <= answer.json()["latency_ms"] < 5000
    [line] = [r.getMessage() for r in caplog.records if r.name == "service.access"
              and answer.headers["x-request-id"] in r.getMessage()]
    assert 50 <= json.loads(line)["latency_ms"] < 5000


def test_a_get_on_a_model_route_is_a_405_even_while_the_worker_is_full(settings,
                                                                      monkeypatch):
    """Admission counted any method: GET /predict got 503 'too many requests in flight' and
    counted as an overload, where it is the client's mistake."""
    with one_request_held(settings, monkeypatch, png_bytes(), max_in_flight=1) as (
            client, answer_it):
        scrape = {"accept": "text/plain"}
        before = metric_total(client.get("/metrics", headers=scrape).text,
                              "emotion_overload_rejections_total")
        assert_error(client.get("/predict"), 405, "method_not_allowed")
        assert client.get("/v2/models/cnn/infer").status_code == 405
        after = metric_total(client.get("/metrics", headers=scrape).text,
                             "emotion_overload_rejections_total")
        answer_it()
    assert after == before


def test_images_per_request_counts_answered_requests_as_v2_does(client):
    """A refused single image was counted on /predict and not on /v2; and both protocols
    count what they answer, and the image they refuse, in the same two metrics."""
    def count(sample: str = "emotion_images_per_request_count", **labels) -> float:
        return metric_total(client.get("/metrics", headers={"accept": "text/plain"}).text,
                            sample, **labels)

    def v2(data: bytes):
        return client.post("/v2/models/cnn/infer", json={"inputs": [{
            "name": "image_bytes", "datatype": "BYTES", "shape": [1],
            "data": [base64.b64encode(data).decode()]}]})

    rejected = {"sample": "emotion_rejected_inputs_total", "reason": "not_an_image"}
    for send in (post_file, lambda client, data: v2(data)):
        before, refused = count(), count(**rejected)
        assert send(client, b"junk").status_code == 400
        assert count() == before and count(**rejected) == refused + 1
        assert send(client, png_bytes()).status_code == 200
        assert count() == before + 1


def noise_png(side: int = 550) -> bytes:
    """About 300 kB for 550 px: noise does not compress."""
    return encode(Image.fromarray(np.random.default_rng(side).integers(
        0, 255, (side, side), dtype=np.uint8)))


@contextlib.contextmanager
def one_request_held(settings, monkeypatch, body: bytes, **updates):
    """A client on an app whose first model call waits, while ``body`` (sent to /predict)
    is in flight: what the body budget counts against the requests that follow."""
    from service.inference import Predictor

    entered, release = threading.Event(), threading.Event()
    real, calls = Predictor.predict, []

    def first_waits(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", first_waits)
    with TestClient(create_app(settings.model_copy(update=updates))) as client:
        held = {}
        worker = threading.Thread(target=lambda: held.update(r=client.post(
            "/predict", content=body, headers={"content-type": "image/png"})))
        worker.start()
        assert entered.wait(10)

        def answer_it() -> None:
            release.set()
            worker.join(10)
            assert held["r"].status_code == 200

        try:
            yield client, answer_it
        finally:
            release.set()
            worker.join(10)


def body_bytes_in_flight(client) -> float:
    return metric_total(client.get("/metrics", headers={"accept": "text/plain"}).text,
                        "emotion_request_body_bytes_in_flight")


def test_request_bytes_in_flight_are_bounded_per_worker(settings, monkeypatch):
    big = noise_png()
    budget = len(big) + 100_000  # one big body and a small one, not two big ones
    with one_request_held(settings, monkeypatch, big, max_body_bytes_in_flight=budget,
                          max_upload_bytes=len(big)) as (client, answer_it):
        assert body_bytes_in_flight(client) == len(big)
        second = client.post("/predict", content=big, headers={"content-type": "image/png"})
        assert_error(second, 503, "overloaded")
        assert second.headers["retry-after"] == "1"
        # refused before a byte of it was kept: only the held body counts
        assert body_bytes_in_flight(client) == len(big)
        # as multipart, and without a declared length (held as it arrives): refused too
        assert_error(post_file(client, big), 503, "overloaded")
        chunked = client.post("/predict", content=iter([big[:100_000], big[100_000:]]),
                              headers={"content-type": "image/png"})
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 503, "overloaded")
        # a body over its own limit is told so (413), not to retry (503), budget full or not
        assert_error(client.post("/predict", content=iter([big + bytes(1)]), headers={
            "content-type": "image/png"}), 413, "too_many_bytes")
        assert post_file(client, png_bytes()).status_code == 200  # a small one fits
        # a client's mistake is told so, not to retry, even while the budget is full
        for content_type in ("multipart/form-data", "multipart/form-data; boundary=" + "b" * 300):
            assert_error(client.post("/predict", content=big, headers={
                "content-type": content_type}), 400, "malformed_multipart")
        # On /v2, a gzip body counts inflated: 2 kB sent, 650 kB to parse.
        request = json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                          "shape": [1, 1, 350, 350],
                                          "data": [0.5] * 350 * 350}]}).encode()
        packed = gzip.compress(request)
        assert len(packed) < 10_000 < len(big) + len(request) - budget
        oip = client.post("/v2/models/cnn/infer", content=packed,
                          headers={"content-encoding": "gzip"})
        assert oip.status_code == 503 and "bytes in flight" in oip.json()["error"], oip.text
        assert oip.headers["retry-after"] == "1"
        overloaded = metric_total(client.get("/metrics", headers={"accept": "text/plain"}).text,
                                  "emotion_overload_rejections_total")
        assert overloaded == 4
        # once the held one is answered, the same requests pass, and nothing stays counted
        answer_it()
        assert client.post("/predict", content=big, headers={"content-type": "image/png"}
                           ).status_code == 200
        assert client.post("/v2/models/cnn/infer", content=packed,
                           headers={"content-encoding": "gzip"}).status_code == 200
        assert body_bytes_in_flight(client) == 0


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_content_encoding_is_no_coding_on_both_paths(client, faces, empty):
    """/predict refused it as "Content-Encoding '' is not supported" (415) while /v2 took
    it (a code review); " " was the other way round."""
    face = next(iter(faces.values()))
    answer = client.post("/predict", content=face, headers={
        "content-type": "image/jpeg", "content-encoding": empty})
    assert answer.status_code == 200, answer.text
    oip = client.post("/v2/models/cnn/infer", headers={"content-encoding": empty}, json={
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                    "data": [base64.b64encode(face).decode()]}]})
    assert oip.status_code == 200, oip.text
    assert oip.json()["outputs"][0]["data"] == pytest.approx(
        list(answer.json()["predictions"][0]["probabilities"].values()), abs=1e-6)


def test_media_types_and_codings_are_read_whatever_their_case(client, faces):
    """HTTP's media types and content codings are case-insensitive: a lower() dropped
    from either went unseen (a mutation review)."""
    face = next(iter(faces.values()))
    for headers in ({"content-type": "Image/JPEG"},
                    {"content-type": "image/jpeg", "content-encoding": "Identity"}):
        answer = client.post("/predict", content=face, headers=headers)
        assert answer.status_code == 200, (headers, answer.text)


def test_a_wrong_model_is_said_before_the_body_is_read(settings):
    """The model is checked before a byte is read: read first, an unknown model with a
    body too large or of another type was a 413 or a 415, after reading it all (a mutation
    review)."""
    with TestClient(create_app(settings.model_copy(update={"max_upload_bytes": 1000}))
                    ) as client:
        for content_type in ("image/png", "text/plain"):
            answer = client.post("/predict?model=nosuch", content=bytes(5000),
                                 headers={"content-type": content_type})
            assert_error(answer, 422, "unknown_model")


def test_a_request_alone_may_pass_the_byte_budget(settings):
    big = noise_png()
    small_budget = settings.model_copy(update={"max_body_bytes_in_flight": 1000})
    with TestClient(create_app(small_budget)) as client:
        # bounded by its own limits, never refused for the budget when nothing else holds any
        assert client.post("/predict", content=big, headers={"content-type": "image/png"}
                           ).status_code == 200
        assert post_file(client, big).status_code == 200


def test_head_answers_as_get_without_a_body(client):
    """RFC 9110: HEAD wherever GET works; it was 405 on every route, /healthz included."""
    for path in ("/healthz", "/readyz", "/", "/classes", "/v2/health/ready"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers[
            "content-type"]
    assert client.head("/predict").status_code == 405  # POST only, as for GET


def test_request_id_is_returned_and_propagated(client):
    response = client.get("/healthz", headers={"x-request-id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    # visible ASCII only: UTF-8 was echoed as its bytes but logged as their Latin-1 reading
    assert client.get("/healthz", headers={"x-request-id": "a" * 80}).headers[
        "x-request-id"] == "a" * 64
    for hostile in ("café-résumé".encode(), b"a b", b"tab\there", b"a" * 64 + "é".encode()):
        echoed = client.get("/healthz", headers={"x-request-id": hostile}).headers
        assert re.fullmatch(r"[0-9a-f]{32}", echoed["x-request-id"]), echoed


def test_cors_is_off_unless_configured(client, settings):
    headers = {"origin": "https://example.org", "access-control-request-method": "POST"}
    assert "access-control-allow-origin" not in client.options("/predict", headers=headers).headers
    allowed = settings.model_copy(update={"cors_origins": ["https://example.org"]})
    with TestClient(create_app(allowed)) as cors_client:
        response = cors_client.options("/predict", headers=headers)
        assert response.headers["access-control-allow-origin"] == "https://example.org"
        # a page on that origin can read the request id (and Retry-After): browsers hide
        # every header not exposed
        health = cors_client.get("/healthz", headers={"origin": "https://example.org"})
        exposed = health.headers["access-control-expose-headers"].lower().split(", ")
        assert {"x-request-id", "retry-after"} <= set(exposed)


def test_a_page_on_an_allowed_origin_can_read_the_overload_answer(settings, monkeypatch):
    """The 503 the admission control writes itself, and the preflight before it, carry the
    CORS headers: without them the browser reports only a network error, no Retry-After."""
    origin = {"origin": "https://example.org"}
    with one_request_held(settings, monkeypatch, png_bytes(), max_in_flight=1,
                          cors_origins=["https://example.org"]) as (client, answer_it):
        preflight = client.options("/predict", headers={
            **origin, "access-control-request-method": "POST"})
        second = client.post("/predict", content=png_bytes(),
                             headers={**origin, "content-type": "image/png"})
        answer_it()
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://example.org"
    assert preflight.headers["x-request-id"]  # counted and logged like every answer
    assert_error(second, 503, "overloaded")
    assert second.headers["access-control-allow-origin"] == "https://example.org"
    assert "retry-after" in second.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(("headers", "says"), [
    ({"origin": "https://evil.example", "access-control-request-method": "POST"}, "origin"),
    ({"origin": "https://example.org", "access-control-request-method": "PUT"}, "method")])
def test_a_refused_cors_preflight_is_a_json_error(settings, headers, says):
    allowed = settings.model_copy(update={"cors_origins": ["https://example.org"]})
    with TestClient(create_app(allowed)) as client:
        refused = client.options("/predict", headers=headers)
        exposition = client.get("/metrics", headers={"accept": "text/plain"}).text
    assert_error(refused, 400, "cors_refused")  # Starlette's was plain text
    assert refused.json()["detail"].endswith(says)
    # an operator sees refused preflights (a misconfigured origin) in the metrics
    assert refused.headers["x-request-id"] and refused.headers["x-content-type-options"]
    assert metric_total(exposition, "emotion_http_requests_total", route="/predict",
                        method="OPTIONS", status="400") == 1


def test_the_default_model_and_faces_settings_answer_a_request_that_names_neither():
    """EMOTION_DEFAULT_MODEL and EMOTION_DEFAULT_FACES, on /predict and on /v2 (no test set
    them: a router hard-wired to cnn and none passed)."""
    photo = (REPO_MODELS_DIR.parent / "examples" / "two_people.jpg").read_bytes()

    def v2(client, parameters: dict) -> list[float]:
        answer = client.post("/v2/models/knn/infer", json={"parameters": parameters, "inputs": [{
            "name": "image_bytes", "datatype": "BYTES", "shape": [1],
            "data": [base64.b64encode(photo).decode()]}]})
        assert answer.status_code == 200, answer.text
        return answer.json()["outputs"][0]["data"]

    settings = Settings(models_dir=REPO_MODELS_DIR, onnx_threads=1, default_model="knn",
                        default_faces="auto")
    with TestClient(create_app(settings)) as client:
        answer = client.post("/predict", files={"file": ("two.jpg", photo, "image/jpeg")})
        assert answer.status_code == 200, answer.text
        [prediction] = answer.json()["predictions"]
        assert answer.json()["model"] == "knn" and prediction["face"] is not None
        # what the page starts on
        assert [m["name"] for m in client.get("/models").json() if m["default"]] == ["knn"]
        assert v2(client, {}) == v2(client, {"faces": "auto"}) != v2(client, {"faces": "none"})


def test_a_refused_request_gives_its_share_back_at_once():
    """Two large /v2 bodies at once were both refused: the first one refused kept its bytes
    until its answer was sent, and the second was refused for them (a security review)."""
    from service.admission import BodyBudget
    from service.errors import ApiError

    budget = BodyBudget(limit=100)
    first, second = budget.ticket(), budget.ticket()
    first.hold(60)
    second.hold(30)
    with pytest.raises(ApiError) as refused:  # 60 + 30 + 20 more: past the budget
        first.hold(80)
    assert refused.value.status == 503 and budget.held == 30
    second.hold(90)  # the room the refused one left
    assert budget.held == 90


def test_a_steady_body_longer_than_the_idle_window_is_read_whole(settings):
    """The rate's deadline grows with the bytes received: with them uncounted, every
    upload taking longer than EMOTION_BODY_IDLE_SECONDS in all (30 s: 10 MiB on a slow
    link) was a 408, however fast it came (a mutation review)."""
    import asyncio

    from service.uploads import body_chunks

    class SteadyUpload:  # 10 kB every 0.1 s for 2.5 s: 100 kB/s, past a 1 s idle window
        async def stream(self):
            for _ in range(25):
                await asyncio.sleep(0.1)
                yield bytes(10_000)

    steady = settings.model_copy(update={"body_idle_seconds": 1.0,
                                         "body_min_bytes_per_second": 1000})

    async def read() -> int:
        return sum([len(chunk) async for chunk in body_chunks(SteadyUpload(), steady)])

    assert asyncio.run(read()) == 250_000


def test_the_metrics_say_what_was_loaded_and_what_each_request_did(settings):
    """Each a series whose value no test read, so that a mutant of it passed (the operators'
    mutation review): the model gauges' values, not only their presence; the in-flight gauges
    back at 0 once answered or refused; a request's image count; a refusal under its own
    code; and a model's own readiness on /v2 while the service drains."""
    from service.manifest import load_manifest

    manifest = load_manifest(REPO_MODELS_DIR)
    photo = (REPO_MODELS_DIR.parent / "examples" / "two_people.jpg").read_bytes()
    few_pixels = settings.model_copy(update={"max_pixels": 10_000})
    with TestClient(create_app(few_pixels)) as client:
        def scrape(sample: str, **labels: str) -> float:
            text = client.get("/metrics", headers={"accept": "text/plain"}).text
            return metric_total(text, sample, **labels)

        for name, entry in manifest.models.items():
            assert scrape("emotion_model_info", model=name, sha256=entry.sha256) == 1
            for split, subsets in entry.metrics.items():
                for subset, metrics in subsets.items():
                    assert scrape("emotion_model_eval_macro_f1", model=name, split=split,
                                  subset=subset) == pytest.approx(metrics.macro_f1)
        before = scrape("emotion_images_per_request_sum")
        small = png_bytes(90, 90)
        answer = client.post("/predict", params={"faces": "none"},
                             files=[("files", (f"{i}.png", small)) for i in range(3)])
        assert answer.status_code == 200
        assert scrape("emotion_images_per_request_sum") == before + 3
        refused = client.post("/predict", files={"file": ("big.jpg", photo)})
        assert_error(refused, 413, "too_many_pixels")
        assert scrape("emotion_rejected_inputs_total", reason="too_many_pixels") == 1
        client.post("/predict", files={"file": ("junk.png", b"junk")})
        client.post("/v2/models/cnn/infer", json={"inputs": []})
        assert scrape("emotion_predictions_in_flight") == 0
        assert scrape("emotion_request_body_bytes_in_flight") == 0
        assert client.get("/v2/models/cnn/ready").status_code == 200
        client.app.state.serving.draining.draining = True  # what SIGTERM sets
        assert client.get("/v2/models/cnn/ready").status_code == 400
        assert client.get("/readyz").status_code == 503
