"""How operators run the service: the real server, several workers, the container recipe."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.api import metric_total, models_copy, tampered_copy
from tests.server import REPO, free_port, running_server, server_process

DOCKERFILE = REPO / "Dockerfile"


def real_face(data_settings) -> bytes:
    return (data_settings.images_dir / "AJ_Cook_0001.jpg").read_bytes()


def test_real_server_answers_a_real_image_over_http(data_settings, tmp_path):
    log_path = tmp_path / "server.log"
    image = real_face(data_settings)
    with running_server(env={"EMOTION_LOG_LEVEL": "info"}, log_path=log_path) as base:
        response = httpx.post(f"{base}/predict", files={"file": ("face.jpg", image,
                              "image/jpeg")}, timeout=30)
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"]
        request_id = response.headers["x-request-id"]
    log = log_path.read_text()
    assert "Application startup complete." in log  # uvicorn's own lines follow the setting
    access = [json.loads(line[line.index("{"):]) for line in log.splitlines()
              if "service.access" in line]
    assert {"request_id": request_id, "method": "POST", "route": "/predict",
            "status": 200}.items() <= access[-1].items()
    assert access[-1]["latency_ms"] > 0
    # No image bytes in the log, in any encoding a logger might use.
    for chunk in (image[1000:1016], image[1000:1016].hex().encode(),
                  base64.b64encode(image[999:1020])[4:20]):
        assert chunk.decode("latin-1") not in log


def run_refused(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python *args``, expected to refuse at once. In its own process group, so that if it
    starts after all (a regression), its workers end with it instead of serving on port 1
    for the rest of the suite (an orphan did, and another test's probe found it)."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               **kwargs)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def shipped_manifest_with(schema_version: int = 2, metric: float | None = None,
                          summary=None, **models) -> str:
    """The shipped manifest, its models replaced by ``models`` (name -> a shipped name), and
    its format's version, the CNN's identity test macro-F1 or a value in the CNN's free-form
    summary replaced where given."""
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    manifest["models"] = {name: manifest["models"][like] for name, like in models.items()}
    manifest["schema_version"] = schema_version
    if metric is not None:
        manifest["models"]["cnn"]["metrics"]["identity"]["test"]["macro_f1"] = metric
    if summary is not None:
        manifest["models"]["cnn"]["summary"]["given"] = summary
    return json.dumps(manifest)


@pytest.mark.parametrize(("manifest", "says"), [
    (None, "cannot read the model manifest"), ("{broken", "is malformed"),
    # every request naming no model was a 422 unknown_model while /readyz said ready
    (shipped_manifest_with(knn="knn"), "EMOTION_DEFAULT_MODEL is 'cnn', which the model "
                                       "manifest"),
    (shipped_manifest_with(), "lists no models"),
    # served as /predict?model=extra, a name no setting or document offers
    (shipped_manifest_with(cnn="cnn", knn="knn", extra="knn"), "models.extra.[key]"),
    # tracebacks, exit 1 (a review)
    (b"\xff" + shipped_manifest_with(cnn="cnn").encode(), "can't decode byte 0xff"),
    ("[" * 100_000, "is malformed: nested deeper than 32 levels"),
    # taken: /readyz said ready, then /metrics or /models was a 500 (NaN is not JSON, nor a
    # list past the serializer's depth), in the typed metrics and the free-form summary alike
    (shipped_manifest_with(cnn="cnn", metric=float("nan")), "NaN is not a JSON number"),
    (shipped_manifest_with(cnn="cnn", summary=float("-inf")), "-Infinity is not a JSON number"),
    (shipped_manifest_with(cnn="cnn", summary="DEEP").replace('"DEEP"', "[" * 900 + "]" * 900),
     "is malformed: nested deeper than 32 levels"),
    # a format this code does not know, read as this one
    (shipped_manifest_with(cnn="cnn", schema_version=99), "schema_version: Input should be 2")])
def test_bad_manifest_is_one_clear_error_not_a_restart_loop(tmp_path, manifest, says):
    if manifest is not None:
        (tmp_path / "manifest.json").write_bytes(
            manifest if isinstance(manifest, bytes) else manifest.encode())
    env = {**os.environ, "EMOTION_MODELS_DIR": str(tmp_path), "EMOTION_WORKERS": "2"}
    result = run_refused(["-m", "service", "--port", "1"], cwd=REPO, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("emotion service: cannot start:") and says in line


@pytest.mark.parametrize(("command", "prefix"), [
    (["-m", "service", "--port", "1"], "emotion service: cannot start:"),
    (["-m", "service.cli", "images", str(REPO / "examples"), "--out", "rows.csv"],
     "emotion-detect:"),
    (["-m", "training", "audit"], "python -m training audit: error:")])
def test_a_refused_setting_is_one_line_naming_it_and_exit_2(tmp_path, command, prefix):
    env = {**os.environ, "EMOTION_WORKERS": "-1", "EMOTION_MAX_PIXELS": "many",
           "EMOTION_TORCH_THREADS": "two", "EMOTION_LOG_LEVEL": "verbose"}
    result = run_refused(command, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(prefix)
    if command[1] == "training":
        assert "EMOTION_TORCH_THREADS='two'" in line
    else:
        assert "EMOTION_WORKERS='-1'" in line and "EMOTION_MAX_PIXELS='many'" in line
        assert "EMOTION_LOG_LEVEL='verbose'" in line  # it was uvicorn's KeyError


@pytest.mark.parametrize(("env", "says"), [
    # every interface (uvicorn took "" as 0.0.0.0 and [::]), and the working folder's files
    ({"EMOTION_HOST": ""}, "--host or EMOTION_HOST '': empty; unset it for the default"),
    ({"EMOTION_MODELS_DIR": " "}, "EMOTION_MODELS_DIR=' ': Value error, empty"),
    ({"EMOTION_EXAMPLES_DIR": ""}, "EMOTION_EXAMPLES_DIR='': Value error, empty"),
    # taken, then ONNX Runtime's TypeError at load named no variable (not ready, not refused)
    ({"EMOTION_ONNX_THREADS": str(2**31)}, f"EMOTION_ONNX_THREADS='{2**31}': Input should "
                                           "be less than or equal to 1024"),
    # a name that does not resolve, or an address of another machine: uvicorn's errno after
    # both models loaded, exit 3
    ({"EMOTION_HOST": "no-such-host.invalid"}, "--host or EMOTION_HOST "
                                               "'no-such-host.invalid': "),
    ({"EMOTION_HOST": "192.0.2.1"}, "--host or EMOTION_HOST '192.0.2.1': Cannot assign "
                                    "requested address")])
def test_a_setting_that_cannot_work_is_refused_before_anything_loads(env, says):
    result = run_refused(["-m", "service", "--port", "1"], cwd=REPO,
                         env={**os.environ, "EMOTION_WORKERS": "1", **env})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("emotion service: cannot start: ") and says in line, line


@pytest.mark.parametrize("folder", ["missing", ""])
def test_a_metrics_folder_that_is_missing_is_one_line_not_a_crash_loop(tmp_path, folder):
    """Each worker died writing its first metric and uvicorn started another, for ever;
    set but empty, prometheus-client writes into the working folder."""
    env = {**os.environ, "EMOTION_WORKERS": "2", "EMOTION_LOG_LEVEL": "DEBUG",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / folder) if folder else ""}
    result = run_refused(["-m", "service", "--port", "1"], cwd=REPO, env=env)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("emotion service: cannot start: PROMETHEUS_MULTIPROC_DIR=")


def test_a_second_service_on_the_same_metrics_folder_is_refused_not_wiping_it(tmp_path):
    """A second launcher on the same PROMETHEUS_MULTIPROC_DIR (a blue/green pair on one
    host) deleted the running one's files: its counts went to zero and stayed there, and
    each /metrics added up both services (a review). Restarted on the folder, it counts
    afresh."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "EMOTION_WORKERS": "1"}
    with server_process(env=env) as (base, process):
        photo = (REPO / "examples" / "two_people.jpg").read_bytes()
        for _ in range(3):
            assert httpx.post(f"{base}/predict", params={"faces": "none"},
                              files={"file": ("a.jpg", photo)}, timeout=60).status_code == 200
        files = sorted(p.name for p in tmp_path.glob("*.db"))
        result = run_refused(["-m", "service", "--port", "1"], cwd=REPO,
                             env={**os.environ, **env})
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line == (f"emotion service: cannot start: PROMETHEUS_MULTIPROC_DIR="
                        f"{str(tmp_path)!r} is in use by another running service (pid "
                        f"{process.pid}); give each its own folder"), line
        assert sorted(p.name for p in tmp_path.glob("*.db")) == files
        metrics = httpx.get(f"{base}/metrics", headers={"accept": "text/plain"}).text
        assert metric_total(metrics, "emotion_predictions_total") == 3
    # the lock went with the process: the folder is free for the next one
    free = subprocess.run([sys.executable, "-c", "import sys; from service.__main__ import "
                           "hold_metrics_folder; print(hold_metrics_folder(sys.argv[1]))",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert free.stdout.strip() == "None", free.stderr
    # a container restarted in its pod keeps the folder: the dead service's counts are gone
    assert sorted(p.name for p in tmp_path.glob("*.db")) == files
    with server_process(env=env) as (base, _):
        assert httpx.post(f"{base}/predict", params={"faces": "none"},
                          files={"file": ("a.jpg", photo)}, timeout=60).status_code == 200
        metrics = httpx.get(f"{base}/metrics", headers={"accept": "text/plain"}).text
        assert metric_total(metrics, "emotion_predictions_total") == 1


WITHOUT_ROOTS_OVERRIDE = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


@pytest.mark.parametrize("mode", [0o644, 0o000])
def test_another_users_lock_file_in_the_metrics_folder_is_locked_or_one_line(tmp_path, mode):
    """A launcher.lock another account left in a shared folder was a traceback and exit 1
    (the diff review): one it may read still locks; one it may not is one line, exit 2."""
    lock = tmp_path / "launcher.lock"
    lock.write_text("12345\n")
    os.chown(lock, 65534, 65534)
    lock.chmod(mode)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "EMOTION_WORKERS": "1"}
    if mode:
        held = subprocess.run([*WITHOUT_ROOTS_OVERRIDE, sys.executable, "-c",
                               "import sys; from service.__main__ import hold_metrics_folder; "
                               "print(hold_metrics_folder(sys.argv[1]))", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert held.stdout.strip() == "None", held.stderr
        assert lock.read_text() == "12345\n"  # left as it was: not ours to write
        return
    result = subprocess.run([*WITHOUT_ROOTS_OVERRIDE, sys.executable, "-m", "service",
                             "--port", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (f"emotion service: cannot start: PROMETHEUS_MULTIPROC_DIR="
                    f"{str(tmp_path)!r}: cannot open its launcher.lock (Permission denied)")


@pytest.mark.parametrize("kind", ["link", "fifo", "stale pid", "2147483648", "0", "\xb2",
                                  "not UTF-8"])
def test_a_lock_file_that_is_a_link_a_fifo_or_anothers_pid_is_not_trusted(tmp_path, kind):
    """A launcher.lock linked elsewhere had its target emptied and the pid written in; a
    FIFO blocked the launcher for ever; the pid of a holder that could not write its own
    named another process (the second diff review)."""
    from service.__main__ import hold_metrics_folder

    lock = tmp_path / "launcher.lock"
    if kind not in ("link", "fifo"):
        # past any pid_max, past a C int (an OverflowError, the third diff review), a
        # process group, a digit only to str.isdigit: none is a process
        pid = "12345678" if kind == "stale pid" else kind
        # bytes that are no text: read as UTF-8, a traceback and exit 1 (the operators' review)
        written = b"\xff\xfe garbage\n" if kind == "not UTF-8" else f"{pid}\n".encode()
        lock.write_bytes(written)
        os.chown(lock, 65534, 65534)  # the holder may read it, not write it
        holder = subprocess.Popen(
            [*WITHOUT_ROOTS_OVERRIDE, sys.executable, "-c", "import sys, time; from "
             "service.__main__ import hold_metrics_folder as hold; print(hold(sys.argv[1]), "
             "flush=True); time.sleep(60)", str(tmp_path)],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "None"
            assert lock.read_bytes() == written
            assert hold_metrics_folder(str(tmp_path)) == "its pid not known"
        finally:
            holder.kill()
            holder.wait()
        return
    if kind == "fifo":  # another user's, so opened read-only: that open waited for ever
        os.mkfifo(lock)
        os.chown(lock, 65534, 65534)
        held = subprocess.run([*WITHOUT_ROOTS_OVERRIDE, sys.executable, "-c",
                               "import sys; from service.__main__ import hold_metrics_folder; "
                               "hold_metrics_folder(sys.argv[1])", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert held.stderr.strip().endswith("OSError: launcher.lock is not a regular file")
        return
    victim = tmp_path / "victim.txt"
    victim.write_text("kept\n")
    lock.symlink_to(victim)
    with pytest.raises(OSError):
        hold_metrics_folder(str(tmp_path))
    assert victim.read_text() == "kept\n"


def test_a_metrics_file_named_for_no_possible_pid_is_forgotten_not_a_crash(tmp_path):
    """os.kill took the number in a live gauge's file name: past a C int, an OverflowError
    out of every /metrics (the third diff review, of the same check in the launcher)."""
    from service.observability import forget_dead_workers

    for pid in ("99999999999999999999", "0", "\xb2"):  # "²": a digit only to str.isdigit
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    forget_dead_workers(str(tmp_path))
    assert [p.name for p in tmp_path.glob("*.db")] == ["gauge_livesum_\xb2.db"]  # not a pid


def test_no_writable_temporary_folder_for_several_workers_is_one_line():
    """`docker run --read-only` without a /tmp mounted: with two workers or more (one per
    CPU by default) the launcher ended in a traceback, a crash loop under a restart policy;
    one worker writes no metrics files and starts (a review)."""
    no_folder = ("import runpy, sys, tempfile; tempfile.tempdir = '/nonexistent/tmp'; "
                 "sys.argv = ['service', '--port', '1']; "
                 "runpy.run_module('service', run_name='__main__')")
    env = {key: value for key, value in os.environ.items()
           if key != "PROMETHEUS_MULTIPROC_DIR"}
    result = run_refused(["-c", no_folder], cwd=REPO, env={**env, "EMOTION_WORKERS": "2"})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("emotion service: cannot start: no writable temporary folder for "
                           "the workers' metrics (No such file or directory); mount one at "
                           "/tmp (docker run --tmpfs /tmp)"), line


@pytest.mark.parametrize("command", [["-m", "service"], ["-m", "service.cli", "images"],
                                     ["-m", "training", "audit"]])
def test_help_answers_even_when_a_setting_is_refused(tmp_path, command):
    """--help is how a user finds the setting to fix; the launcher refused it too."""
    env = {**os.environ, "EMOTION_WORKERS": "-1", "EMOTION_TORCH_THREADS": "two",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, *command, "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "--help" in result.stdout


def test_an_empty_host_setting_is_only_refused_where_it_is_used(tmp_path, monkeypatch):
    """--host overrides it, and the command line never listens: both ran with an env file's
    `EMOTION_HOST=` before the launcher refused it, and should still (a review)."""
    env = {**os.environ, "EMOTION_HOST": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "service.cli", "images", "--faces", "none",
                           "--out", str(tmp_path / "rows.csv"),
                           str(REPO / "examples" / "two_people.jpg")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 2
    from service.__main__ import parse_args, unlistenable
    from service.settings import Settings, read_settings

    for name in [n for n in os.environ if n.upper() == "EMOTION_HOST"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EMOTION_HOST", "")
    settings = read_settings(Settings)  # the variable read, not refused
    args = parse_args(["--host", "127.0.0.1"], settings)
    assert args.host == "127.0.0.1" and unlistenable(args.host) is None
    assert unlistenable(parse_args([], settings).host) == "empty; unset it for the default"


def link_local_addresses() -> list[str]:
    """This machine's IPv6 link-local addresses with their scope, as `fe80::1%eth0`."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        digits, *_, interface = line.split()
        if digits.startswith("fe80"):
            address = ipaddress.IPv6Address(bytes.fromhex(digits))
            found.append(f"{address}%{interface}")
    return found


def test_the_launcher_checks_the_host_for_the_workers_it_starts(monkeypatch):
    """The host probe differs by worker count; the launcher must give it the count uvicorn
    gets (a call without it passed every other test: the third diff review)."""
    import service.__main__ as launcher
    from service.settings import load_settings

    asked = []
    monkeypatch.setattr(launcher, "unlistenable",
                        lambda host, workers=1: asked.append((host, workers)) or "refused")
    monkeypatch.setenv("EMOTION_WORKERS", "3")
    load_settings.cache_clear()
    try:
        assert launcher.main(["--host", "somewhere"]) == 2
    finally:
        load_settings.cache_clear()
    assert asked == [("somewhere", 3)]


async def bind_and_close(host: str, port: int) -> None:
    server = await asyncio.start_server(lambda reader, writer: None, host, port)
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_launchers_host_check_agrees_with_uvicorns_own_bind(workers, monkeypatch):
    """Several workers share one socket that uvicorn binds to (host, port), which drops an
    IPv6 scope: a link-local address passed the launcher's check, then uvicorn failed after
    the models had loaded ("Invalid argument", exit 3; the second diff review). One worker
    binds every address a name resolves to, on one port, IPv6 ones only for IPv6, and fails
    at the first that does not bind or listen: a name for this machine and another passed a
    check that wanted any (the third), and so did ::ffff:127.0.0.1 and a name for 0.0.0.0
    and 127.0.0.1 (the fourth)."""
    import socket

    import uvicorn

    from service.__main__ import unlistenable

    resolve = socket.getaddrinfo

    names = {"dual.test": ("127.0.0.1", "192.0.2.1"), "all.test": ("0.0.0.0", "127.0.0.1")}

    def with_names_for_two(host, *args, **kwargs):  # as /etc/hosts could have them
        if host not in names:
            return resolve(host, *args, **kwargs)
        return [found for address in names[host] for found in resolve(address, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", with_names_for_two)
    hosts = ["127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "192.0.2.1",
             *names, *link_local_addresses()]
    for host in hosts:
        port = free_port()  # a port of its own: port 0 would give each address another
        config = uvicorn.Config("service.main:app", host=host, port=port, workers=workers)
        try:
            if workers > 1:
                config.bind_socket().close()
            else:  # one worker: asyncio binds every address the name resolves to
                asyncio.run(bind_and_close(host, port))
            binds = True
        except (SystemExit, OSError):
            binds = False
        assert (unlistenable(host, workers) is None) == binds, host


def test_a_list_setting_that_is_not_json_is_one_line_too():
    env = {**os.environ, "EMOTION_CORS_ORIGINS": "http://a.example"}
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    # the variable, as every other refused setting is named (pydantic named the field)
    assert line.startswith("emotion service: cannot start: EMOTION_CORS_ORIGINS="
                           "'http://a.example': not JSON") and "as JSON" in line


def test_the_launcher_listens_where_the_settings_say_and_options_override():
    from service.__main__ import parse_args
    from service.settings import Settings

    settings = Settings(host="0.0.0.0", port=9123)
    assert (parse_args([], settings).host, parse_args([], settings).port) == ("0.0.0.0", 9123)
    assert parse_args(["--port", "8100"], settings).port == 8100
    assert (parse_args([]).host, parse_args([]).port) == ("127.0.0.1", 8000)
    # as EMOTION_PORT is checked: one worker listened on 99999 modulo 65536, two died in a
    # traceback
    for port in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as refused:
            parse_args(["--port", port], settings)
        assert refused.value.code == 2


def test_make_serve_leaves_the_address_to_the_settings_unless_given():
    """make serve passed --host 127.0.0.1 --port 8000 always, over EMOTION_HOST/PORT; and
    HOST or PORT in the environment (tcsh exports HOST, the machine's name) do not count."""
    def serve_command(*args: str) -> str:
        # not as a sub-make of `make test` (CI's): that prints the directory it enters
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL",
                                                               "MFLAGS")}
        env.update(HOST="machine-name", PORT="1234", EMOTION_PORT="9000")
        result = subprocess.run(["make", "--no-print-directory", "-n", "serve", *args],
                                cwd=REPO, capture_output=True, text=True, env=env, check=True)
        return result.stdout.strip().splitlines()[-1]

    assert serve_command().endswith("-m service")
    assert serve_command("PORT=").endswith("-m service")  # a wrapper's unset $PORT
    assert serve_command("PORT=9100", "HOST=0.0.0.0").endswith(
        "-m service --host 0.0.0.0 --port 9100")


def dockerfile_healthcheck() -> list[str]:
    after = DOCKERFILE.read_text().split("\nHEALTHCHECK ", 1)[1]
    return json.loads(after.split("CMD ", 1)[1].splitlines()[0])


def predictions_per_worker(folder: Path) -> list[float]:
    """Each worker's own count of answered /predict requests, read from its file alone."""
    counts = []
    for worker_file in sorted(folder.glob("counter_*.db")):
        with tempfile.TemporaryDirectory(dir=folder.parent) as alone:
            shutil.copy(worker_file, alone)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=alone)
            counts.append(sum(s.value for family in registry.collect() for s in family.samples
                              if s.name == "emotion_http_requests_total"
                              and s.labels.get("route") == "/predict"))
    return counts


@pytest.mark.parametrize("folder_given", [True, False], ids=["given folder", "launcher's folder"])
def test_metrics_add_up_across_several_workers(data_settings, tmp_path, folder_given):
    """Without PROMETHEUS_MULTIPROC_DIR the launcher makes the folder (under TMPDIR here),
    and removes it when it stops."""
    given = tmp_path / "metrics"
    given.mkdir()
    env = ({"PROMETHEUS_MULTIPROC_DIR": str(given)} if folder_given
           else {"TMPDIR": str(given)})
    face = real_face(data_settings)

    def predict(_) -> int:  # a connection of its own, so that either worker may take it
        with httpx.Client(timeout=30) as client:
            return client.post(f"{base}/predict", files={"file": (
                "f.jpg", face, "image/jpeg")}).status_code

    with running_server(workers=2, env=env) as base:
        folder = given if folder_given else next(given.glob("emotion-metrics-*"))
        requests, per_worker = 0, []
        # The kernel hands connections to either worker as it likes: send until both answered.
        with ThreadPoolExecutor(4) as pool:
            while requests < 400 and (len(per_worker) < 2 or min(per_worker) == 0):
                assert list(pool.map(predict, range(8))) == [200] * 8
                requests += 8
                per_worker = predictions_per_worker(folder)
        # a request is counted once its answer has gone: the last few may trail the client
        deadline = time.monotonic() + 10
        while sum(per_worker) < requests and time.monotonic() < deadline:
            time.sleep(0.05)
            per_worker = predictions_per_worker(folder)
        scrapes = [metric_total(httpx.get(f"{base}/metrics", headers={"accept": "text/plain"},
                                          timeout=30).text,
                                "emotion_http_requests_total", route="/predict")
                   for _ in range(4)]
    assert len(per_worker) == 2 and min(per_worker) > 0 and sum(per_worker) == requests
    assert scrapes == [requests] * 4  # whichever worker answers the scrape
    if not folder_given:  # the folder the launcher made goes with it
        assert list(given.iterdir()) == []


def test_a_dead_workers_in_flight_gauge_is_dropped_and_a_live_ones_kept(tmp_path,
                                                                         monkeypatch):
    """A worker killed mid-request (an OOM kill) leaves its in-flight count in its file; the
    exposition forgets it once its pid is gone, while a running worker's count stays."""
    from service.observability import ServiceMetrics

    worker = ("import os, sys, time\n"
              "from service.observability import ServiceMetrics\n"
              "ServiceMetrics().in_flight.set(int(sys.argv[1]))\n"
              "print('set', flush=True)\n"
              "time.sleep(60) if sys.argv[2] == 'live' else os._exit(0)\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", worker, "3", "dead"], cwd=REPO, env=env, check=True)
    live = subprocess.Popen([sys.executable, "-c", worker, "2", "live"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "set"
        assert len(list(tmp_path.glob("gauge_livesum_*.db"))) == 2
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        text = ServiceMetrics().render("text/plain")[0].decode()
        [in_flight] = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "emotion_predictions_in_flight"]
        assert in_flight == 2
        assert [p.name for p in tmp_path.glob("gauge_livesum_*.db")] == [
            f"gauge_livesum_{live.pid}.db"]
    finally:
        live.kill()
        live.wait()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_follows_the_deployment_contract():
    text = DOCKERFILE.read_text()
    assert text.count("FROM python:3.11-slim") == 2  # multi-stage
    assert '".[serve]"' in text and "torch" not in text.replace("no torch", "")
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "EXPOSE 8000" in text
    # Exec form, the launcher as the entrypoint: a Kubernetes `args:` replaces only the options.
    assert '\nENTRYPOINT ["python", "-m", "service"]' in text and "\nCMD [" in text
    assert "COPY models/" in text
    ignored = (REPO / ".dockerignore").read_text()
    assert ignored.splitlines()[1] == "*"  # everything out, then the few files let back in


def dockerfile_venv_runs() -> list[str]:
    """The RUN commands of either stage that use the venv, continuation lines joined."""
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    return [line.removeprefix("RUN ").strip() for line in lines
            if line.startswith("RUN ") and "/opt/venv" in line]


def test_the_image_compiles_what_a_worker_imports_in_the_stage_it_ships():
    """The warm-up ran in the build stage: its bytecode of the standard library, which
    python:3.11-slim ships without, stayed there, and each worker compiled 222 modules at
    every start, 0.4 s (a review)."""
    build, image = DOCKERFILE.read_text().split("\nFROM ")[1:]
    assert "service.warmup" not in build
    warmup = image.index("python -P -m service.warmup")
    assert image.index("COPY --from=build /opt/venv") < warmup < image.index("\nUSER ")
    assert warmup > image.index("./models/")  # it loads the models the image serves


@pytest.mark.parametrize(("file", "refused"), [
    (None, None), ("emotion_knn.joblib", "knn none"), ("face_crop.json", "cnn auto")])
def test_the_warm_up_fails_the_image_build_on_what_it_cannot_serve(tmp_path, file, refused):
    """The image's build runs it: a model or face detector the service would refuse fails
    the build, not the first request (checked before only inside the slow install test)."""
    folder = tampered_copy(tmp_path, file) if file else models_copy(tmp_path)
    result = subprocess.run([sys.executable, "-m", "service.warmup"], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "EMOTION_MODELS_DIR": str(folder)})
    assert result.returncode == (1 if refused else 0), result.stderr
    if refused:
        assert f"warm-up: /predict {refused}: 503 " in result.stderr, result.stderr


# The venv's modules a worker has imported once it has loaded the models and answered, whose
# source has no bytecode beside it.
UNCOMPILED_MODULES = """
import importlib.util, os, sys
from service.inference import Predictor
from service.settings import load_settings
import service.main
settings = load_settings()
Predictor.load(settings.models_dir, threads=1)
venv = sys.argv[1]
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    if path.startswith(venv) and path.endswith(".py"):
        if not os.path.exists(importlib.util.cache_from_source(path)):
            print(module.__name__)
"""


@pytest.mark.slow
def test_serve_extra_installs_without_torch_and_serves(tmp_path, data_settings):
    """Build the environment exactly as the Dockerfile does and start the service from it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    build = tmp_path / "src"  # a copy, like the image's build stage: no editable install
    build.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, build / name)
    shutil.copytree(REPO / "service", build / "service",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # The Dockerfile's RUN lines on the venv, on this one and these models; python:3.11-slim
    # writes bytecode, which this machine's environment may turn off; and a PYTHONPATH naming
    # the checkout would put its service/ before the venv's (a review ran the tests so)
    build_env = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    for command in dockerfile_venv_runs()[1:]:  # the first makes the venv, made above
        subprocess.run(command.replace("/opt/venv", str(venv)).replace(
            "/app/models", str(REPO / "models")), shell=True, cwd=build, check=True,
            env={**build_env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    probe = subprocess.run([python, "-c", "import importlib.util as u; "
                            "print(u.find_spec('torch'), u.find_spec('training'))"],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""})  # the checkout is not in it
    assert probe.stdout.split() == ["None", "None"], probe.stdout
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 1e6
    print(f"\nserve environment: {size_mb:.0f} MB")
    assert size_mb < 400, "the serve install grew: what pulled in a heavy dependency?"
    # Every module a worker imports from the venv has its bytecode, written at build time.
    uncompiled = subprocess.run([python, "-c", UNCOMPILED_MODULES, str(venv)],
                                capture_output=True, text=True, cwd=tmp_path, check=True,
                                env={**os.environ, "EMOTION_MODELS_DIR": str(REPO / "models"),
                                     "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": ""})
    assert uncompiled.stdout.split() == [], uncompiled.stdout[:500]
    # ... and none is compiled while serving (the loop, the page's files): bytecode a
    # worker writes at run time is what a read-only image would compile at every start.
    compiled_at_build = set(venv.rglob("*.pyc"))
    env = {"EMOTION_MODELS_DIR": str(REPO / "models"), "PYTHONPATH": "",
           "PYTHONDONTWRITEBYTECODE": ""}
    with running_server(python=python, env=env, cwd=tmp_path) as base:
        response = httpx.post(f"{base}/predict?model=knn", files={"file": (
            "face.jpg", real_face(data_settings), "image/jpeg")}, timeout=30)
        assert response.status_code == 200, response.text
        # the first WebP or TIFF loads every Pillow plugin, compiled at each start before
        # the warm-up loaded them too (a review: 46 modules, 150 ms per worker)
        for kind in ("WEBP", "TIFF"):
            converted = io.BytesIO()
            Image.open(io.BytesIO(real_face(data_settings))).save(converted, kind)
            response = httpx.post(f"{base}/predict", files={"file": (
                f"face.{kind.lower()}", converted.getvalue())}, timeout=30)
            assert response.status_code == 200, response.text
        for path in ("/", "/static/app.js", "/docs", "/metrics"):
            assert httpx.get(f"{base}{path}", timeout=30).status_code == 200, path
        # The image's HEALTHCHECK, run with the image's python, follows EMOTION_PORT, and
        # asks the container itself under Docker's proxy settings (their no_proxy CIDR
        # urllib does not read: the probe went to the proxy, a healthy container unhealthy)
        probe = [python, *dockerfile_healthcheck()[1:]]
        port = base.rsplit(":", 1)[1]
        behind_proxy = {"http_proxy": "http://127.0.0.1:1", "HTTP_PROXY": "http://127.0.0.1:1",
                        "no_proxy": "127.0.0.0/8", "NO_PROXY": "127.0.0.0/8"}
        for env, healthy in (({"EMOTION_PORT": port}, True), ({"EMOTION_PORT": "1"}, False),
                             ({"EMOTION_PORT": port, **behind_proxy}, True)):
            result = subprocess.run(probe, env={**os.environ, **env}, capture_output=True,
                                    timeout=30)
            assert (result.returncode == 0) == healthy, (env, result.stderr)
    assert sorted(map(str, set(venv.rglob("*.pyc")) - compiled_at_build)) == []
    # The command line comes with the same install, torch-free too.
    face = tmp_path / "face.jpg"
    face.write_bytes(real_face(data_settings))
    # Installed, not editable: no models beside the package, so the default is ./models.
    plain_env = {k: v for k, v in os.environ.items() if k != "EMOTION_MODELS_DIR"}
    result = subprocess.run([str(venv / "bin" / "emotion-detect"), "images", str(face), "--out",
                             str(tmp_path / "rows.csv"), "--workers", "1"],
                            env={**plain_env, "PYTHONPATH": ""}, capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 2


def test_the_trace_log_level_needs_no_uvicorn():
    """Any ASGI server (or a TestClient) may run the app; 'trace' was a ValueError there."""
    code = ("import logging, sys; from service.observability import configure_logging; "
            "configure_logging('TRACE'); assert 'uvicorn' not in sys.modules; "
            "print(logging.getLogger('service').level)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "5", result.stderr
