"""Graceful drain on SIGTERM: not ready at once, keep answering a moment, then finish up.

On SIGTERM a worker marks itself draining, so ``/readyz`` answers 503 and a load balancer
that health-checks it moves new requests elsewhere. It keeps answering for
``EMOTION_DRAIN_SECONDS``, then hands the signal to uvicorn, which stops accepting
connections and waits for every request it holds to be answered (up to
``EMOTION_SHUTDOWN_TIMEOUT_SECONDS``) before the lifespan ends. With several workers, the
supervisor stops listening just after them (:func:`supervisor_stops_listening_after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from dataclasses import dataclass

logger = logging.getLogger("service")
WORKERS_CLOSE_WITHIN = 0.5  # seconds after their drain: uvicorn's tick is 0.1 s


@dataclass
class DrainState:
    draining: bool = False


def install_sigterm_drain(state: DrainState, delay: float) -> bool:
    """Chain a SIGTERM handler in front of uvicorn's; False where signals cannot be caught
    (not the main thread, as under a test client)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False
    loop = asyncio.get_running_loop()

    def on_sigterm(signum, frame):
        # Once is enough: a signal to the whole process group (systemd's control-group kill,
        # tini -g, kill -TERM -PGID) reaches a worker twice, directly and forwarded by
        # uvicorn's supervisor, and a second SIGTERM that stopped it at once skipped the
        # drain. SIGINT, which uvicorn handles, still skips it (Ctrl+C in a terminal).
        if state.draining:
            logger.debug("SIGTERM again: already draining")
            return
        state.draining = True
        logger.info("SIGTERM: draining; not ready, stopping in %.1f s", delay)
        loop.call_soon_threadsafe(loop.call_later, delay, previous, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def supervisor_stops_listening_after(delay: float) -> None:
    """With several workers, uvicorn's supervisor holds its own copy of the listening socket,
    so once the workers stopped accepting the kernel still took new connections into a
    backlog nobody read, until the last worker exited and they were reset. On SIGTERM (or
    SIGINT) the supervisor now shuts the socket for reading just after the workers' drain:
    new connections are refused, which a load balancer retries elsewhere at once. Not on
    SIGHUP or SIGTTOU, which retire single workers while the others go on listening.

    A patch of the supervisor's two handlers, in the launcher's process only: uvicorn offers
    no hook, and ``handle_term``/``handle_int`` and ``sockets`` are what every version since
    its own supervisor (0.30) has."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    def stop_listening(sockets: list[socket.socket]) -> None:
        for sock in sockets:
            # not on every platform for a listening socket: there, as before
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # for every process holding it, not only ours

    def then_stop_listening(handler):
        def handle(self) -> None:
            handler(self)
            # after the workers' own close (their SIGTERM comes next, then their delay, then
            # a tick of their loop): a socket shut while a worker still polled it had that
            # worker spin on accept() failing with EINVAL until it closed
            timer = threading.Timer(delay + WORKERS_CLOSE_WITHIN, stop_listening,
                                    [list(self.sockets)])
            timer.daemon = True
            timer.start()
        return handle

    if not getattr(Multiprocess, "stops_listening", False):
        Multiprocess.handle_term = then_stop_listening(Multiprocess.handle_term)
        Multiprocess.handle_int = then_stop_listening(Multiprocess.handle_int)
        Multiprocess.stops_listening = True
