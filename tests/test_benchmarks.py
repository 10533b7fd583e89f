"""Every benchmark runs end to end on a tiny budget; its figures are not judged here.

What is asserted is behaviour, not speed: no request fails under load, every 503 carries
Retry-After, the soak sees only the statuses it sends for.
"""

from __future__ import annotations

import re

import pytest

from benchmarks import (
    bench_faces,
    bench_load,
    bench_memory,
    bench_models,
    bench_service,
    bench_soak,
)

pytestmark = [pytest.mark.slow]


def test_bench_load_runs_without_failures(data_settings, capsys):
    bench_load.main(["--clients", "8", "--seconds", "2", "--overload-seconds", "2",
                     "--overload-in-flight", "2", "--images", "20"])
    out = capsys.readouterr().out
    assert re.search(r"load, 8 clients, 2 s: \d+ requests .*; failed 0\n", out), out
    assert "without Retry-After 0" in out and "other failures 0" in out


def test_bench_soak_samples_memory(data_settings, capsys):
    bench_soak.main(["--requests", "200", "--warmup", "50", "--interval", "0.1"])
    out = capsys.readouterr().out
    assert re.search(r"200 requests in .* statuses \{200: 180, 400: 20\}", out), out
    assert re.search(r"RSS: at start \d+ MiB, .* growth after warm-up [+-]\d", out), out


def test_bench_service_and_models_print_their_figures(data_settings, capsys):
    bench_service.main(["--requests", "20", "--rounds", "1", "--concurrency", "4"])
    bench_models.main(["--threads", "1", "--seconds", "0.2"])
    out = capsys.readouterr().out
    assert "bare path (decode" in out and "ratios: p50" in out, out
    assert "HTTP floor" in out and "service overhead at p50" in out
    assert re.search(r"without a framework .*: p50 \d+\.\d+ ms, .*failures 0", out), out
    assert "batch of 16 images, concurrency 1: p50" in out
    assert "failures 0" in out


def test_bench_faces_finds_the_face_and_prints_its_share(data_settings, capsys):
    bench_faces.main(["--repeats", "2", "--requests", "3"])
    out = capsys.readouterr().out
    assert "detector at 640x480:" in out and "1 face found)" in out, out
    assert out.count("of the faces=auto latency") == 2


def test_bench_memory_prints_each_cases_peak(capsys):
    assert bench_memory.main(["--images", "2", "--bytes", "100000", "--pixels", "250000",
                              "--cases", "multipart,oip_binary"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["multipart", "oip_binary"]
    for row in rows:  # body MB, status, idle MB, peak MB: the peak is at least the idle
        assert row[2] == "200x1" and float(row[4]) >= float(row[3]) > 50
