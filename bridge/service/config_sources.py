"""Reading the ``sources`` of a config document: each one's name, interval and exactly one of
``http``, ``s3`` or ``local``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.secrets import redact_url
from bridge.service.config import (
    BasicAuthConfig,
    HttpSourceConfig,
    LocalSourceConfig,
    S3SourceConfig,
    SourceConfig,
)
from bridge.service.config_reader import Reader, kind
from bridge.subjects import SOURCE_NAME_PATTERN

__all__ = ["SourceReader"]

MIN_INTERVAL_S = 0.001
"""The shortest poll interval accepted."""


class SourceReader(Reader):
    """The ``sources[i]`` entries."""

    def source(self, raw: Any) -> SourceConfig:
        kinds = {"http", "s3", "local"}
        doc = self.mapping(
            raw,
            {"name", "interval", "max_backoff", "inline_body_bytes"} | kinds,
            {"name", "interval"},
        )
        with self.at("name"):
            name = self.string(doc["name"])
            if not SOURCE_NAME_PATTERN.match(name):
                self.fail(
                    f"{name!r} is not usable as a subject token: use 1-64 characters of "
                    "A-Z, a-z, 0-9, '_' or '-'"
                )
        with self.at("interval"):
            interval = self.duration(doc["interval"])
            if interval < MIN_INTERVAL_S:
                self.fail(
                    f"must be at least {MIN_INTERVAL_S * 1000:g}ms (a shorter one is a busy "
                    f"loop), got {doc['interval']!r}"
                )
        fields: dict[str, Any] = {"name": name, "interval_s": interval}
        if "max_backoff" in doc:
            with self.at("max_backoff"):
                fields["max_backoff_s"] = self.duration(doc["max_backoff"])
                if fields["max_backoff_s"] < interval:
                    self.fail(f"must be >= interval ({interval:g} s)")
        if "inline_body_bytes" in doc:
            with self.at("inline_body_bytes"):
                fields["inline_body_bytes"] = self.size(doc["inline_body_bytes"])
        given = sorted(kinds & doc.keys())
        if len(given) != 1:
            self.fail(
                "needs exactly one of http, s3, local"
                + (f" (found {', '.join(given)})" if given else "")
            )
        kind = given[0]
        with self.at(kind):
            fields[kind] = getattr(self, f"{kind}_source")(doc[kind])
        return SourceConfig(**fields)

    def http_source(self, raw: Any) -> HttpSourceConfig:
        doc = self.mapping(
            raw,
            {
                "url",
                "headers",
                "bearer_token",
                "basic_auth",
                "max_body_bytes",
                "timeout",
                "verify_tls",
                "tls",
                "max_redirects",
            },
            {"url"},
        )
        with self.at("url"):
            url = self.string(doc["url"])
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self.fail(f"must be an absolute http:// or https:// URL, not {url!r}")
            if "@" in parts.netloc:
                self.fail(
                    f"must not carry credentials ({redact_url(url)!r}): it appears in every "
                    "event and log line; use basic_auth or bearer_token"
                )
        fields: dict[str, Any] = {"url": url}
        if "headers" in doc:
            with self.at("headers"):
                headers = doc["headers"]
                if not isinstance(headers, dict):
                    self.fail(f"must be a mapping of header names to values, not {kind(headers)}")
                parsed = {}
                for header, value in headers.items():
                    with self.at(str(header)):
                        if not isinstance(header, str) or not re.fullmatch(
                            r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", header
                        ):
                            self.fail("is not a valid HTTP header name")
                        parsed[header] = self.secret(
                            str(value) if isinstance(value, int | float) else value
                        )
                fields["headers"] = parsed
        if "bearer_token" in doc:
            with self.at("bearer_token"):
                fields["bearer_token"] = self.secret(doc["bearer_token"])
        if "max_body_bytes" in doc:
            with self.at("max_body_bytes"):
                fields["max_body_bytes"] = self.size(doc["max_body_bytes"])
        if "timeout" in doc:
            with self.at("timeout"):
                fields["timeout_s"] = self.duration(doc["timeout"])
        if "verify_tls" in doc:
            with self.at("verify_tls"):
                verify = doc["verify_tls"]
                if isinstance(verify, str):
                    if not Path(verify).is_file():
                        self.fail(f"CA bundle {verify!r} does not exist")
                elif not isinstance(verify, bool):
                    self.fail("must be true, false or the path of a CA bundle")
                fields["verify_tls"] = verify
        if doc.get("basic_auth") is not None:
            with self.at("basic_auth"):
                basic = self.mapping(
                    doc["basic_auth"], {"username", "password"}, {"username", "password"}
                )
                with self.at("username"):
                    username = self.string(basic["username"])
                    if ":" in username:
                        self.fail("must not contain ':'")
                with self.at("password"):
                    password = self.secret(basic["password"])
                fields["basic_auth"] = BasicAuthConfig(username=username, password=password)
            if "bearer_token" in fields:
                self.fail("give bearer_token or basic_auth, not both")
        if doc.get("tls") is not None:
            with self.at("tls"):
                fields["tls"] = self.tls(doc["tls"])
                if "verify_tls" in fields:
                    self.fail("give verify_tls or tls, not both")
        if "max_redirects" in doc:
            with self.at("max_redirects"):
                fields["max_redirects"] = self.integer(doc["max_redirects"])
        return HttpSourceConfig(**fields)

    def s3_source(self, raw: Any) -> S3SourceConfig:
        secrets = {"access_key_id", "secret_access_key", "session_token"}
        doc = self.mapping(
            raw,
            {
                "bucket",
                "prefix",
                "endpoint_url",
                "region",
                "profile",
                "role_arn",
                "web_identity_token_file",
                "sts_endpoint_url",
            }
            | secrets,
            {"bucket"},
        )
        with self.at("bucket"):
            bucket = self.string(doc["bucket"])
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                self.fail(f"{bucket!r} is not a valid S3 bucket name")
        fields: dict[str, Any] = {"bucket": bucket}
        if "prefix" in doc:
            with self.at("prefix"):
                fields["prefix"] = self.string(doc["prefix"], empty=True)
        if "endpoint_url" in doc:
            with self.at("endpoint_url"):
                endpoint = self.string(doc["endpoint_url"])
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    self.fail(f"must be an http:// or https:// URL, not {endpoint!r}")
                fields["endpoint_url"] = endpoint
        for key in ("region", "profile", "role_arn"):
            if key in doc:
                with self.at(key):
                    fields[key] = self.string(doc[key])
        if "sts_endpoint_url" in doc:
            with self.at("sts_endpoint_url"):
                endpoint = self.string(doc["sts_endpoint_url"])
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    self.fail(f"must be an http:// or https:// URL, not {endpoint!r}")
                fields["sts_endpoint_url"] = endpoint
        if "web_identity_token_file" in doc:
            with self.at("web_identity_token_file"):
                fields["web_identity_token_file"] = self.file(doc["web_identity_token_file"])
        if ("role_arn" in fields) != ("web_identity_token_file" in fields):
            self.fail("role_arn and web_identity_token_file must be given together")
        if "role_arn" in fields and "access_key_id" in doc:
            self.fail("give access keys or role_arn/web_identity_token_file, not both")
        for key in sorted(secrets & doc.keys()):
            with self.at(key):
                fields[key] = self.secret(doc[key])
        if ("access_key_id" in fields) != ("secret_access_key" in fields):
            self.fail("access_key_id and secret_access_key must be given together")
        if "session_token" in fields and "access_key_id" not in fields:
            self.fail("session_token needs access_key_id and secret_access_key")
        return S3SourceConfig(**fields)

    def local_source(self, raw: Any) -> LocalSourceConfig:
        doc = self.mapping(raw, {"path", "prefix", "create"}, {"path"})
        with self.at("path"):
            path = Path(self.string(doc["path"]))
        create = False
        if "create" in doc:
            with self.at("create"):
                create = self.boolean(doc["create"])
        if not create and not path.is_dir():
            with self.at("path"):
                self.fail(f"{str(path)!r} is not a directory (set create: true to create it)")
        prefix = ""
        if "prefix" in doc:
            with self.at("prefix"):
                prefix = self.string(doc["prefix"], empty=True)
        return LocalSourceConfig(path=path, prefix=prefix, create=create)
