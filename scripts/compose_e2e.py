"""The checks of ``scripts/compose-e2e``: the compose stack end to end, through its published ports.

    python3 scripts/compose_e2e.py --project P --www DIR --config BRIDGE_YAML -- COMPOSE...

``COMPOSE...`` is the compose command with its ``-p``/``-f`` options; the images are already
built and named in the environment. Standard library only (it runs on the host, outside the
project's virtualenv). In order:

1. ``up``, then every service healthy (the one-shot ``s3-init`` exited 0);
2. the bridge image as deployed: uid 10001, read-only root filesystem, no capabilities,
   no-new-privileges, its healthcheck answering;
3. ``/readyz`` of both replicas: 200, every check true;
4. the ``tail`` consumer shows ``added`` for the served document and the bucket's object, and
   for an object put while the stack runs;
5. editing the served document gives ``modified`` (with the new size);
6. ``docker kill`` of the replica leading ``app-config``: the other one takes the lease and
   publishes the next change within ``lease_ttl`` + ``interval`` (plus a small grace for the
   consumer's delivery and this script's polling);
7. a restart of the whole stack (``stop``, ``up``) re-announces nothing: after two polls of
   each source the stream's last sequence is unchanged and no replica published an event;
8. ``/readyz`` of both replicas again.

The first failure ends the run with exit status 1 and a message saying what was expected.
``KOPRS_E2E_SABOTAGE`` breaks one step on purpose, to show that its check fails:
``kill-follower`` (kill the replica that does not lead), ``no-edit`` (do not edit the
document), ``republish`` (change an object while the stack is down).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPLICAS = {"bridge-1": 8081, "bridge-2": 8082}
HEALTHY = ("nats", "redis", "s3", "web", "bridge-1", "bridge-2")
NATS_MONITOR = "http://127.0.0.1:8222"
STREAM = "KOPRS_EXTERNAL"
DOCUMENT_SOURCE = "app-config"
BUCKET_SOURCE = "manifests"
GRACE_S = 3.0  # consumer delivery + this script's polling, on top of lease_ttl + interval

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
_started = time.monotonic()
_sabotage = os.environ.get("KOPRS_E2E_SABOTAGE", "")


class CheckFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f} s] {text}", flush=True)


def ok(text: str) -> None:
    print(f"           ok: {text}", flush=True)


def run(command: list[str], *, check: bool = True, timeout: float = 300) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise CheckFailed(
            f"`{' '.join(command)}` exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result.stdout


def wait_for(what: str, probe: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy; CheckFailed after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def http_get(url: str, timeout_s: float = 3.0) -> tuple[int, str]:
    try:
        with _http.open(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m)?", str(text).strip())
    if not match:
        raise CheckFailed(f"cannot read the duration {text!r} in the bridge config")
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match[2]]


class Stack:
    def __init__(self, compose: list[str], www: Path, config: Path) -> None:
        self.compose = compose
        self.www = www
        self.document = www / "app.json"
        text = config.read_text()
        self.lease_ttl_s = parse_duration(_yaml_value(text, "lease_ttl"))
        self.interval_s = max(parse_duration(v) for v in _yaml_values(text, "interval"))
        self._states: dict[str, str] = {}

    # -- containers --

    def container(self, service: str) -> str:
        ids = run([*self.compose, "ps", "-a", "-q", service]).split()
        if not ids:
            raise CheckFailed(f"no container for service {service}")
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        document: list[dict[str, Any]] = json.loads(
            run(["docker", "inspect", self.container(service)])
        )
        return document[0]

    def up(self) -> None:
        run([*self.compose, "up", "-d", "--no-build", "--pull", "never"], timeout=600)

    def wait_healthy(self, timeout_s: float = 180) -> None:
        def all_healthy() -> bool:
            states = {}
            for service in HEALTHY:
                state = self.inspect(service)["State"]
                states[service] = state.get("Health", {}).get("Status", state["Status"])
            init = self.inspect("s3-init")["State"]
            if init["Status"] == "exited" and init["ExitCode"] != 0:
                raise CheckFailed(f"s3-init exited {init['ExitCode']}:\n{self.logs('s3-init')}")
            tail = self.inspect("tail")["State"]["Status"]
            self._states = {**states, "s3-init": init["Status"], "tail": tail}
            sick = [service for service, state in states.items() if state == "unhealthy"]
            if sick:
                raise CheckFailed(
                    f"{', '.join(sick)} unhealthy; states: {self._states}; "
                    f"{sick[0]} logs:\n{self.logs(sick[0])}"
                )
            return (
                all(s == "healthy" for s in states.values())
                and init["Status"] == "exited"
                and tail == "running"
            )

        try:
            wait_for("every service healthy", all_healthy, timeout_s, 1.0)
        except CheckFailed as exc:
            if not str(exc).startswith("timed out"):
                raise
            raise CheckFailed(f"{exc}; states: {self._states}") from None

    def logs(self, service: str) -> str:
        result = subprocess.run(
            ["docker", "logs", "--tail", "60", self.container(service)],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout + result.stderr

    # -- the consumer --

    def tail_events(self) -> list[tuple[str, str, str, str]]:
        """(kind, source, key, rest) of every line the tail consumer printed so far."""
        out = run(["docker", "logs", self.container("tail")])
        events = []
        for line in out.splitlines():
            parts = line.split(None, 4)
            if len(parts) >= 4 and parts[1] in ("added", "modified", "removed"):
                events.append((parts[1], parts[2], parts[3], parts[4] if len(parts) > 4 else ""))
        return events

    def wait_event(
        self, kind: str, source: str, key: str | None, after: int, timeout_s: float
    ) -> tuple[str, str, str, str]:
        def found() -> tuple[str, str, str, str] | None:
            for event in self.tail_events()[after:]:
                if event[0] == kind and event[1] == source and key in (None, event[2]):
                    return event
            return None

        try:
            event: tuple[str, str, str, str] = wait_for(
                f"`{kind}` of {source} {key or ''} in the tail consumer's output",
                found,
                timeout_s,
                0.2,
            )
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}; it printed:\n{self.logs('tail')}") from None
        return event

    # -- the replicas --

    def metrics(self, service: str) -> dict[tuple[str, str, str], float]:
        """{(name, source, kind): value} of a replica's /metrics."""
        status, text = http_get(f"http://127.0.0.1:{REPLICAS[service]}/metrics")
        if status != 200:
            raise CheckFailed(f"{service} /metrics answered {status}: {text[:300]}")
        values: dict[tuple[str, str, str], float] = {}
        for line in text.splitlines():
            match = re.fullmatch(r"(koprs_bridge_\w+)(?:\{(.*)\})? (\S+)", line)
            if not match:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            key = (match[1], labels.get("source", ""), labels.get("kind", ""))
            values[key] = float(match[3])
        return values

    def leader_of(self, source: str, among: tuple[str, ...] = tuple(REPLICAS)) -> str | None:
        leaders = [
            s for s in among if self.metrics(s).get(("koprs_bridge_lease_held", source, "")) == 1
        ]
        if len(leaders) > 1:
            raise CheckFailed(f"two replicas hold the lease of {source}: {leaders}")
        return leaders[0] if leaders else None

    def published(self, service: str, source: str, kind: str) -> float:
        return self.metrics(service).get(("koprs_bridge_events_published_total", source, kind), 0)

    def check_ready(self, services: tuple[str, ...] = tuple(REPLICAS)) -> None:
        for service in services:
            status, body = http_get(f"http://127.0.0.1:{REPLICAS[service]}/readyz")
            if status != 200:
                raise CheckFailed(f"{service} /readyz answered {status}: {body.strip()}")
            document = json.loads(body)
            if document.get("ready") is not True or not all(document["checks"].values()):
                raise CheckFailed(f"{service} /readyz is 200 but says {document}")
            ok(f"{service} /readyz 200, checks {sorted(document['checks'])} all true")

    # -- the broker --

    def stream_state(self) -> dict[str, Any]:
        status, body = http_get(f"{NATS_MONITOR}/jsz?streams=true")
        if status != 200:
            raise CheckFailed(f"NATS /jsz answered {status}")
        for account in json.loads(body).get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream["name"] == STREAM:
                    state: dict[str, Any] = stream["state"]
                    return state
        raise CheckFailed(f"no stream {STREAM} in NATS")


