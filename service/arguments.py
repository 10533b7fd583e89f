"""argparse types shared by the command lines (emotion-detect, python -m service, python -m
training, the benchmarks): a mistake is argparse's one line and exit 2, never a traceback
or a run that does nothing."""

from __future__ import annotations

import argparse
import math


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def count(text: str) -> int:
    """At least 1: a count of 0 gave tracebacks, or figures for nothing done."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


# images or frames held decoded at once: 100,000 frames of a 640x480 video took 4.2 GB
MAX_BATCH_SIZE = 256


def batch_size(text: str) -> int:
    value = count(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_BATCH_SIZE}, the most "
                                         "images a batch holds in memory at once")
    return value


def non_negative(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def positive_seconds(text: str) -> float:
    """More than 0: a load run of 0 s ran for ever, a measurement of 0 s divided by zero."""
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a positive number of seconds")
    return value


def non_negative_seconds(text: str) -> float:
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} seconds is negative")
    return value


def port_number(text: str) -> int:
    """A TCP port, as EMOTION_PORT takes it: past 65535, one worker listened on the number
    modulo 65536 and several died in a traceback."""
    port = _whole_number(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1 to 65535)")
    return port
