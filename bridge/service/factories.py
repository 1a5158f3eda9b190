"""Building a bridge's parts from its config: the pollers, the sink, the state store.

:func:`build_source` turns a ``sources[]`` entry into a :class:`~bridge.service.delivery.
SourceSpec` (an ``HttpPoller`` on the shared ``httpx`` client of its origin, see
:mod:`bridge.sources.http_clients`, or an ``ObjectStorePoller`` over S3 or a local folder);
:func:`build_sink` the ``broker`` section into a NATS or Redis sink; :func:`build_state_store`
the ``state`` section into a store.
:class:`~bridge.service.runner.Bridge` runs what these build.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

from bridge.errors import ConfigError
from bridge.service.config import BridgeConfig, SourceConfig
from bridge.service.delivery import SourceSpec
from bridge.sinks import Sink
from bridge.sources.http import HttpClients, HttpPoller, tls_context
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore
from bridge.state import MemoryStateStore, StateStore
from bridge.watching import ExternalSource, WatchConfig

__all__ = ["build_sink", "build_source", "build_state_store", "replica_id"]


def build_source(config: SourceConfig, http_clients: HttpClients | None = None) -> SourceSpec:
    """The poller a source config describes, with its name, schedule and URI.

    An HTTP source polls with the client ``http_clients`` shares among the sources to its
    origin (a service passes one for all its sources); without it, with a client of its own.
    Either way the poller's ``aclose()`` gives the client up.
    """
    source: ExternalSource
    if config.http is not None:
        http, tls = config.http, config.http.tls
        try:
            if tls is not None:
                verify = tls_context(
                    verify=tls.verify,
                    ca_file=tls.ca_file,
                    cert_file=tls.cert_file,
                    key_file=tls.key_file,
                )
            elif isinstance(http.verify_tls, str):
                verify = tls_context(ca_file=http.verify_tls)
            else:
                verify = tls_context(verify=http.verify_tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"source {config.name!r}: cannot load the TLS certificates of http.tls / "
                f"http.verify_tls: {exc}"
            ) from exc
        server_name = (tls.server_name if tls is not None else None) or None
        shared = (http_clients or HttpClients()).lease(
            http.url, verify=verify, interval_s=config.interval_s, server_name=server_name
        )
        poller = HttpPoller(http.url).with_name(config.name).with_shared_client(shared)
        poller.with_max_body_bytes(http.max_body_bytes).with_max_redirects(http.max_redirects)
        poller.with_deadline(http.timeout_s)
        poller.with_timeout(http.timeout_s, connect_s=min(5.0, http.timeout_s))
        for header, value in http.headers.items():
            poller.with_header(header, value)  # Secrets: read again for every request
        if http.bearer_token is not None:
            poller.with_bearer_token(http.bearer_token)
        if http.basic_auth is not None:
            poller.with_basic_auth(http.basic_auth.username, http.basic_auth.password)
        if server_name:
            poller.with_server_name(server_name)
        source, uri = poller, http.url
    elif config.s3 is not None:
        from bridge.extras import require_extra

        require_extra("s3", f"source {config.name!r} (s3:)")
        from bridge.sources.stores.s3 import S3Store

        s3 = config.s3
        store = S3Store(
            s3.bucket,
            endpoint_url=s3.endpoint_url,
            region_name=s3.region,
            aws_access_key_id=s3.access_key_id,  # Secrets: read again for every request
            aws_secret_access_key=s3.secret_access_key,
            aws_session_token=s3.session_token,
            profile_name=s3.profile,
            role_arn=s3.role_arn,
            web_identity_token_file=s3.web_identity_token_file,
            sts_endpoint_url=s3.sts_endpoint_url,
        )
        source = ObjectStorePoller(store).with_prefix(s3.prefix).with_name(config.name)
        uri = f"s3://{s3.bucket}/{s3.prefix}"
    else:
        assert config.local is not None
        local = config.local
        if local.create:
            local.path.mkdir(parents=True, exist_ok=True)
        store_ = LocalStore(local.path, etag=local.etag)
        source = ObjectStorePoller(store_).with_prefix(local.prefix).with_name(config.name)
        uri = store_.uri + (f"/{local.prefix}" if local.prefix else "")
    # Full jitter on retries: sources that failed together (a broker or origin outage) do
    # not retry in lockstep.
    watch = WatchConfig(config.interval_s, config.max_backoff_s, retry_jitter=1.0)
    return SourceSpec(
        name=config.name,
        source=source,
        watch=watch,
        source_uri=uri,
        max_inline_body_bytes=config.inline_body_bytes,
    )


def build_sink(config: BridgeConfig) -> Sink:
    broker = config.broker
    if broker.kind == "nats":
        from bridge.sinks.nats import NatsSink, NatsSinkConfig

        nats_config = NatsSinkConfig(
            url=broker.url.reveal(),
            stream=broker.stream,
            subject_prefix=broker.subject_prefix,
            content_mode=broker.content_mode,
            max_age_s=broker.max_age_s,
            max_msgs_per_subject=broker.max_msgs_per_subject,
            replicas=broker.replicas or 1,
            ack_timeout_s=broker.ack_timeout_s,
            tls=broker.tls,
            auth=broker.auth,
        )
        if broker.duplicate_window_s is not None:
            nats_config = replace(nats_config, duplicate_window_s=broker.duplicate_window_s)
        return NatsSink(nats_config)
    from bridge.sinks.redis import RedisSink, RedisSinkConfig

    redis_config = RedisSinkConfig(
        url=broker.url.reveal(),
        maxlen=broker.maxlen,
        replicas=broker.replicas,
        content_mode=broker.content_mode,
        timeout_s=broker.ack_timeout_s,
        tls=broker.tls,
        auth=broker.auth,
    )
    if broker.duplicate_window_s is not None:
        redis_config = replace(redis_config, dedup_window_s=broker.duplicate_window_s)
    return RedisSink(redis_config)


def build_state_store(config: BridgeConfig) -> StateStore:
    if config.state_path is not None:
        from bridge.state.files import FileStateStore

        # one process per folder; with leader election the state is in Redis
        exclusive = config.leader_election is None
        return FileStateStore(Path(config.state_path), exclusive=exclusive)
    return MemoryStateStore()


def replica_id() -> str:
    """``$KOPRS_BRIDGE_REPLICA_ID``, else ``$POD_NAME``, else ``<hostname>-<pid>``."""
    return (
        os.environ.get("KOPRS_BRIDGE_REPLICA_ID")
        or os.environ.get("POD_NAME")
        or f"{socket.gethostname()}-{os.getpid()}"
    )
