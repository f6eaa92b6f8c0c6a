"""Benchmarks for mailproc; run ``python -m bench.intake``."""
