"""Benchmark suite of smes_fused: run ``python -m bench --help``."""
