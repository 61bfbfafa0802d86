"""Benchmarks: ``python -m benchmarks.ldv1``."""
