"""Admission by bytes: the request bodies a worker holds at once stay within a budget.

The in-flight bound counts requests, not bytes: three of the largest legal ``/v2`` bodies at
once took one worker past 2.2 GB, past the pod's whole memory limit, and the kernel then
ended the worker with every request it held. Each model request holds a ticket on its
worker's budget; the body readers grow it with the bytes held (what arrives, then a ``/v2``
body's inflated size), not the declared length, which a client need never send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.errors import ApiError

SCOPE_KEY = "emotion.body_ticket"  # where the middleware puts a request's ticket


class BodyBudget:
    """One worker's budget of request-body bytes held at once (decompression runs in the
    executor's threads, so a lock)."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda delta: None,
                 on_refusal: Callable[[], None] = lambda: None):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()
        self._on_change, self._on_refusal = on_change, on_refusal

    def ticket(self) -> BodyTicket:
        return BodyTicket(self)


class BodyTicket:
    """One request's share of its worker's budget."""

    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.held = 0
        self.released = False  # a thread still inflating after the answer holds nothing

    def hold(self, size: int) -> None:
        """Grow this request's share to ``size`` bytes, or answer 503 (retry shortly) when
        that would pass the budget while other requests hold some of it. A request alone is
        bounded by its own size limits, so the largest one they allow always gets in."""
        budget = self.budget
        with budget._lock:
            more = size - self.held
            if more <= 0 or self.released:
                return
            refused = budget.held + more > budget.limit and budget.held > self.held
            if not refused:
                budget.held += more
                self.held = size
        if refused:
            # its share goes with it at once, not when its answer is sent: two large bodies
            # at once were both refused, the second for the first's bytes (a security review)
            self.release()
            budget._on_refusal()
            raise ApiError(503, "overloaded", "too many request bytes in flight; retry shortly",
                           headers={"Retry-After": "1"})
        budget._on_change(more)

    def release(self) -> None:
        with self.budget._lock:
            freed, self.held, self.released = self.held, 0, True
            self.budget.held -= freed
        if freed:
            self.budget._on_change(-freed)


def hold_body(scope: dict, size: int) -> None:
    """Grow the request's share to ``size`` bytes; nothing where no ticket was given (a route
    the middleware does not count)."""
    ticket = scope.get(SCOPE_KEY)
    if ticket is not None:
        ticket.hold(size)
