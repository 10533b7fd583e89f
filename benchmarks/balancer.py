"""nginx in front of service replicas on loopback, and a load run that kills one of them.

Each replica is ``python -m service`` with one worker, as a Kubernetes pod would run it;
nginx (Debian's package) balances them round-robin and, since a prediction is safe to
repeat, retries a request on the next replica when a connection fails, POST included
(``proxy_next_upstream ... non_idempotent``). Used by ``bench_scale_out`` and by the CI test
of the same fault, shorter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks import run_loop
from benchmarks.load import Outcome, one_face_each, post_images
from service.settings import Settings
from tests.server import free_port, wait_ready

REPO = Path(__file__).resolve().parents[1]

NGINX_CONF = """worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$msec $upstream_addr $upstream_status $status $request_time';
    access_log {folder}/nginx-access.log upstreams;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    # The largest body a replica takes (its /v2 limit); any larger, nginx's own 413 page
    client_max_body_size {body_bytes};
    # Bodies and responses stay in memory: nginx's workers run as another user, who cannot
    # write into a test's private temporary folder.
    client_body_buffer_size {body_bytes};
    proxy_max_temp_file_size 0;
    upstream emotion {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://emotion;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A prediction is safe to repeat: on a refused or broken connection, or a
            # replica that is overloaded or draining, try the next one, POST included.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries {tries};
            proxy_connect_timeout 1s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


NO_NGINX = "nginx is not installed: apt-get install nginx"


def nginx_binary() -> str | None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"  # root's PATH lacks /usr/sbin at times
    return nginx if Path(nginx).exists() else None


def largest_body(env: dict) -> int:
    """The largest request body a replica under ``env`` takes: a fixed 200 MB in nginx
    refused /v2's largest batch, which a replica answers (a review)."""
    limits = ("max_images_per_request", "max_upload_bytes")
    given = {key.upper(): value for key, value in env.items()}  # as the settings read them
    settings = Settings(**{name: given[f"EMOTION_{name.upper()}"] for name in limits
                           if f"EMOTION_{name.upper()}" in given})
    return max(settings.max_body_bytes, settings.max_oip_body_bytes)


def distinct_free_ports(count: int) -> list[int]:
    """``count`` free ports, none twice: each free_port() closes its socket, so the kernel
    may hand the same one out again (a review saw a repeat in 1 of 4,000 groups of 4)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class Balancer:
    """``replicas`` service processes and nginx in front of them, all on loopback."""

    def __init__(self, replicas: int, folder: Path, python: str = sys.executable,
                 env: dict | None = None):
        self.folder = Path(folder)
        self.python = python
        self.env = {**os.environ, "EMOTION_WORKERS": "1", "EMOTION_ONNX_THREADS": "1",
                    "EMOTION_LOG_LEVEL": "warning", **(env or {})}
        *self.ports, self.port = distinct_free_ports(replicas + 1)
        self.processes: list[subprocess.Popen | None] = [None] * replicas
        self.nginx: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.body_bytes = largest_body(self.env)

    def nginx_conf(self) -> str:
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;"
                            for p in self.ports)
        return NGINX_CONF.format(folder=self.folder, servers=servers, port=self.port,
                                 tries=len(self.ports), body_bytes=self.body_bytes)

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> subprocess.Popen:
        log = open(self.folder / f"replica-{i}.log", "a")  # noqa: SIM115
        process = subprocess.Popen(
            [self.python, "-m", "service", "--host", "127.0.0.1", "--port", str(self.ports[i])],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes[i] = process
        return process

    def kill(self, i: int) -> None:
        """SIGKILL: no drain, no goodbye; what a crashed or evicted pod does."""
        process = self.processes[i]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def __enter__(self) -> Balancer:
        nginx = nginx_binary()
        if nginx is None:
            raise RuntimeError(NO_NGINX)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(len(self.ports)):
                self.start(i)
            for i, process in enumerate(self.processes):
                wait_ready(self.replica_url(i), process=process,
                           log_path=self.folder / f"replica-{i}.log")
            conf = self.folder / "nginx.conf"
            conf.write_text(self.nginx_conf())
            # its own output kept: a failed start says why, before the folder goes
            nginx_log = self.folder / "nginx.out"
            with open(nginx_log, "w") as log:
                self.nginx = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.folder)],
                                              stdout=log, stderr=subprocess.STDOUT)
            wait_ready(self.url, 20, self.nginx, log_path=nginx_log)
        except BaseException:  # Ctrl-C or a failed start: no replica left running
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in [self.nginx, *self.processes]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [self.nginx, *self.processes]:
            if process is not None:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()


def percentiles(outcomes: list[Outcome]) -> dict:
    values = [o.latency * 1000 for o in outcomes if o.status == 200]
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2)}


def replica_requests(url: str) -> int:
    """Predictions this replica's own process has answered (its metrics start at zero)."""
    metrics = httpx.get(f"{url}/metrics", timeout=5).json()
    return int(sum(row["value"] for row in metrics["live"].get("emotion_http_requests", [])
                   if row.get("route") == "/predict"))


def run_fault_load(balancer: Balancer, images: list[bytes], seconds: float, kill_at: float,
                   restart_after: float, clients: int = 8, victim: int = 1,
                   after: float = 5.0) -> dict:
    """Load through nginx for ``seconds``, and at least ``after`` seconds past the restarted
    replica's readiness; SIGKILL replica ``victim`` at ``kill_at`` and start it again
    ``restart_after`` seconds later. Latency is split by phase: before the kill, from the
    kill until the restarted replica is ready, and after.

    nginx sends a request on to the next replica when the killed one had not begun its
    answer; one it had begun (killed between the headers and the body) reaches the client
    as a broken connection, which the load sends once more, as ``emotion-detect --url``
    does: ``retried`` counts those.
    """
    outcomes: list[Outcome] = []
    done = threading.Event()
    started = time.perf_counter()
    load = threading.Thread(target=lambda: run_loop(post_images(
        balancer.url, one_face_each(images), clients, outcomes=outcomes, stop=done.is_set,
        retries=1)))
    load.start()
    try:
        time.sleep(kill_at)
        killed = time.perf_counter()
        balancer.kill(victim)
        time.sleep(restart_after)
        restarted = time.perf_counter()
        process = balancer.start(victim)
        wait_ready(balancer.replica_url(victim), process=process)
        back = time.perf_counter()
        time.sleep(max(after, seconds - (back - started)))
    finally:
        done.set()
        load.join()
    served_after = replica_requests(balancer.replica_url(victim))
    failures = [o for o in outcomes if o.status != 200]
    phases = {"before": [o for o in outcomes if o.sent_at < killed],
              "during": [o for o in outcomes if killed <= o.sent_at < back],
              "after": [o for o in outcomes if o.sent_at >= back]}
    return {
        "seconds": round(time.perf_counter() - started, 1), "clients": clients,
        "replicas": len(balancer.ports),
        "killed_at_s": round(killed - started, 2), "restarted_at_s": round(restarted - started, 2),
        "ready_again_at_s": round(back - started, 2),
        "sent": len(outcomes), "succeeded": len(outcomes) - len(failures),
        "failed": len(failures), "retried": sum(o.retried for o in outcomes),
        "failures": [{"status": o.status, "error": o.error} for o in failures],
        "phases": {name: percentiles(group) for name, group in phases.items()},
        "served_after_restart": served_after,
    }


def throughput(balancer: Balancer, images: list[bytes], seconds: float, clients: int) -> dict:
    outcomes, wall = run_loop(post_images(balancer.url, one_face_each(images), clients,
                                             seconds=seconds))
    ok = [o for o in outcomes if o.status == 200]
    return {"replicas": len(balancer.ports), "clients": clients,
            "images_per_s": round(len(ok) / wall, 1), "failed": len(outcomes) - len(ok),
            **percentiles(outcomes)}
