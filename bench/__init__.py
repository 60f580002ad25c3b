"""Benchmarks: time the stages and the service; top-level consumers like the CLI."""
