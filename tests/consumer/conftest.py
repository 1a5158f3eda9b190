"""Consumers: list-then-watch, resume, fan-out, the reflector cache, handlers, FastStream and
``koprs-bridge tail``."""
