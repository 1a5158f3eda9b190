"""The consumer side: decode what the bridge publishes, watch it, cache it, handle it."""

from bridge.consumer.decoding import (
    CustomResource,
    Envelope,
    UnknownEventTypeError,
    decode_cloudevent,
    decode_nats,
    decode_redis_entry,
    decode_structured,
)

__all__ = [
    "CustomResource",
    "Envelope",
    "UnknownEventTypeError",
    "decode_cloudevent",
    "decode_nats",
    "decode_redis_entry",
    "decode_structured",
]
