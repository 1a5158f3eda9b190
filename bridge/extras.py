"""The optional extras: which feature needs which, checked before it is used.

A base install (``pip install koprs-bridge``) runs the bridge with HTTP and ``local:``
sources on NATS or Redis, the consumer side and the CLI. The rest is opt-in:

======================  ==============================================  ==================
extra                   needed for                                      without it
======================  ==============================================  ==================
``s3``                  ``s3:`` sources, ``S3Store``                    that source fails
``otel``                ``tracing.exporter: console`` or ``otlp``       the config fails
``faststream``          ``bridge.consumer.faststream``                  that import fails
``fast``                orjson: faster JSON encoding (same bytes)       the stdlib is used
======================  ==============================================  ==================

What fails raises :class:`~bridge.errors.MissingExtraError` (a ``ConfigError`` and an
``ImportError``) naming the ``pip install`` to run; ``koprs-bridge check`` reports it for a
config (exit status 2), ``run`` refuses to start with it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from bridge.errors import MissingExtraError

if TYPE_CHECKING:
    from bridge.service.config import BridgeConfig

__all__ = ["EXTRAS", "check_config_extras", "missing_module", "placeholder", "require_extra"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "s3": ("aioboto3", "aiobotocore", "botocore"),
    "otel": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
    "faststream": ("faststream",),
    "fast": ("orjson",),
}
"""The modules each extra installs (those the bridge imports)."""


def missing_module(modules: Sequence[str]) -> str | None:
    """The first of ``modules`` that cannot be imported, or None."""
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:  # a parent package is missing
            return module
    return None


def require_extra(extra: str, feature: str, modules: Sequence[str] | None = None) -> None:
    """Raise :class:`MissingExtraError` if ``extra`` (or the given ones of its ``modules``)
    is not installed; ``feature`` says what needs it (``source 'docs' (s3:)``)."""
    module = missing_module(EXTRAS[extra] if modules is None else modules)
    if module is not None:
        raise MissingExtraError(feature, extra, module)


def check_config_extras(config: BridgeConfig) -> None:
    """Raise :class:`MissingExtraError` for the first part of ``config`` whose extra is not
    installed: an ``s3:`` source, a tracing exporter."""
    for index, source in enumerate(config.sources):
        if source.s3 is not None:
            require_extra("s3", f"{config.origin}: sources[{index}] ({source.name!r}, s3:)")
    exporter = config.tracing.exporter
    if exporter == "console":
        feature = f"{config.origin}: tracing.exporter 'console'"
        require_extra("otel", feature, EXTRAS["otel"][:1])
    elif exporter != "none":
        require_extra("otel", f"{config.origin}: tracing.exporter {exporter!r}")


def placeholder(name: str, feature: str, error: MissingExtraError) -> type[Any]:
    """A stand-in for a class whose extra is missing (``S3Store`` without ``s3``): importing
    it works (``from bridge import *`` too), creating one raises ``error``."""

    def refuse(*_args: object, **_kwargs: object) -> NoReturn:
        raise MissingExtraError(feature, error.extra, error.name or "?") from error

    return type(name, (), {"__init__": refuse, "__doc__": str(error), "__module__": "bridge"})
