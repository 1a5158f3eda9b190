"""Reloading the configuration of a running bridge: which sources changed, and a file watcher.

:func:`plan_reload` compares two configs source by source (by name): *removed*, *added*,
*changed* (any field differs) and *unchanged*; sections that only a restart can apply
(``broker``, ``leader_election``, ``state``, ``server``, ``tracing``, ``logging``) are
listed in :attr:`ReloadPlan.restart_required`. :meth:`bridge.service.runner.Bridge.reload`
applies a plan.

:class:`ConfigWatcher` polls the config file's content (a SHA-256 of its bytes) every
``interval_s``: a Kubernetes ConfigMap update swaps a symlink (``..data``) rather than
writing the file, which inotify-style watches on the file miss, while reading it through the
path always sees the current version. A changed file is loaded and validated; an invalid one
is logged with its :class:`~bridge.errors.ConfigError` message and the running config stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from bridge import aio
from bridge.errors import ConfigError
from bridge.extras import check_config_extras
from bridge.secrets import Secret
from bridge.service.config import BridgeConfig, SourceConfig, load_config

__all__ = [
    "RESTART_SECTIONS",
    "ConfigWatcher",
    "ReloadPlan",
    "Reloadable",
    "plan_reload",
    "run_with_reload",
    "same_source",
]

log = logging.getLogger("bridge.reload")

RESTART_SECTIONS: tuple[tuple[str, str], ...] = (
    ("broker", "broker"),
    ("leader_election", "leader_election"),
    ("state_path", "state"),
    ("server", "server"),
    ("tracing", "tracing"),
    ("logging", "logging"),
    ("max_concurrent_polls", "max_concurrent_polls"),
)
"""(attribute of :class:`BridgeConfig`, config key) of the sections a reload cannot apply."""

DEFAULT_INTERVAL_S = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReloadPlan:
    """What a new config changes, compared with the running one (source names, config order)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()
    """Config keys whose changes need a restart (they are ignored until then)."""

    @property
    def sources_changed(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if names
        ]
        parts.append(f"{len(self.unchanged)} unchanged")
        return "; ".join(parts)


def plan_reload(running: BridgeConfig, new: BridgeConfig) -> ReloadPlan:
    """Compare ``new`` with the ``running`` config."""
    old = {source.name: source for source in running.sources}
    names = {source.name for source in new.sources}
    added, changed, unchanged = [], [], []
    for source in new.sources:
        if source.name not in old:
            added.append(source.name)
        elif same_source(old[source.name], source):
            unchanged.append(source.name)
        else:
            changed.append(source.name)
    removed = [source.name for source in running.sources if source.name not in names]
    restart = [
        key
        for attr, key in RESTART_SECTIONS
        if _comparable(getattr(running, attr)) != _comparable(getattr(new, attr))
    ]
    return ReloadPlan(
        added=tuple(added),
        removed=tuple(removed),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        restart_required=tuple(restart),
    )


def same_source(a: SourceConfig, b: SourceConfig) -> bool:
    """Whether two source configs are equal in every field (secrets compared by value)."""
    return bool(_comparable(a) == _comparable(b))


def _comparable(value: Any) -> Any:
    """A value that compares equal exactly when the configs do, without holding secrets.

    :class:`Secret` compares by identity; here inline and environment secrets compare by a
    digest of their value, file secrets by their path (a file secret is re-read when the file
    changes, that is no config change).
    """
    if isinstance(value, Secret):
        if value.origin.startswith("file:"):
            return ("secret", value.origin)
        return ("secret", value.origin, hashlib.sha256(value.reveal().encode()).hexdigest())
    if isinstance(value, BaseModel):
        return (
            type(value).__name__,
            tuple((name, _comparable(getattr(value, name))) for name in type(value).model_fields),
        )
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _comparable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_comparable(v) for v in value)
    return value


class Reloadable(Protocol):
    """What a :class:`ConfigWatcher` reloads: a :class:`~bridge.service.runner.Bridge`."""

    async def run(self, stop: asyncio.Event) -> None: ...

    async def reload(self, config: BridgeConfig) -> ReloadPlan: ...


class ConfigWatcher:
    """Polls a config file and reloads the bridge when its content changes.

    Create it *before* loading the config it watches: its first digest is taken then, so a
    change made while the bridge starts is seen at the first check.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.env = env
        self.checks = 0
        """Completed checks (whatever their outcome)."""
        self.reloads = 0
        """Changed files that were valid and applied."""
        self.rejected = 0
        """Changed files that were invalid (or could not be applied): the old config stayed."""
        self.last_error: str | None = None
        self._digest = self._read_digest()
        self._checked = asyncio.Condition()
        self._read_failed = False

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    async def run(self, bridge: Reloadable, stop: asyncio.Event) -> None:
        """Check every ``interval_s`` until ``stop`` is set."""
        log.info(
            "watching %s for changes every %gs (sources are reloaded without a restart)",
            self.path,
            self.interval_s,
        )
        while not await aio.sleep(self.interval_s, stop):
            await self.check(bridge)

    async def check(self, bridge: Reloadable) -> ReloadPlan | None:
        """Reload if the file changed since the last check; the plan applied, if any."""
        try:
            return await self._check(bridge)
        finally:
            async with self._checked:
                self.checks += 1
                self._checked.notify_all()

    async def _check(self, bridge: Reloadable) -> ReloadPlan | None:
        try:
            digest: str | None = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError as exc:
            if not self._read_failed:
                log.warning(
                    "cannot read the config file %s (still running with the last one): %s",
                    self.path,
                    exc.strerror or exc,
                )
            self._read_failed = True
            return None
        self._read_failed = False
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            config = load_config(self.path, self.env)
            check_config_extras(config)  # an s3: source added without the `s3` extra
        except ConfigError as exc:
            self.rejected += 1
            self.last_error = str(exc)
            log.error("config file changed but is invalid; keeping the running config: %s", exc)
            return None
        try:
            plan = await bridge.reload(config)
        except Exception as exc:
            self.rejected += 1
            self.last_error = str(exc)
            log.exception(
                "applying the changed config %s failed; keeping the running config", self.path
            )
            return None
        self.reloads += 1
        self.last_error = None
        return plan

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, tested after each check (e.g. on :attr:`reloads`,
        :attr:`rejected`); bound it with ``asyncio.timeout``."""
        async with self._checked:
            await self._checked.wait_for(predicate)


async def run_with_reload(bridge: Reloadable, watcher: ConfigWatcher, stop: asyncio.Event) -> None:
    """Run ``bridge`` until ``stop`` is set, reloading it when ``watcher``'s file changes."""
    watching = asyncio.create_task(watcher.run(bridge, stop), name="config-watcher")
    try:
        await bridge.run(stop)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
