"""Settings that size the service to its machine: CPUs seen through a container's quota, and
the worker, thread and inference-concurrency defaults derived from them."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.inference import Predictor
from service.settings import REPO_MODELS_DIR, Settings, cgroup_cpu_quota, container_cpus
from tests.images import encode, gray_image

AFFINITY = len(os.sched_getaffinity(0))


def write_v2(root, text: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def write_v1(root, quota: int, period: int):
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


def test_cgroup_quota_is_read_from_v2_then_v1(tmp_path):
    assert cgroup_cpu_quota(write_v2(tmp_path / "a", "150000 100000\n")) == 1.5
    assert cgroup_cpu_quota(write_v2(tmp_path / "b", "max 100000\n")) is None
    assert cgroup_cpu_quota(write_v1(tmp_path / "c", 200000, 100000)) == 2.0
    assert cgroup_cpu_quota(write_v1(tmp_path / "d", -1, 100000)) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None
    assert cgroup_cpu_quota(write_v2(tmp_path / "e", "garbage\n")) is None
    assert cgroup_cpu_quota(write_v2(tmp_path / "f", "100000 0\n")) is None


def test_container_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path, monkeypatch):
    assert container_cpus(tmp_path / "none") == AFFINITY
    # four CPUs whatever this machine has: on one CPU the rounding went unchecked
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert container_cpus(tmp_path / "none") == 4
    assert container_cpus(write_v2(tmp_path / "half", "50000 100000")) == 1
    assert container_cpus(write_v2(tmp_path / "big", "6400000 100000")) == 4
    assert container_cpus(write_v2(tmp_path / "onehalf", "150000 100000")) == 2
    # up, not to the nearest (round() passed the two above: halves go to the even one)
    assert container_cpus(write_v2(tmp_path / "twohalves", "250000 100000")) == 3
    assert container_cpus(write_v2(tmp_path / "onefifth", "120000 100000")) == 2


def test_defaults_divide_the_cpus_between_workers():
    cpus = container_cpus()
    auto = Settings()
    assert auto.resolved_workers == cpus
    assert auto.resolved_onnx_threads == 1
    assert auto.resolved_inference_concurrency == 2
    one = Settings(workers=1)
    assert one.resolved_onnx_threads == cpus
    assert one.resolved_inference_concurrency == cpus + 1
    # more workers than CPUs: one thread each, not 0 (ONNX Runtime's default, every CPU)
    assert Settings(workers=cpus + 1).resolved_onnx_threads == 1
    fixed = Settings(workers=1, onnx_threads=3, inference_concurrency=5)
    assert (fixed.resolved_onnx_threads, fixed.resolved_inference_concurrency) == (3, 5)


@pytest.mark.parametrize("limit", [1, 3])
def test_inference_concurrency_bounds_model_calls_and_every_request_is_answered(
        monkeypatch, limit):
    running, peak, calls, lock = 0, 0, 0, threading.Lock()
    first = threading.Barrier(limit, timeout=30)  # the first `limit` calls meet inside
    real = Predictor.predict

    def slow_predict(*args, **kwargs):
        nonlocal running, peak, calls
        with lock:
            running += 1
            calls += 1
            peak = max(peak, running)
            meet = calls <= limit
        try:
            if meet:  # breaks (and the request fails) unless `limit` calls can run at once
                first.wait()
            time.sleep(0.01)  # the rest: a chance to exceed the limit if it leaked
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(Predictor, "predict", slow_predict)
    settings = Settings(models_dir=REPO_MODELS_DIR, workers=1, onnx_threads=1,
                        inference_concurrency=limit)
    image = encode(gray_image(80, 80))
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: client.post(
            "/predict", files={"file": ("a.png", image, "image/png")}).status_code, range(8)))
    assert statuses == [200] * 8
    assert peak == limit


@pytest.mark.parametrize(("field", "refused", "taken"), [
    ("port", [0, 65536], [1, 65535]), ("max_in_flight", [0], [1]),
    ("max_faces_per_image", [0], [1]), ("body_idle_seconds", [0], [0.1])])
def test_a_setting_past_its_range_is_refused(field, refused, taken):
    """Each bound taken by a mutant of it (the mutation review): max_in_flight=0, say, had every
    prediction answered 503 by a service that said it was ready."""
    from pydantic import ValidationError

    for value in refused:
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: value})
    for value in taken:
        assert getattr(Settings(**{field: value}), field) == value


def test_a_pixel_limit_past_pillows_own_is_refused():
    """Pillow refuses such images when it reads the header, so a larger limit would answer
    'the limit is 300000000 pixels' for a 182-megapixel image: a refusal that contradicts
    itself."""
    from pydantic import ValidationError

    from service.preprocessing import PILLOW_MAX_PIXELS

    assert Settings(max_pixels=PILLOW_MAX_PIXELS).max_pixels == PILLOW_MAX_PIXELS
    with pytest.raises(ValidationError, match="max_pixels"):
        Settings(max_pixels=PILLOW_MAX_PIXELS + 1)


@pytest.mark.parametrize("name", ["EMOTION_CORS_ORIGINS", "emotion_cors_origins"])
def test_a_list_setting_that_is_not_json_is_named_as_it_was_set(monkeypatch, name):
    """pydantic-settings names the field and its source; the variable is matched whatever its
    case, so the message names it as the user wrote it, with its value."""
    from service.settings import SettingsError, read_settings

    for other in [n for n in os.environ if n.upper() == "EMOTION_CORS_ORIGINS"]:
        monkeypatch.delenv(other)
    monkeypatch.setenv(name, "https://a.example")
    with pytest.raises(SettingsError) as caught:
        read_settings(Settings)
    assert str(caught.value).startswith(f"{name}='https://a.example': not JSON")


@pytest.mark.parametrize("origin", [
    "https://good.example/", "good.example", "https://good.example/app", "https://a b.example",
    # from the diff review: each started, then every preflight was refused
    "https://good.example:443", "http://good.example:80", "https://*.example.com",
    "https://good.example:abc", "https://user@good.example", "https://bücher.example",
    # from the whole-diff review: ports a browser never writes so
    "http://good.example:08080", "http://good.example:99999", "http://good.example:٨٠٨٠",
    # addresses written otherwise than a browser writes them (a fourth review)
    "http://[0:0:0:0:0:0:0:1]:8080", "http://127.1:3000", "http://[1.2.3.4]",
    "http://0x7f.0.0.1:3000", "http://foo.123",
    # the mutation review: past the last port, addresses a browser refuses (each read as
    # another one by a mutant), and a file:// page's, whose Origin is null
    "http://good.example:65536", "http://1.2.3.256", "http://1.256.0.1", "http://1.1.1.1.0",
    "file://good.example", "about://blank", "data://x", "javascript://x",
    "ws://good.example", "wss://good.example:8443", "blob://good.example"])
def test_a_cors_origin_no_browser_sends_is_refused(monkeypatch, origin):
    """Taken, it started the service, then every preflight from https://good.example was
    refused and no answer carried Access-Control-Allow-Origin (a review)."""
    from service.settings import SettingsError, read_settings

    for other in [n for n in os.environ if n.upper() == "EMOTION_CORS_ORIGINS"]:
        monkeypatch.delenv(other)
    monkeypatch.setenv("EMOTION_CORS_ORIGINS", json.dumps(["https://ok.example", origin]))
    with pytest.raises(SettingsError, match=r"\[1\] Value error, .* (is not an origin; give "
                                            r"scheme://host\[:port\]|names its scheme's "
                                            r"default port|writes its address as a browser "
                                            r"does not|is no origin a browser sends: a "
                                            r"\w+: (page sends Origin null|request or page "
                                            r"carries the origin of the page))"):
        read_settings(Settings)
    taken = ["https://Good.example:8443", "*", "http://[::1]:8080", "https://xn--bcher-kva.example",
             "http://my_app:8080", "http://127.0.0.1:3000",  # `_`: a Compose service's name
             "http://[::ffff:7f00:1]:3000",  # as browsers write it; Python 3.13 writes it dotted
             "http://[1:0:2:3:4:5:6:7]", "http://a.example:65535",  # one zero group: not ::
             "chrome-extension://abcdefghijklmnop"]  # an extension's pages send this
    monkeypatch.setenv("EMOTION_CORS_ORIGINS", json.dumps(taken))
    assert read_settings(Settings).cors_origins == [o.lower() for o in taken]


@pytest.mark.parametrize(("given", "sent"), [
    # what a browser sends in Origin for each (the WHATWG URL parser, as Node's URL gives it)
    ("http://127.1:3000", "http://127.0.0.1:3000"), ("http://0x7f000001", "http://127.0.0.1"),
    ("http://01.2.3.4", "http://1.2.3.4"), ("http://1.2.3", "http://1.2.0.3"),
    ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
    ("http://[::ffff:127.0.0.1]", "http://[::ffff:7f00:1]"),
    ("http://[1:0:0:2:0:0:3:4]", "http://[1::2:0:0:3:4]"),
    ("http://010.0.0.1", "http://8.0.0.1")])  # octal, as browsers read a leading 0
def test_an_address_written_otherwise_names_the_origin_a_browser_sends(given, sent):
    from service.origins import browser_origin

    with pytest.raises(ValueError, match=f"give {re.escape(sent)}$"):
        browser_origin(given)
    assert browser_origin(sent) == sent


@pytest.mark.parametrize("host", ["1.2.3.256", "1.256.0.1", "1.1.1.1.0"])
def test_an_address_a_browser_refuses_is_no_origin_not_another_address(host):
    """Past 255 in a part, or five parts: a browser refuses the URL, so there is no origin to
    give; mutants of either check named another address instead (the mutation review)."""
    from service.origins import browser_origin

    with pytest.raises(ValueError, match="is not an origin; give scheme://host"):
        browser_origin(f"http://{host}")


def test_a_refused_item_of_a_list_setting_names_the_variable_as_set(monkeypatch):
    """It named EMOTION_CORS_ORIGINS_1, a variable that does not exist."""
    from service.settings import SettingsError, read_settings

    for other in [n for n in os.environ if n.upper() == "EMOTION_CORS_ORIGINS"]:
        monkeypatch.delenv(other)
    monkeypatch.setenv("emotion_cors_origins", '["https://a.example", 1]')
    with pytest.raises(SettingsError) as caught:
        read_settings(Settings)
    assert str(caught.value) == ("emotion_cors_origins='[\"https://a.example\", 1]': [1] Input "
                                 "should be a valid string")
