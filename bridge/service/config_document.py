"""Reading a whole config document: the top level, ``broker``, ``leader_election``, ``server``,
``tracing`` and ``logging`` (the ``sources``: :mod:`bridge.service.config_sources`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.redis_urls import REDIS_SCHEMES, check_nats_urls, check_redis_url
from bridge.secrets import redact_url
from bridge.service.config import (
    BridgeConfig,
    BrokerConfig,
    LeaderElectionConfig,
    LoggingConfig,
    ServerConfig,
    TracingConfig,
)
from bridge.service.config_sources import SourceReader

__all__ = ["DocumentReader"]


class DocumentReader(SourceReader):
    """A whole document: :meth:`bridge` reads it into a :class:`BridgeConfig`."""

    def bridge(self, raw: dict[str, Any]) -> BridgeConfig:
        doc = self.mapping(
            raw,
            {"broker", "leader_election", "state", "sources", "server", "tracing", "logging"},
            {"broker", "sources"},
        )
        with self.at("broker"):
            broker = self.broker(doc["broker"])
        election = None
        if doc.get("leader_election") is not None:
            with self.at("leader_election"):
                election = self.leader_election(doc["leader_election"])
        state_path = None
        if doc.get("state") is not None:
            with self.at("state"):
                state = self.mapping(doc["state"], {"path"}, {"path"})
                with self.at("path"):
                    state_path = Path(self.string(state["path"]))
        with self.at("sources"):
            items = doc["sources"]
            if not isinstance(items, list) or not items:
                self.fail("must be a non-empty list of sources")
            sources = []
            seen: dict[str, int] = {}
            for index, item in enumerate(items):
                with self.at(index):
                    source = self.source(item)
                    if source.name in seen:
                        self.fail(
                            f"name {source.name!r} is already used by sources[{seen[source.name]}]"
                        )
                    seen[source.name] = index
                    sources.append(source)
        extra: dict[str, Any] = {}
        for key in ("server", "tracing", "logging"):
            if doc.get(key) is not None:
                with self.at(key):
                    extra[key] = getattr(self, key)(doc[key])
        return BridgeConfig(
            broker=broker,
            sources=tuple(sources),
            leader_election=election,
            state_path=state_path,
            origin=self.origin,
            **extra,
        )

    def server(self, raw: Any) -> ServerConfig:
        doc = self.mapping(raw, {"host", "port", "metrics"})
        fields: dict[str, Any] = {}
        if "host" in doc:
            with self.at("host"):
                fields["host"] = self.string(doc["host"])
        if "port" in doc:
            with self.at("port"):
                fields["port"] = self.integer(doc["port"])
                if fields["port"] > 65535:
                    self.fail(f"must be a TCP port (0-65535), not {doc['port']!r}")
        if "metrics" in doc:
            with self.at("metrics"):
                fields["metrics"] = self.boolean(doc["metrics"])
        return ServerConfig(**fields)

    def tracing(self, raw: Any) -> TracingConfig:
        doc = self.mapping(raw, {"exporter", "endpoint", "service_name", "sample_ratio"})
        fields: dict[str, Any] = {}
        if "exporter" in doc:
            with self.at("exporter"):
                if doc["exporter"] not in ("none", "console", "otlp"):
                    self.fail(f"must be 'none', 'console' or 'otlp', not {doc['exporter']!r}")
                fields["exporter"] = doc["exporter"]
        if "endpoint" in doc:
            with self.at("endpoint"):
                endpoint = self.string(doc["endpoint"])
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    self.fail(f"must be an http:// or https:// URL, not {endpoint!r}")
                fields["endpoint"] = endpoint
        if "service_name" in doc:
            with self.at("service_name"):
                fields["service_name"] = self.string(doc["service_name"])
        if "sample_ratio" in doc:
            with self.at("sample_ratio"):
                ratio = doc["sample_ratio"]
                if isinstance(ratio, bool) or not isinstance(ratio, int | float):
                    self.fail(f"must be a number from 0 to 1, not {ratio!r}")
                if not 0 <= ratio <= 1:
                    self.fail(f"must be from 0 to 1, not {ratio!r}")
                fields["sample_ratio"] = float(ratio)
        return TracingConfig(**fields)

    def logging(self, raw: Any) -> LoggingConfig:
        doc = self.mapping(raw, {"format", "level"})
        fields: dict[str, Any] = {}
        if "format" in doc:
            with self.at("format"):
                if doc["format"] not in ("text", "json"):
                    self.fail(f"must be 'text' or 'json', not {doc['format']!r}")
                fields["format"] = doc["format"]
        if "level" in doc:
            with self.at("level"):
                level = str(doc["level"]).upper()
                if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                    self.fail(f"must be debug, info, warning or error, not {doc['level']!r}")
                fields["level"] = level
        return LoggingConfig(**fields)

    def broker(self, raw: Any) -> BrokerConfig:
        keys = {
            "url",
            "stream",
            "subject_prefix",
            "content_mode",
            "duplicate_window",
            "max_age",
            "max_msgs_per_subject",
            "replicas",
            "maxlen",
            "ack_timeout",
            "tls",
            "auth",
        }
        doc = self.mapping(raw, keys, {"url"})
        with self.at("url"):
            url = self.secret(doc["url"])
            scheme = urlsplit(url.reveal()).scheme.lower()
            kinds = {"nats": "nats", "tls": "nats", **dict.fromkeys(REDIS_SCHEMES, "redis")}
            if scheme not in kinds:
                self.fail(
                    f"must start with nats://, tls://, redis://, rediss://, redis+cluster://, "
                    f"redis+sentinel:// (or rediss+...), got {redact_url(url.reveal())!r}"
                )
            if kinds[scheme] == "redis" and (problem := check_redis_url(url.reveal())):
                self.fail(f"{problem} (got {redact_url(url.reveal())!r})")
            if kinds[scheme] == "nats" and (problem := check_nats_urls(url.reveal())):
                self.fail(f"{problem} (got {redact_url(url.reveal())!r})")
        fields: dict[str, Any] = {"url": url, "kind": kinds[scheme]}
        if "stream" in doc:
            with self.at("stream"):
                fields["stream"] = self.string(doc["stream"])
                if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fields["stream"]):
                    self.fail("must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
        if "subject_prefix" in doc:
            with self.at("subject_prefix"):
                prefix = self.string(doc["subject_prefix"])
                if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", prefix):
                    self.fail(
                        f"must be dot-separated tokens of A-Z, a-z, 0-9, '_', '-', not {prefix!r}"
                    )
                fields["subject_prefix"] = prefix
        if "content_mode" in doc:
            with self.at("content_mode"):
                if doc["content_mode"] not in ("binary", "structured"):
                    self.fail(f"must be 'binary' or 'structured', not {doc['content_mode']!r}")
                fields["content_mode"] = doc["content_mode"]
        for key, attr in (
            ("duplicate_window", "duplicate_window_s"),
            ("ack_timeout", "ack_timeout_s"),
        ):
            if key in doc:
                with self.at(key):
                    fields[attr] = self.duration(doc[key])
        if "max_age" in doc:
            with self.at("max_age"):
                fields["max_age_s"] = self.duration(doc["max_age"])
        for key, minimum in (("max_msgs_per_subject", 0), ("replicas", 1), ("maxlen", 1)):
            if key in doc:
                with self.at(key):
                    fields[key] = self.integer(doc[key], minimum=minimum) or None
        if doc.get("tls") is not None:
            with self.at("tls"):
                fields["tls"] = self.tls(doc["tls"])
        if doc.get("auth") is not None:
            with self.at("auth"):
                fields["auth"] = self.auth(doc["auth"], nats=kinds[scheme] == "nats")
        return BrokerConfig(**fields)

    def leader_election(self, raw: Any) -> LeaderElectionConfig:
        doc = self.mapping(
            raw, {"redis_url", "lease_ttl", "renew_every", "tls", "auth"}, {"redis_url"}
        )
        with self.at("redis_url"):
            url = self.secret(doc["redis_url"])
            if problem := check_redis_url(url.reveal()):
                self.fail(f"{problem} (got {redact_url(url.reveal())!r})")
        ttl = 10.0
        if "lease_ttl" in doc:
            with self.at("lease_ttl"):
                ttl = self.duration(doc["lease_ttl"])
        renew = None
        if "renew_every" in doc:
            with self.at("renew_every"):
                renew = self.duration(doc["renew_every"])
                if renew >= ttl:
                    self.fail(f"must be shorter than lease_ttl ({ttl:g} s), got {renew:g} s")
        tls = auth = None
        if doc.get("tls") is not None:
            with self.at("tls"):
                tls = self.tls(doc["tls"])
        if doc.get("auth") is not None:
            with self.at("auth"):
                auth = self.auth(doc["auth"], nats=False)
        return LeaderElectionConfig(
            redis_url=url, lease_ttl_s=ttl, renew_every_s=renew, tls=tls, auth=auth
        )
