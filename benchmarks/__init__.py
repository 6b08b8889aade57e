"""Benchmarks: `python -m benchmarks.run` (see BENCHMARKS.md)."""
