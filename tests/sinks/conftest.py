"""Sinks: the ``Sink`` contract run against memory, NATS and Redis (test_sinks_contract.py),
and each backend's own behaviour beside it. Helpers: ``tests/support/events.py``."""
