"""Start the real service (``python -m service``) in a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def run_training(args: list[str], env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m training *args`` in the checkout, its output captured as text, with
    ``env`` over this process's environment."""
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base: str, timeout: float = 90.0, process: subprocess.Popen | None = None,
               log_path: Path | None = None) -> None:
    """Until ``base``/readyz answers 200; a process that exits first is an error, and so is
    one that answers with a model or the face detector refused (it never loads them later:
    a 90 s wait ended in a timeout that did not say why)."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            output = (process.stdout.read() if process.stdout
                      else log_path.read_text() if log_path else "")
            raise RuntimeError(f"server exited with {process.returncode}: {output}")
        try:
            answer = httpx.get(f"{base}/readyz", timeout=1)
            if answer.status_code == 200:
                return
            body = answer.json()
            states = [*body.get("models", {}).values(), body.get("faces", "ready")]
            if not body.get("draining") and any(state != "ready" for state in states):
                raise RuntimeError(f"{base} is up but will not be ready: {answer.text}")
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base} not ready after {timeout} s")
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(python: str = sys.executable, workers: int = 1, env: dict | None = None,
                   cwd: Path = REPO, timeout: float = 90.0, log_path: Path | None = None,
                   app: str | None = None):
    """Yield the base URL once /readyz answers 200. With ``log_path``, the server's output
    goes to that file (read it after the block); otherwise it is kept for error messages.
    ``app`` (``module:attribute``) runs that ASGI app under bare uvicorn instead of the
    service's launcher."""
    with server_process(python, workers, env, cwd, timeout, log_path, app) as (base, _):
        yield base


@contextlib.contextmanager
def server_process(python: str = sys.executable, workers: int = 1, env: dict | None = None,
                   cwd: Path = REPO, timeout: float = 90.0, log_path: Path | None = None,
                   app: str | None = None):
    """Like :func:`running_server`, yielding ``(base_url, process)``."""
    port = free_port()
    command = [python, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    if app:
        command = [python, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"]
    env = {"EMOTION_LOG_LEVEL": "warning", **(env or {}), "EMOTION_WORKERS": str(workers)}
    log = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env},
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout, process, log_path)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            log.close()
        else:
            process.stdout.close()  # a ResourceWarning at each server's end, under -W error
