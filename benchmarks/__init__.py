"""Benchmarks that print figures (see RESULTS.md); run each with ``python -m benchmarks.<name>``."""

import argparse


def count(text: str) -> int:
    """argparse type: a count of at least 1 (0 gave tracebacks, or rates for nothing sent)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count of at least 1")
    return value
