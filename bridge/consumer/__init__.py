"""The consumer side: decode what the bridge publishes, watch it, cache it, handle it."""

from bridge.consumer.base import Delivery, Synced, Watch, WatchItem
from bridge.consumer.decoding import (
    CustomResource,
    Envelope,
    UnknownEventTypeError,
    decode_cloudevent,
    decode_nats,
    decode_redis_entry,
    decode_structured,
)
from bridge.consumer.handler import (
    EventHandler,
    FunctionHandler,
    TerminateReason,
    event_handler,
    run_handler,
)
from bridge.consumer.nats import NatsWatch, NatsWatchConfig, watch_nats
from bridge.consumer.redis import RedisWatch, RedisWatchConfig, watch_redis
from bridge.consumer.reflector import Reflector

__all__ = [
    "CustomResource",
    "Delivery",
    "Envelope",
    "EventHandler",
    "FunctionHandler",
    "NatsWatch",
    "NatsWatchConfig",
    "RedisWatch",
    "RedisWatchConfig",
    "Reflector",
    "Synced",
    "TerminateReason",
    "UnknownEventTypeError",
    "Watch",
    "WatchItem",
    "decode_cloudevent",
    "decode_nats",
    "decode_redis_entry",
    "decode_structured",
    "event_handler",
    "run_handler",
    "watch_nats",
    "watch_redis",
]
