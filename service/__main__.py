"""``python -m service``: check the models' manifest, then run uvicorn with the settings.

Why a launcher rather than bare ``uvicorn --workers N``: uvicorn's supervisor restarts a
worker that dies, so a missing or malformed manifest would become an endless loop of
start-up tracebacks. Here it is one clear line and exit status 2, before any worker starts.
One setting, ``EMOTION_WORKERS``, both starts the workers and divides the CPUs between their
ONNX Runtime thread pools, and several workers get a shared Prometheus folder by themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from service.arguments import port_number
from service.manifest import ManifestError, load_manifest, require_default_model
from service.settings import Settings, SettingsError, load_settings

# uvicorn's options beside the settings', shared with the image's warm-up. The service writes
# its own JSON access log. No WebSocket handshake: the service has no WebSocket route, and
# with one uvicorn answered an upgrade request itself (403, no request id, no access line, not
# counted); without one, it reaches the service as the plain HTTP request it also is.
SERVER_OPTIONS = {"access_log": False, "ws": "none"}
METRICS_LOCK = "launcher.lock"  # not *.db: prometheus-client reads only those


def hold_metrics_folder(folder: str) -> str | None:
    """Lock ``folder`` for this launcher's life (the lock goes with the process, a kill
    included); where another launcher holds it, who: "pid N". Raises OSError where the lock
    file cannot be opened, or is not a regular file."""
    import fcntl
    import stat

    from service.observability import process_alive

    path = os.path.join(folder, METRICS_LOCK)
    # not through a link another user left there (its target was emptied and written), nor
    # stuck opening a FIFO
    flags = os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        descriptor, writable = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644), True
    except PermissionError:  # another user's lock file: a read-only descriptor locks too
        descriptor, writable = os.open(path, os.O_RDONLY | flags), False
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(f"{METRICS_LOCK} is not a regular file")
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with os.fdopen(descriptor, "rb") as lock:  # bytes: what another left need not be text
            pid = lock.read(32).decode("ascii", errors="replace").strip()
        # a holder that could not write its pid left another's there, maybe long gone
        alive = pid.isascii() and pid.isdigit() and process_alive(int(pid))
        return f"pid {pid}" if alive else "its pid not known"
    if writable:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
    return None  # the descriptor stays open, and the lock held, until the process ends


def parse_args(argv: list[str] | None = None, settings: Settings | None = None
               ) -> argparse.Namespace:
    settings = settings or Settings.model_construct()  # the fields' defaults
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve the emotion models over HTTP. Other "
        "settings come from EMOTION_* environment variables (see the README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default=settings.host,
                        help="interface to listen on (EMOTION_HOST)")
    parser.add_argument("--port", type=port_number, default=settings.port,
                        help="port to listen on (EMOTION_PORT)")
    return parser.parse_args(argv)


def unlistenable(host: str, workers: int = 1) -> str | None:
    """Why nothing can listen on ``host``, or None. Found by uvicorn, it came after both
    models had loaded (exit 3): empty (every interface, to uvicorn), a name that does not
    resolve, an address of another machine. Probed as uvicorn binds, on a free port (the
    chosen one may be taken, which uvicorn says itself): one worker binds every address the
    name resolves to (`::1 localhost` on a machine without IPv6 fails); several share one
    socket bound to ``(host, port)``, which drops an IPv6 scope (a link-local address then
    fails)."""
    if not host.strip():
        return "empty; unset it for the default"
    try:
        if workers > 1:  # uvicorn's Config.bind_socket
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            found = [(family, socket.SOCK_STREAM, 0, "", (host, 0))]
        else:  # asyncio's create_server: each address once
            found = list(dict.fromkeys(socket.getaddrinfo(
                host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)))
    except OSError as exc:
        return exc.strerror or str(exc)
    port = 0
    with contextlib.ExitStack() as held:  # all at once on one port, as asyncio binds them
        for family, kind, protocol, _, address in found:
            try:
                probe = held.enter_context(socket.socket(family, kind, protocol))
                if workers == 1:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:  # asyncio's; refuses ::ffff:127.0.0.1
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((address[0], port, *address[2:]))
                probe.listen(1)  # 0.0.0.0 and 127.0.0.1 both bind one port, not both listen
                port = probe.getsockname()[1]
            except OSError as exc:  # the address, where the name stands for several
                where = f"{address[0]}: " if address[0] != host else ""
                return f"{where}{exc.strerror or exc}"
    return None if found else "no address"


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        parse_args(argv)  # --help still answers, with the fields' own defaults
        print(f"emotion service: cannot start: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv, settings)
    unusable = unlistenable(args.host, settings.resolved_workers)
    if unusable:
        print(f"emotion service: cannot start: --host or EMOTION_HOST {args.host!r}: "
              f"{unusable}; give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0",
              file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(settings.models_dir)
        require_default_model(manifest, settings.default_model, settings.models_dir)
    except ManifestError as exc:
        print(f"emotion service: cannot start: {exc}", file=sys.stderr)
        return 2
    missing = [e.file for e in manifest.models.values()
               if not (settings.models_dir / e.file).is_file()]
    if len(missing) == len(manifest.models):
        print(f"emotion service: cannot start: none of the model files {missing} is in "
              f"{settings.models_dir}", file=sys.stderr)
        return 2

    import uvicorn

    metrics_dir = None
    workers = settings.resolved_workers
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # set at all, even empty, prometheus-client writes its files there (empty: the cwd)
    if given is not None and not (given and os.path.isdir(given)
                                  and os.access(given, os.W_OK | os.X_OK)):
        # every worker would die writing its first metric, and uvicorn start another
        print(f"emotion service: cannot start: PROMETHEUS_MULTIPROC_DIR={given!r} is not a "
              "writable folder; create it or unset the variable", file=sys.stderr)
        return 2
    if given:
        try:
            holder = hold_metrics_folder(given)
        except OSError as exc:  # a traceback and exit 1 before, a crash loop under a policy
            print(f"emotion service: cannot start: PROMETHEUS_MULTIPROC_DIR={given!r}: cannot "
                  f"open its {METRICS_LOCK} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        if holder is not None:
            # clearing it deleted the other service's files, and each /metrics added up both
            print(f"emotion service: cannot start: PROMETHEUS_MULTIPROC_DIR={given!r} is in "
                  f"use by another running service ({holder}); give each its own folder",
                  file=sys.stderr)
            return 2
        # A container restarted in the same pod keeps its emptyDir: the dead workers' files
        # would be added up with the new ones.
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
    if workers > 1:
        from service.drain import supervisor_stops_listening_after

        supervisor_stops_listening_after(settings.drain_seconds)
    if workers > 1 and not given:
        # Each worker writes its counters here so that /metrics adds up all of them.
        try:
            metrics_dir = tempfile.mkdtemp(prefix="emotion-metrics-")
        except OSError as exc:  # a read-only root with no /tmp mounted: a traceback before
            print("emotion service: cannot start: no writable temporary folder for the "
                  f"workers' metrics ({exc.strerror or exc}); mount one at /tmp (docker run "
                  "--tmpfs /tmp) or set PROMETHEUS_MULTIPROC_DIR to a writable folder",
                  file=sys.stderr)
            return 2
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("service.main:app", host=args.host, port=args.port,
                    workers=workers, log_level=settings.log_level.lower(),
                    timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
                    **SERVER_OPTIONS)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
