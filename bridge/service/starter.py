"""``koprs-bridge init``: a commented starter ``bridge.yaml`` for the sources a user names.

The next step after the embedded default: the user names a broker and some sources
(``--http URL``, ``--s3 s3://bucket/prefix``, ``--local PATH``) and gets a config file that
``koprs-bridge check`` accepts as written, with every optional key shown as a comment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bridge.errors import ConfigError

__all__ = ["StarterOptions", "starter_config"]

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, kw_only=True)
class StarterOptions:
    broker: str = "nats://127.0.0.1:4222"
    redis: str | None = None
    """Leader election's Redis URL (several replicas); None: one replica, no election."""
    http: Sequence[str] = field(default_factory=tuple)
    s3: Sequence[str] = field(default_factory=tuple)
    local: Sequence[str] = field(default_factory=tuple)
    interval: str = "30s"


def starter_config(options: StarterOptions) -> str:
    """The YAML text of a starter config (see the module docstring)."""
    if not (options.http or options.s3 or options.local):
        raise ConfigError(
            "name at least one source: --http URL, --s3 s3://bucket/prefix, --local PATH"
        )
    scheme = urlsplit(options.broker).scheme
    if scheme not in ("nats", "tls", "redis", "rediss"):
        raise ConfigError(f"--broker {options.broker!r}: expected a nats:// or redis:// URL")
    names: set[str] = set()
    lines = [
        "# koprs-bridge config, written by `koprs-bridge init`. Check it with",
        "#   koprs-bridge check --config bridge.yaml",
        "# and run it with `koprs-bridge run --config bridge.yaml`.",
        "# Every key: the README's 'The service' section.",
        "# a JSON Schema for editors: `koprs-bridge config-schema`.",
        "# Secrets are never written inline: use {env: NAME} or {file: PATH}.",
        "",
        "broker:",
        f"  url: {_quote(options.broker)}",
    ]
    if scheme in ("nats", "tls"):
        lines += [
            "  # stream: KOPRS_EXTERNAL         # JetStream stream over koprs.external.>",
            "  # content_mode: binary           # or structured (one JSON document per message)",
            "  # duplicate_window: 2m           # dedup window for event ids",
        ]
    lines += ["  # auth: {password: {env: BROKER_PASSWORD}}", ""]
    if options.redis:
        lines += [
            "leader_election:                  # several replicas share the sources",
            f"  redis_url: {_quote(options.redis)}",
            "  lease_ttl: 10s",
            "",
        ]
    else:
        lines += [
            "# One replica. For several, add leader election (each source is polled by one):",
            "# leader_election:",
            "#   redis_url: {env: REDIS_URL}",
            "#   lease_ttl: 10s",
            "",
        ]
    lines += [
        "# server: {host: 0.0.0.0, port: 8080}   # /healthz, /readyz, /metrics",
        "",
        "sources:",
    ]
    for url in options.http:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--http {url!r}: expected an http:// or https:// URL")
        name = _unique(names, parts.hostname + parts.path)
        lines += [
            f"  - name: {name}",
            f"    interval: {options.interval}",
            "    # max_backoff: 16m              # ceiling of the retry delay after failures",
            "    # inline_body_bytes: 64KiB      # larger bodies are sent as a digest only",
            "    http:",
            f"      url: {_quote(url)}",
            "      # bearer_token: {env: APP_TOKEN}     # or {file: /var/run/secrets/token}",
            "      # headers: {Accept: application/json}",
            "      # timeout: 10s",
        ]
    for target in options.s3:
        parts = urlsplit(target)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"--s3 {target!r}: expected s3://bucket or s3://bucket/prefix")
        prefix = parts.path.lstrip("/")
        name = _unique(names, parts.netloc + "-" + prefix)
        lines += [
            f"  - name: {name}",
            f"    interval: {options.interval}",
            "    s3:                   # needs the s3 extra: pip install 'koprs-bridge[s3]'",
            f"      bucket: {_quote(parts.netloc)}",
            f"      prefix: {_quote(prefix)}",
            "      # endpoint_url: http://127.0.0.1:9000   # MinIO, SeaweedFS...; omit for AWS",
            "      # region: eu-west-1",
            "      # access_key_id: {env: S3_KEY}          # omit: the standard AWS chain",
            "      # secret_access_key: {env: S3_SECRET}",
        ]
    for path in options.local:
        name = _unique(names, path)
        create = "create: true " if not Path(path).is_dir() else "# create: true"
        lines += [
            f"  - name: {name}",
            f"    interval: {options.interval}",
            "    local:",
            f"      path: {_quote(path)}",
            f"      {create}                 # create the folder when missing",
        ]
    return "\n".join(lines) + "\n"


def _unique(taken: set[str], hint: str) -> str:
    """A source name (1-64 of ``A-Za-z0-9_-``) from ``hint``, unique among ``taken``."""
    base = _NAME_CHARS.sub("-", hint).strip("-_")[:56] or "source"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _quote(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    import json

    return json.dumps(value, ensure_ascii=False)
