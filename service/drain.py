"""Graceful drain on SIGTERM: not ready at once, keep answering a moment, then finish up.

On SIGTERM a worker marks itself draining, so ``/readyz`` answers 503 and a load balancer
that health-checks it moves new requests elsewhere. It keeps answering for
``EMOTION_DRAIN_SECONDS``, then hands the signal to uvicorn, which stops accepting
connections and waits for every request it holds to be answered (up to
``EMOTION_SHUTDOWN_TIMEOUT_SECONDS``) before the lifespan ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass

logger = logging.getLogger("service")


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
        # drain. SIGINT, which uvicorn handles, still stops it at once.
        if state.draining:
            logger.debug("SIGTERM again: already draining")
            return
        state.draining = True
        logger.info("SIGTERM: draining; not ready, stopping in %.1f s", delay)
        loop.call_soon_threadsafe(loop.call_later, delay, previous, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
