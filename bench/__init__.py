"""Benchmarks of koprs-bridge: ``make bench`` (or ``python -m bench``); see bench/README.md."""
