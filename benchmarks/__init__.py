"""Benchmarks that print figures (see RESULTS.md); run each with ``python -m benchmarks.<name>``."""
