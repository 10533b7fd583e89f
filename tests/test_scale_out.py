"""Replicas that come and go: a worker drains on SIGTERM, and nginx in front of three
replicas loses nothing when one is killed outright and restarted."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.balancer import nginx_binary
from benchmarks.wire import multipart_request
from tests.server import server_process

pytestmark = [pytest.mark.dataset, pytest.mark.slow]


def faces(data_settings, count: int) -> list[bytes]:
    from training.splits import read_split

    split = read_split(data_settings.splits_dir / "identity.csv")
    names = split[split["split"] == "test"]["image"].iloc[:count]
    return [(data_settings.images_dir / n).read_bytes() for n in names]


def in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"accept": "text/plain"}, timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "emotion_predictions_in_flight":
            return sum(s.value for s in family.samples)
    raise AssertionError("no in-flight gauge")


def test_sigterm_answers_every_request_in_flight_and_turns_not_ready(data_settings):
    images = faces(data_settings, 16)
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    env = {"EMOTION_DRAIN_SECONDS": "1.5", "EMOTION_ONNX_THREADS": "1",
           "EMOTION_INFERENCE_CONCURRENCY": "1"}
    with server_process(workers=1, env=env) as (base, process), ThreadPoolExecutor(8) as pool:
        # Batches of 16 with faces=all, one model call at a time: about a second of work
        # queued in the worker when the signal comes.
        pending = [pool.submit(httpx.post, f"{base}/predict", params={"faces": "all"},
                               files=files, timeout=60) for _ in range(8)]
        deadline = time.monotonic() + 30
        while in_flight(base) < 8:
            assert time.monotonic() < deadline, "the requests never arrived"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 400
        responses = [f.result() for f in pending]
        assert [r.status_code for r in responses] == [200] * 8
        assert all(len(r.json()["predictions"]) >= 16 for r in responses)
        process.wait(30)
        with pytest.raises(httpx.ConnectError):  # and then it stops taking connections
            httpx.get(f"{base}/healthz", timeout=2)


def test_a_second_sigterm_does_not_cut_the_drain_short():
    """A signal to the whole process group reaches each worker twice (directly, then from
    uvicorn's supervisor); the second one stopped it at once, and the drain was skipped."""
    with server_process(workers=1, env={"EMOTION_DRAIN_SECONDS": "4"}) as (base, process):
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # uvicorn stops listening within a poll of its own (0.1 s)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        process.wait(30)  # and then it stops (by the signal uvicorn raises again)


def test_after_the_drain_several_workers_refuse_new_connections_not_leave_them_hanging(
        data_settings):
    """uvicorn's supervisor keeps its own copy of the listening socket: once the workers
    stopped accepting, new connections went into a backlog nobody read, and hung until the
    last busy worker had finished (up to EMOTION_SHUTDOWN_TIMEOUT_SECONDS), then were reset.
    A refused connection is one a load balancer retries elsewhere at once."""
    request = multipart_request("test", "/predict", [("a.jpg", faces(data_settings, 1)[0])])
    cut = request.index(b"\r\n\r\n") + 100  # the head and a little of the body
    with server_process(workers=2, env={"EMOTION_DRAIN_SECONDS": "1"}) as (base, process):
        address = ("127.0.0.1", int(base.rsplit(":", 1)[1]))
        held = socket.create_connection(address, timeout=30)
        held.sendall(request[:cut])  # a worker holds it, waiting for the rest
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe = socket.create_connection(address, timeout=2)
            except ConnectionRefusedError:
                break
            probe.close()
            assert time.monotonic() < deadline, "still taking connections 10 s after SIGTERM"
            time.sleep(0.2)
        held.sendall(request[cut:])  # and the request it holds is still answered
        with held, held.makefile("rb") as answer:
            status_line = answer.readline()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        process.wait(30)


@pytest.mark.skipif(nginx_binary() is None and not os.environ.get("CI"),
                    reason="nginx is not installed (.ci/run installs it)")
def test_nginx_in_front_of_three_replicas_loses_nothing_when_one_is_killed(data_settings,
                                                                          tmp_path):
    from benchmarks.balancer import Balancer, run_fault_load

    images = faces(data_settings, 8)
    with Balancer(replicas=3, folder=tmp_path) as balancer:
        report = run_fault_load(balancer, images, seconds=12, kill_at=3, restart_after=3,
                                clients=6, after=3)
    assert report["sent"] > 100
    assert report["failed"] == 0, report["failures"][:5]
    assert report["succeeded"] == report["sent"]
    # only what the killed replica had begun to answer is sent again: one per client at most
    assert report["retried"] <= 6, report
    assert report["served_after_restart"] > 0  # the restarted replica is back in the pool


def test_a_request_cut_at_the_shutdown_timeout_is_answered_and_logged(tmp_path):
    """Past EMOTION_SHUTDOWN_TIMEOUT_SECONDS uvicorn cancels the requests still in hand: the
    client got its connection closed with no answer, and the log and metrics no line."""
    import json

    log = tmp_path / "server.log"
    env = {"EMOTION_SHUTDOWN_TIMEOUT_SECONDS": "1", "EMOTION_DRAIN_SECONDS": "0",
           "EMOTION_LOG_LEVEL": "info", "EMOTION_CORS_ORIGINS": '["http://a.example"]'}
    with server_process(workers=1, env=env, log_path=log) as (base, process):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as stalled:
            # a body that stops arriving: the request stays in hand through the shutdown
            stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            b"Content-Length: 100000\r\nX-Request-ID: cut-at-shutdown\r\n"
                            b"Origin: http://a.example\r\n\r\n"
                            b"\x89PNG")
            deadline = time.monotonic() + 20
            while in_flight(base) < 1:
                assert time.monotonic() < deadline, "the request never arrived"
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := stalled.recv(65536):
                answer += chunk
        process.wait(30)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"retry-after" in answer.lower() and b"shutting_down" in answer
    # readable by a page on an allowed origin, as every other answer is
    assert b"access-control-allow-origin: http://a.example" in answer.lower()
    text = log.read_text()
    lines = [json.loads(line[line.index("{"):]) for line in text.splitlines()
             if "cut-at-shutdown" in line and "{" in line]
    assert [line["status"] for line in lines] == [503], text
    assert "Traceback" not in text, text
