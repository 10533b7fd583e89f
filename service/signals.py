"""Signal handlers swapped for the length of a block, for the command lines' work that must
not be cut in the middle (an output rewritten in place, a dataset moved into place)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

# What ends a command line's run from outside: Ctrl-C, a supervisor, a closed terminal.
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def handlers_swapped(numbers: tuple[int, ...], handler: Callable,
                     only_where_default: bool = False) -> Iterator[None]:
    """``handler`` for each of ``numbers`` inside the block, the earlier ones after it.
    Python runs handlers in the main thread, whichever thread a signal reaches, so handlers
    are swapped rather than the signal mask; off the main thread, where handlers cannot be
    set, nothing changes. ``only_where_default``: leave a signal the caller set otherwise
    (nohup's ignored SIGHUP stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {number: signal.signal(number, handler) for number in numbers
              if not only_where_default or signal.getsignal(number) == signal.SIG_DFL}
    try:
        yield
    finally:
        for number, earlier in before.items():  # None: set outside Python, as by default
            signal.signal(number, signal.SIG_DFL if earlier is None else earlier)


@contextlib.contextmanager
def signals_held(*numbers: int) -> Iterator[None]:
    """The signals that arrive inside are raised again just after it, each to the handler it
    had (numpy's threads may take them: see :func:`handlers_swapped`)."""
    arrived: list[int] = []
    # An ignored signal stays ignored: handled, it is reset to its default in the processes
    # started inside (a forkserver and its workers under nohup died at a closed terminal).
    numbers = tuple(n for n in numbers if signal.getsignal(n) != signal.SIG_IGN)
    try:
        with handlers_swapped(numbers, lambda number, frame: arrived.append(number)):
            yield
    finally:
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


class Stopped(KeyboardInterrupt):
    """A SIGTERM or SIGHUP taken as Ctrl-C is, so that the same clean-up runs; the exit
    status still says which (128 + its number)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number

    def __reduce__(self):  # rebuilt from its number, not its name, in another process
        return Stopped, (self.number,)


def raise_stopped(number: int, frame) -> None:
    raise Stopped(number)


def stops_taken_as_ctrl_c() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP raise :class:`Stopped` inside the block, so that Ctrl-C's clean-up
    runs for them too; one the caller set otherwise (nohup's ignored SIGHUP) stays as it is."""
    return handlers_swapped((signal.SIGTERM, signal.SIGHUP), raise_stopped,
                            only_where_default=True)
