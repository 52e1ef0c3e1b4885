"""Benchmarks run by `make bench` (python -m benchmarks.bench); not part of the package."""