def _yaml_values(text: str, key: str) -> list[str]:
    return re.findall(rf"^\s*{key}:\s*([^#\s]+)", text, re.M)


def _yaml_value(text: str, key: str) -> str:
    values = _yaml_values(text, key)
    if not values:
        raise CheckFailed(f"no {key} in the bridge config")
    return values[0]


def check_image_as_deployed(stack: Stack, service: str) -> None:
    info = stack.inspect(service)
    config, host = info["Config"], info["HostConfig"]
    problems = []
    if config.get("User") != "10001:10001":
        problems.append(f"User is {config.get('User')!r}, not 10001:10001")
    if host.get("ReadonlyRootfs") is not True:
        problems.append("the root filesystem is not read-only")
    if "ALL" not in (host.get("CapDrop") or []) or host.get("CapAdd"):
        problems.append(f"capabilities: CapDrop {host.get('CapDrop')}, CapAdd {host.get('CapAdd')}")
    if "no-new-privileges:true" not in (host.get("SecurityOpt") or []):
        problems.append("no-new-privileges is not set")
    container = stack.container(service)
    uid = run(["docker", "exec", container, "id", "-u"]).strip()
    if uid != "10001":
        problems.append(f"the process runs as uid {uid}")
    caps = run(["docker", "exec", container, "cat", "/proc/1/status"])
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        match = re.search(rf"^{field}:\s*([0-9a-f]+)", caps, re.M)
        if match is None or int(match[1], 16) != 0:
            problems.append(f"{field} is {match[1] if match else '?'}, not 0")
    write = subprocess.run(
        ["docker", "exec", container, "sh", "-c", "echo x > /opt/koprs-bridge/probe"],
        capture_output=True,
        text=True,
        check=False,
    )
    if write.returncode == 0 or "Read-only file system" not in write.stderr:
        problems.append(f"writing into the image worked or failed otherwise: {write.stderr!r}")
    health = info["State"].get("Health") or {}
    if health.get("Status") != "healthy" or not health.get("Log"):
        problems.append(f"health is {health.get('Status')!r}")
    elif health["Log"][-1].get("ExitCode") != 0:
        problems.append(f"the last healthcheck exited {health['Log'][-1].get('ExitCode')}")
    if problems:
        raise CheckFailed(f"{service} is not deployed as intended: " + "; ".join(problems))
    ok(f"{service}: uid 10001, read-only rootfs, no capabilities, no-new-privileges, healthy")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--www", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("compose", nargs="+")
    args = parser.parse_args()
    extra = os.environ.get("KOPRS_E2E_EXTRA_FILE")
    compose = [*args.compose, *(["-f", extra] if extra else [])]
    stack = Stack(compose, args.www, args.config)
    budget_s = stack.lease_ttl_s + stack.interval_s + GRACE_S
    put = [*compose, "run", "--rm", "--no-deps", "s3-init"]

    step("docker compose up")
    stack.up()
    stack.wait_healthy()
    ok(f"healthy: {', '.join(HEALTHY)}; s3-init exited 0; tail running")

    step("the bridge image as deployed")
    for service in REPLICAS:
        check_image_as_deployed(stack, service)

    step("/readyz of both replicas")
    stack.check_ready()

    step("the tail consumer lists the served document and the bucket's object")
    stack.wait_event("added", DOCUMENT_SOURCE, "http://web/app.json", 0, 60)
    stack.wait_event("added", BUCKET_SOURCE, "prod/example.yaml", 0, 60)
    ok("added app-config http://web/app.json, added manifests prod/example.yaml")

    step("an object put into the bucket")
    seen = len(stack.tail_events())
    run([*put, "--put", "prod/new.yaml", "kind: New"])
    stack.wait_event("added", BUCKET_SOURCE, "prod/new.yaml", seen, 4 * stack.interval_s)
    ok("added manifests prod/new.yaml")

    step("editing the served document")
    seen = len(stack.tail_events())
    body = json.dumps({"feature_flags": {"new_checkout": True}, "replicas": 4}) + "\n"
    if _sabotage != "no-edit":
        stack.document.write_text(body)
    event = stack.wait_event("modified", DOCUMENT_SOURCE, None, seen, 4 * stack.interval_s)
    if f"size={len(body.encode())}" not in event[3]:
        raise CheckFailed(f"the modified event does not carry the new document: {event}")
    ok(f"modified app-config ({event[3]})")

    step("docker kill of the replica leading app-config")
    leader = wait_for("a leader of app-config", lambda: stack.leader_of(DOCUMENT_SOURCE), 30)
    follower = next(s for s in REPLICAS if s != leader)
    victim = follower if _sabotage == "kill-follower" else leader
    survivor = next(s for s in REPLICAS if s != victim)
    published_before = stack.published(survivor, DOCUMENT_SOURCE, "modified")
    seen = len(stack.tail_events())
    run(["docker", "kill", stack.container(victim)])
    killed_at = time.monotonic()
    body = json.dumps({"feature_flags": {"new_checkout": True}, "replicas": 5}) + "\n"
    stack.document.write_text(body)
    stack.wait_event("modified", DOCUMENT_SOURCE, None, seen, 3 * budget_s)
    took = time.monotonic() - killed_at
    if stack.published(survivor, DOCUMENT_SOURCE, "modified") != published_before + 1:
        raise CheckFailed(f"the change was not published by {survivor}, the replica left running")
    if survivor != follower:
        raise CheckFailed(
            f"the change was published by {survivor}, which led app-config before the kill: "
            f"the replica killed ({victim}) was not the leader"
        )
    if stack.leader_of(DOCUMENT_SOURCE, among=(survivor,)) != survivor:
        raise CheckFailed(f"{survivor} does not hold the lease of app-config after the kill")
    if took > budget_s:
        raise CheckFailed(
            f"{follower} published the change {took:.1f} s after the kill: more than lease_ttl "
            f"{stack.lease_ttl_s:g} s + interval {stack.interval_s:g} s (+{GRACE_S:g} s grace)"
        )
    ok(
        f"{leader} killed; {follower} took over and published the change in {took:.1f} s "
        f"(lease_ttl {stack.lease_ttl_s:g} s + interval {stack.interval_s:g} s)"
    )

    step("restart of the whole stack")
    before = stack.stream_state()
    run([*compose, "stop", "--timeout", "10"], timeout=300)
    step("stack stopped; up again")
    if _sabotage == "republish":
        run([*compose, "start", "s3"])
        run([*put, "--put", "prod/example.yaml", "kind: Changed"])
    stack.up()
    stack.wait_healthy()
    step("stack healthy again; waiting for two polls of each source")

    def polled_twice() -> bool:
        for source in (DOCUMENT_SOURCE, BUCKET_SOURCE):
            polls = sum(
                stack.metrics(s).get(("koprs_bridge_polls_total", source, ""), 0)
                - stack.metrics(s).get(("koprs_bridge_poll_errors_total", source, ""), 0)
                for s in REPLICAS
            )
            if polls < 2:
                return False
        return True

    wait_for(
        "two successful polls of each source after the restart",
        polled_twice,
        6 * stack.interval_s + stack.lease_ttl_s,
    )
    after = stack.stream_state()
    published = {
        s: sum(
            v for k, v in stack.metrics(s).items() if k[0] == "koprs_bridge_events_published_total"
        )
        for s in REPLICAS
    }
    if after["last_seq"] != before["last_seq"] or any(published.values()):
        raise CheckFailed(
            f"the restart re-announced: stream last_seq {before['last_seq']} -> "
            f"{after['last_seq']}, events published since the restart {published}"
        )
    ok(f"stream last_seq stays {after['last_seq']}, nothing published in two polls of each source")

    step("/readyz of both replicas after the restart")
    stack.check_ready()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as exc:
        print(f"\ncompose-e2e: CHECK FAILED: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
