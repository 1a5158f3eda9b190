"""High availability with replicas as separate processes (tests/ha/test_ha.py runs them in-process).

Every replica is ``python -m bridge --log-level info run --config <file>`` with its own
``KOPRS_BRIDGE_REPLICA_ID`` and its own log file (printed when a test fails). The servers are
real: redis-server for leader election and checkpoints, nats-server (JetStream) as the broker,
an HTTP server and moto's S3 server as sources. A raw NATS consumer (tests/service/test_e2e.py) reads
what reaches the broker. Leases are short (2 s TTL, renewed every 0.3 s) and sources are polled
every 0.2 s, so a failover takes a few seconds.

The HTTP server records every request with the ``X-Replica`` header each replica's config puts
on its requests, so a test sees which replica polled which source when.

The tests: (a) steady run, each source polled by one replica at a time; (b) SIGKILL of a
leader while its source changes; (c) SIGSTOP of a leader in the middle of a poll, past its
lease, then SIGCONT: fenced out; (d) Redis stopped and started empty; (e) replicas joining
spread the sources; (f) Redis restarted with its data: checkpoints carry on; (g) a leader
SIGSTOPped between polls does not poll again once resumed. After each test every replica's
log is checked: a source given up was released.

Nothing here asserts a duration: timings (failover) are printed, the assertions are about
order, completeness and uniqueness. Waits are on conditions (events at the consumer, lease keys
in Redis, lines in a replica's log), polled in bounded loops where there is nothing to await.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.ha.checkpoints import RedisStateStore
from bridge.ha.keys import DEFAULT_PREFIX, SourceKeys, as_text
from bridge.ha.leases import LeaseClient
from tests.support.httpserver import Documents, Request, version_of
from tests.support.receiving import Received, fresh_nats, nats_consumer
from tests.support.replicas import (
    WAIT_S,
    Cluster,
    Event,
    assert_no_duplicates,
    cluster,
    final_state,
    history,
    holders,
    kill_leftover_replicas,
    kind,
    logged,
    redis_client,
    spread,
    summary,
    until,
    version,
)
from tests.support.servers import PersistentRedisServer, RedisServer, S3Server

LEASE_TTL_S = 2.0
RENEW_EVERY_S = 0.3
INTERVAL_S = 0.2


# -- replicas as processes (tests/support/replicas.py) -------------------------------------------------


@pytest.fixture(autouse=True)
def _kill_leftover_replicas() -> Iterator[None]:
    """Whatever happened to the test's event loop, no replica outlives the test."""
    yield
    kill_leftover_replicas()


def config(
    replica: str, *, redis_url: str, nats_url: str, sources: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "broker": {"url": nats_url, "ack_timeout": 2},
        "leader_election": {
            "redis_url": redis_url,
            "lease_ttl": LEASE_TTL_S,
            "renew_every": RENEW_EVERY_S,
        },
        "sources": list(sources),
    }


def http_source(name: str, url: str, replica: str) -> dict[str, Any]:
    return {
        "name": name,
        "interval": INTERVAL_S,
        "max_backoff": 0.5,
        "http": {"url": url, "headers": {"X-Replica": replica}},
    }


def s3_source(name: str, s3: S3Server, bucket: str, prefix: str) -> dict[str, Any]:
    return {
        "name": name,
        "interval": INTERVAL_S,
        "max_backoff": 0.5,
        "s3": {
            "bucket": bucket,
            "prefix": prefix,
            "endpoint_url": s3.endpoint_url,
            "region": s3.region,
            "access_key_id": s3.access_key,
            "secret_access_key": s3.secret_key,
        },
    }


# -- waiting on conditions ---------------------------------------------------------------------


async def expect(received: Received, what: str, predicate: Callable[[list[Event]], bool]) -> None:
    """Wait until the consumer's events satisfy ``predicate``."""
    try:
        async with asyncio.timeout(WAIT_S):
            await received.wait_for(predicate)
    except TimeoutError:
        pytest.fail(
            f"timed out waiting for {what} at the consumer; it has:\n"
            + "\n".join(map(str, summary(received.events)))
        )


@contextlib.asynccontextmanager
async def arrival_times(received: Received) -> AsyncIterator[list[float]]:
    """time.monotonic() at which each event of ``received.events`` arrived (same index)."""
    times: list[float] = [time.monotonic()] * len(received.events)

    async def follow() -> None:
        while True:
            async with received.changed:
                await received.changed.wait_for(lambda: len(received.events) > len(times))
                now = time.monotonic()
                times.extend([now] * (len(received.events) - len(times)))

    task = asyncio.create_task(follow())
    try:
        yield times
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- reading events and Redis ------------------------------------------------------------------


def has(
    source: str, subject: str, kind_: str, version_: str | None
) -> Callable[[list[Event]], bool]:
    return lambda events: (kind_, version_) in history(events, source, subject)


def replica_runs(requests: Sequence[Request]) -> list[str]:
    """The replicas of consecutive requests, repeated runs collapsed: r1 r1 r2 r2 -> r1 r2."""
    return [replica for replica, _ in itertools.groupby(r.replica for r in requests)]


def assert_never_interleaved(documents: Documents, names: Sequence[str]) -> None:
    """Each source was polled by one replica at a time: a replica that handed a source over
    never polled it again, so the runs of replicas are all different (r1 r2, not r1 r2 r1)."""
    for name in names:
        requests = documents.requests(name)
        runs = replica_runs(requests)
        assert "?" not in runs, f"a request to {name} without X-Replica"
        if len(runs) != len(set(runs)):
            start = requests[0].at
            timeline = [(round(r.at - start, 3), r.replica) for r in requests]
            pytest.fail(f"source {name} polled by interleaved replicas {runs}: {timeline}")


LEASE_LOST = "lost the lease on source '{0}'|stopping source '{0}' at once: its lease is lost"
ROUND_FAILED = "leader election round failed"


# -- (a) one poller per source -----------------------------------------------------------------


async def test_a_source_is_never_polled_by_two_replicas_at_once(
    redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    """3 replicas, 6 HTTP sources, no failures: the requests each source receives come from
    one replica at a time (handovers while the replicas share the sources out are fine, a
    replica polling a source again after handing it over is not), the sources end up spread
    2/2/2, and every change is published exactly once."""
    await fresh_nats(nats_url)
    names = [f"s{i}" for i in range(6)]
    with Documents() as docs:
        urls = {n: docs.url(n) for n in names}
        v1 = {n: docs.set(n, f'{{"doc": "{n}", "v": 1}}'.encode()) for n in names}

        def config_for(replica: str) -> dict[str, Any]:
            sources = [http_source(n, urls[n], replica) for n in names]
            return config(replica, redis_url=redis_url, nats_url=nats_url, sources=sources)

        async with (
            cluster(tmp_path, config_for) as replicas,
            redis_client(redis_url) as client,
        ):
            await replicas.start("r1", "r2", "r3")
            async with nats_consumer(nats_url) as received:
                for n in names:
                    await expect(received, f"Added {n}", has(n, urls[n], "added", v1[n]))

                async def balanced() -> bool:
                    return await spread(client, names) == [2, 2, 2]

                await until(balanced, "a 2/2/2 spread", replicas=replicas)
                v2 = {n: docs.set(n, f'{{"doc": "{n}", "v": 2}}'.encode()) for n in names}
                for n in names:
                    await expect(received, f"Modified {n}", has(n, urls[n], "modified", v2[n]))
                # A steady run: every source polled 10 more times by whoever holds it.
                seen = {n: len(docs.requests(n)) for n in names}
                await until(
                    lambda: all(len(docs.requests(n)) >= seen[n] + 10 for n in names),
                    "10 more polls of every source",
                    replicas=replicas,
                )
                spread_at_end = await spread(client, names)
            codes = await replicas.stop_all()
            events = list(received.events)

    print(
        "\nreplicas that polled each source, in turn:",
        {n: replica_runs(docs.requests(n)) for n in names},
    )
    assert_never_interleaved(docs, names)
    assert spread_at_end == [2, 2, 2]
    for n in names:
        assert history(events, n, urls[n]) == [("added", v1[n]), ("modified", v2[n])]
    assert_no_duplicates(events)
    assert codes == {"r1": 0, "r2": 0, "r3": 0}, "a replica did not shut down cleanly on SIGTERM"


# -- (b) SIGKILL of a leader -------------------------------------------------------------------


async def test_b_sigkilled_leader_is_replaced_and_nothing_is_lost_or_doubled(
    redis_url: str,
    nats_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """3 replicas lead an S3 bucket and an HTTP document. The bucket changes step by step
    (each state held until the consumer saw it); right after one change its leader is
    SIGKILLed, the next change is made at once. Another replica takes the bucket over and
    publishes; every change reaches the consumer once, in order, except that the state made
    at the kill may be skipped (it was replaced at once); the final state matches the bucket."""
    await fresh_nats(nats_url)
    s3 = s3_server.client()
    prefix = "cfg/"

    async def put(key: str, body: bytes) -> str:
        reply = await asyncio.to_thread(
            s3.put_object, Bucket=s3_bucket, Key=prefix + key, Body=body
        )
        return str(reply["ETag"]).strip('"')

    async def delete(key: str) -> None:
        await asyncio.to_thread(s3.delete_object, Bucket=s3_bucket, Key=prefix + key)

    def listing() -> dict[str, str]:
        reply = s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)
        return {o["Key"]: o["ETag"].strip('"') for o in reply.get("Contents", [])}

    etags: dict[str, str] = {}
    expected: dict[str, list[tuple[str, str]]] = {}
    optional: tuple[str, tuple[str, str]] | None = None

    async def change(key: str, body: bytes | None) -> tuple[str, str]:
        """Apply a change; record and return the (kind, version) the consumer must see."""
        subject = prefix + key
        if body is None:
            await delete(key)
            event = ("removed", etags.pop(subject))
        else:
            etag = await put(key, body)
            event = ("modified" if subject in etags else "added", etag)
            etags[subject] = etag
        expected.setdefault(subject, []).append(event)
        return event

    async def step(key: str, body: bytes | None) -> None:
        event = await change(key, body)
        await expect(received, f"{event} of {key}", has("bucket", prefix + key, *event))

    with Documents() as docs:
        doc_url = docs.url("doc")
        doc_v1 = docs.set("doc", b'{"doc": 1}')

        def config_for(replica: str) -> dict[str, Any]:
            sources = [
                s3_source("bucket", s3_server, s3_bucket, prefix),
                http_source("doc", doc_url, replica),
            ]
            return config(replica, redis_url=redis_url, nats_url=nats_url, sources=sources)

        for key in ("k0", "k1", "k2"):
            await change(key, f"{key} initial".encode())
        async with (
            cluster(tmp_path, config_for) as replicas,
            redis_client(redis_url) as client,
        ):
            await replicas.start("r1", "r2", "r3")
            async with nats_consumer(nats_url) as received, arrival_times(received) as arrived:
                for subject, ((kind_, etag),) in expected.items():
                    await expect(received, f"Added {subject}", has("bucket", subject, kind_, etag))
                await expect(received, "Added doc", has("doc", doc_url, "added", doc_v1))

                async def two_leaders() -> bool:
                    held = await holders(client, ["bucket", "doc"])
                    return len({replica for replica, _ in held.values()}) == 2

                await until(two_leaders, "bucket and doc led by two replicas", replicas=replicas)
                await step("k0", b"1")
                await step("k3", b"2")
                await step("k1", None)
                await step("k2", b"4")
                await step("k1", b"5")

                leader, fence = (await holders(client, ["bucket"]))["bucket"]
                optional = (prefix + "k0", await change("k0", b"6"))
                killed_at = time.monotonic()
                await replicas[leader].kill()
                await step("k0", b"7")  # made after the kill: published by a new leader
                first_new = next(
                    i for i, e in enumerate(received.events) if version(e) == etags[prefix + "k0"]
                )
                failover_s = arrived[first_new] - killed_at
                new_leader, new_fence = (await holders(client, ["bucket"]))["bucket"]
                await step("k3", None)
                await step("k2", b"9")
                await step("k1", b"10")
                await step("k0", None)
                await step("k4", b"12")
                await until(
                    lambda: final_state(received.events, "bucket") == listing(),
                    "the consumer's state of the bucket to match the bucket",
                    replicas=replicas,
                )
                # Let a few more rounds pass (the document's polls as a clock), so that a late
                # copy of anything would show.
                polls = len(docs.requests("doc"))
                await until(lambda: len(docs.requests("doc")) >= polls + 3, "3 polls of doc")
                events = list(received.events)

    print(
        f"\nfailover after SIGKILL of {leader}: {failover_s:.2f} s from the kill to the first "
        f"event of the new leader {new_leader} (lease TTL {LEASE_TTL_S:g} s, poll every "
        f"{INTERVAL_S:g} s)"
    )
    assert new_leader != leader
    assert new_fence > fence
    assert optional is not None
    skippable_subject, skippable = optional
    for subject, changes in expected.items():
        got = history(events, "bucket", subject)
        if subject == skippable_subject and skippable not in got:
            changes = [e for e in changes if e != skippable]  # noqa: PLW2901
        assert got == changes, f"history of {subject}"
    assert final_state(events, "bucket") == listing()
    assert history(events, "doc", doc_url) == [("added", doc_v1)]
    assert_no_duplicates(events)


# -- (c) SIGSTOP of a leader past its lease ----------------------------------------------------


async def test_c_paused_leader_is_fenced_when_it_resumes(
    redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    """The leader of a source is SIGSTOPped in the middle of a poll (the answer it will read
    when resumed holds a change) and kept stopped past its lease TTL; another replica takes the
    source over and publishes. After SIGCONT the old leader finds its lease lost (its log says
    so): it neither publishes nor writes its checkpoint (the checkpoint's fence and revision are
    the new leader's) nor polls again, and the consumer has every change exactly once."""
    await fresh_nats(nats_url)
    names = ["doc", "other"]
    with Documents() as docs:
        urls = {n: docs.url(n) for n in names}
        versions = [docs.set("doc", b'{"v": 1}')]
        docs.set("other", b'{"other": 1}')

        def config_for(replica: str) -> dict[str, Any]:
            sources = [http_source(n, urls[n], replica) for n in names]
            return config(replica, redis_url=redis_url, nats_url=nats_url, sources=sources)

        async with (
            cluster(tmp_path, config_for) as replicas,
            redis_client(redis_url) as client,
        ):
            await replicas.start("r1", "r2", "r3")
            async with nats_consumer(nats_url) as received:
                await expect(received, "Added doc", has("doc", urls["doc"], "added", versions[0]))

                async def two_leaders() -> bool:
                    held = await holders(client, names)
                    return len(held) == 2 and len({r for r, _ in held.values()}) == 2

                await until(two_leaders, "doc and other led by two replicas", replicas=replicas)
                versions.append(docs.set("doc", b'{"v": 2}'))
                await expect(received, "v2", has("doc", urls["doc"], "modified", versions[-1]))

                paused, old_fence = (await holders(client, ["doc"]))["doc"]
                pid = replicas[paused].pid
                stopped = threading.Event()

                def pause_in_the_middle_of_a_poll(request: Request) -> None:
                    # The leader's next poll gets v3, but only once it is resumed: it is
                    # stopped while it waits for the answer, with a change on its way.
                    if request.replica == paused and request.name == "doc" and not stopped.is_set():
                        docs.set("doc", b'{"v": 3}')
                        os.kill(pid, signal.SIGSTOP)
                        stopped.set()

                docs.on_request = pause_in_the_middle_of_a_poll
                try:
                    await until(stopped.is_set, f"{paused} to poll doc (and be stopped)")
                    docs.on_request = None
                    versions.append(version_of(b'{"v": 3}'))

                    async def taken_over() -> bool:
                        held = (await holders(client, ["doc"])).get("doc")
                        return held is not None and held[0] != paused

                    await until(
                        taken_over, f"another replica to take doc from {paused}", replicas=replicas
                    )
                    await expect(received, "v3", has("doc", urls["doc"], "modified", versions[-1]))
                    versions.append(docs.set("doc", b'{"v": 4}'))
                    await expect(received, "v4", has("doc", urls["doc"], "modified", versions[-1]))
                    new_leader, new_fence = (await holders(client, ["doc"]))["doc"]
                    since = replicas[paused].mark()
                finally:
                    resumed_at = time.monotonic()
                    replicas[paused].resume()
                await until(
                    logged(replicas[paused], LEASE_LOST.format("doc"), since),
                    f"{paused} to log that it lost the lease on doc",
                    replicas=replicas,
                )
                # The new leader goes on; the resumed one does not come back to doc.
                versions.append(docs.set("doc", b'{"v": 5}'))
                await expect(received, "v5", has("doc", urls["doc"], "modified", versions[-1]))
                polls = len(docs.requests("doc"))
                await until(
                    lambda: len(docs.requests("doc")) >= polls + 3,
                    "3 more polls of doc",
                    replicas=replicas,
                )
                meta = await client.hgetall(SourceKeys("doc").meta)
                lease = await client.get(SourceKeys("doc").lease)
                events = list(received.events)
                resumed_log = replicas[paused].log(since)

    assert new_leader != paused
    assert new_fence > old_fence
    assert as_text(lease) == f"{new_leader}|{new_fence}"
    assert int(meta[b"fence"]) == new_fence, "the checkpoint was written with a stale fence"
    # A lineage starts at a random multiple of 2**32; the low bits count committed changes.
    assert int(meta[b"revision"]) % 2**32 == len(versions)  # one commit per change, none extra
    late_polls = [r for r in docs.requests("doc") if r.replica == paused and r.at > resumed_at]
    assert late_polls == [], f"{paused} polled doc after it resumed without its lease"
    assert "acquired the lease on source 'doc'" not in resumed_log
    assert history(events, "doc", urls["doc"]) == [
        ("added", versions[0]),
        *(("modified", v) for v in versions[1:]),
    ]
    assert_no_duplicates(events)


@dataclass
class World:
    """Two replicas leading three HTTP documents (a, b, c), each published; a at v2."""

    names: list[str]
    docs: Documents
    urls: dict[str, str]
    current: dict[str, str | None]
    replicas: Cluster
    client: aioredis.Redis
    received: Received


@contextlib.asynccontextmanager
async def two_replicas_leading(
    tmp_path: Path, redis_url: str, nats_url: str
) -> AsyncIterator[World]:
    """The starting point of the Redis outage tests (d) and (f)."""
    await fresh_nats(nats_url)
    names = ["a", "b", "c"]
    with Documents() as docs:
        urls = {n: docs.url(n) for n in names}
        current = {n: docs.set(n, f'{{"{n}": 1}}'.encode()) for n in names}

        def config_for(replica: str) -> dict[str, Any]:
            sources = [http_source(n, urls[n], replica) for n in names]
            return config(replica, redis_url=redis_url, nats_url=nats_url, sources=sources)

        async with (
            cluster(tmp_path, config_for) as replicas,
            redis_client(redis_url) as client,
        ):
            await replicas.start("r1", "r2")
            async with nats_consumer(nats_url) as received:
                for n in names:
                    await expect(received, f"Added {n}", has(n, urls[n], "added", current[n]))
                current["a"] = docs.set("a", b'{"a": 2}')
                await expect(received, "a v2", has("a", urls["a"], "modified", current["a"]))

                async def both_lead() -> bool:
                    return await spread(client, names) == [1, 2]

                await until(both_lead, "both replicas leading", replicas=replicas)
                yield World(names, docs, urls, current, replicas, client, received)


# -- (d) Redis down ----------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_d_redis_outage_pauses_polling_and_loses_nothing(
    redis_server: RedisServer, redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    """2 replicas, 3 HTTP sources. While redis-server is stopped the replicas lose their leases
    and stop polling: changes made then are not published. Redis comes back empty (no
    persistence), so the checkpoints are gone: the new leaders rebuild the state from the
    broker (bridge.state.recovery), so the unchanged item publishes nothing, the changed one
    its Modified and the one deleted during the outage its Removed, each once."""
    try:
        async with two_replicas_leading(tmp_path, redis_url, nats_url) as world:
            names, docs, urls, current = world.names, world.docs, world.urls, world.current
            replicas, received = world.replicas, world.received
            await leases_lost_when(redis_server.stop, replicas, names)
            await rounds_failed(replicas, 1)
            polls = len(docs.requests())
            published = len(received.events)
            current["b"] = docs.set("b", b'{"b": 2}')  # changes while Redis is down
            last_c = current["c"]
            current["c"] = docs.set("c", None)  # deleted while Redis is down
            await rounds_failed(replicas, 2)
            assert len(docs.requests()) == polls, "a source was polled without a lease"
            assert len(received.events) == published, "published while Redis was down"

            restarted_at = len(received.events)
            redis_server.start()  # empty: leases, fences and checkpoints are gone
            await expect(received, "b v2", has("b", urls["b"], "modified", current["b"]))
            await expect(received, "c removed", has("c", urls["c"], "removed", last_c))
            current["a"] = docs.set("a", b'{"a": 3}')
            await expect(received, "a v3", has("a", urls["a"], "modified", current["a"]))
            seen = {n: len(docs.requests(n)) for n in names}
            await until(
                lambda: all(len(docs.requests(n)) >= seen[n] + 2 for n in names),
                "2 more polls of every source",
                replicas=replicas,
            )
            events = list(received.events)
    finally:
        redis_server.start()

    after = [(e["subject"], kind(e)) for e in events[restarted_at:]]
    assert sorted(after) == sorted(
        [(urls["b"], "modified"), (urls["c"], "removed"), (urls["a"], "modified")]
    ), "the recovered state is what the broker holds: nothing published again"
    for n in ("a", "b"):
        assert final_state(events, n) == {urls[n]: current[n]}, f"latest state of {n}"
    assert final_state(events, "c") == {}
    assert_no_duplicates(events)


async def leases_lost_when(stop: Callable[[], None], replicas: Cluster, names: list[str]) -> None:
    """Call ``stop`` (Redis), then wait until a replica logged the loss of every source's lease."""
    marks = {name: replica.mark() for name, replica in replicas.replicas.items()}
    stop()

    def lost(source: str) -> Callable[[], bool]:
        pattern = LEASE_LOST.format(source)
        return lambda: any(
            logged(replica, pattern, marks[name])() for name, replica in replicas.replicas.items()
        )

    for n in names:
        await until(lost(n), f"a replica to log that it lost the lease on {n}", replicas=replicas)


async def rounds_failed(replicas: Cluster, rounds: int) -> None:
    """Wait until every replica logged ``rounds`` more failed election rounds."""
    marks = {name: replica.mark() for name, replica in replicas.replicas.items()}
    for name, replica in replicas.replicas.items():
        await until(
            logged(replica, ROUND_FAILED, marks[name], rounds),
            f"{name} to fail {rounds} more election round(s)",
            replicas=replicas,
        )


# -- (e) scale-out -----------------------------------------------------------------------------


async def test_e_sources_spread_when_replicas_join(
    redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    """1 replica leads 12 sources (each added, then modified); 2 more join: the leases spread
    4/4/4, the new holders go on from the checkpoints (nothing is added again: a re-Add of the
    modified documents would have a new id), and no source is polled by two replicas at a
    time."""
    await fresh_nats(nats_url)
    names = [f"s{i:02}" for i in range(12)]
    with Documents() as docs:
        urls = {n: docs.url(n) for n in names}
        v1 = {n: docs.set(n, f'{{"doc": "{n}"}}'.encode()) for n in names}

        def config_for(replica: str) -> dict[str, Any]:
            sources = [http_source(n, urls[n], replica) for n in names]
            return config(replica, redis_url=redis_url, nats_url=nats_url, sources=sources)

        async with (
            cluster(tmp_path, config_for) as replicas,
            redis_client(redis_url) as client,
        ):
            await replicas.start("r1")
            async with nats_consumer(nats_url) as received:
                for n in names:
                    await expect(received, f"Added {n}", has(n, urls[n], "added", v1[n]))
                v2 = {n: docs.set(n, f'{{"doc": "{n}", "v": 2}}'.encode()) for n in names}
                for n in names:
                    await expect(received, f"Modified {n}", has(n, urls[n], "modified", v2[n]))
                assert await spread(client, names) == [12]
                await replicas.start("r2", "r3")

                async def balanced() -> bool:
                    return await spread(client, names) == [4, 4, 4]

                await until(balanced, "a 4/4/4 spread", replicas=replicas)
                held = await holders(client, names)

                def polled_by_holders() -> bool:
                    return all(
                        sum(r.replica == held[n][0] for r in docs.requests(n)) >= 3 for n in names
                    )

                await until(
                    polled_by_holders, "3 polls of each source by its holder", replicas=replicas
                )
                spread_now = Counter(r for r, _ in (await holders(client, names)).values())
                events = list(received.events)

    assert spread_now == {"r1": 4, "r2": 4, "r3": 4}
    assert {r for r, _ in held.values()} == {"r1", "r2", "r3"}
    for n in names:
        assert history(events, n, urls[n]) == [("added", v1[n]), ("modified", v2[n])], n
    assert_no_duplicates(events)
    assert_never_interleaved(docs, names)


# -- (f) Redis down, with persistence ----------------------------------------------------------


@pytest.fixture
def persistent_redis() -> Iterator[PersistentRedisServer]:
    with PersistentRedisServer() as server:
        yield server


@pytest.mark.timeout(180)
async def test_f_redis_restart_with_persistence_resumes_from_the_checkpoints(
    persistent_redis: PersistentRedisServer, nats_url: str, tmp_path: Path
) -> None:
    """Like (d), but Redis keeps its data across the restart (as in production): after the
    outage the new leaders continue from the checkpoints. Nothing is added again, the change
    made during the outage is published as Modified, and a document deleted during the outage
    yields Removed (a checkpoint wiped after the restart would lose it)."""
    redis_url = persistent_redis.url
    async with two_replicas_leading(tmp_path, redis_url, nats_url) as world:
        names, docs, urls, current = world.names, world.docs, world.urls, world.current
        replicas, received, client = world.replicas, world.received, world.client
        fences = {n: f for n, (_, f) in (await holders(client, names)).items()}
        await leases_lost_when(persistent_redis.stop, replicas, names)
        restarted_at = len(received.events)
        current["b"] = docs.set("b", b'{"b": 2}')  # changes while Redis is down
        removed_c = current.pop("c")
        docs.set("c", None)
        await rounds_failed(replicas, 1)
        persistent_redis.start()  # with the data: checkpoints and fences are back

        await expect(received, "b v2", has("b", urls["b"], "modified", current["b"]))
        await expect(received, "c removed", has("c", urls["c"], "removed", removed_c))
        current["a"] = docs.set("a", b'{"a": 3}')
        await expect(received, "a v3", has("a", urls["a"], "modified", current["a"]))
        polls = {n: len(docs.requests(n)) for n in names}
        await until(
            lambda: all(len(docs.requests(n)) >= polls[n] + 2 for n in names),
            "2 more polls of every source",
            replicas=replicas,
        )
        async with redis_client(redis_url) as fresh:  # the old connections are closed
            held = await holders(fresh, names)
            metas = {n: await fresh.hgetall(SourceKeys(n).meta) for n in names}
        events = list(received.events)

    assert sorted(held) == names
    for n in names:
        # Fences went on from where they were (the counter survived), and the last commit
        # (after the restart) was made under a newer fence than before, at most the current one.
        assert fences[n] < int(metas[n].get(b"fence", 0)) <= held[n][1], f"fences of {n}"
    assert summary(events[restarted_at:]) == summary(
        [e for e in events[restarted_at:] if kind(e) != "added"]
    ), "an item was added again after the restart: a checkpoint was lost"
    assert history(events, "a", urls["a"]) == [
        ("added", version_of(b'{"a": 1}')),
        ("modified", version_of(b'{"a": 2}')),
        ("modified", current["a"]),
    ]
    assert history(events, "b", urls["b"]) == [
        ("added", version_of(b'{"b": 1}')),
        ("modified", current["b"]),
    ]
    assert history(events, "c", urls["c"]) == [("added", removed_c), ("removed", removed_c)]
    assert_no_duplicates(events)


async def test_checkpoint_load_after_a_redis_restart_is_retried_not_reset(
    persistent_redis: PersistentRedisServer,
) -> None:
    """In one process, the cause of what (f) guards against: after a Redis restart the first
    command on a pooled connection fails ("Connection closed by server"). Loading a checkpoint
    must retry that, not raise StateError: the caller takes a StateError for a corrupt
    checkpoint and deletes it."""
    client = aioredis.from_url(persistent_redis.url)
    try:
        lease = await LeaseClient(client, "r1", ttl_s=60, prefix=DEFAULT_PREFIX).acquire("src")
        assert lease is not None
        store = RedisStateStore(client, {"src": lease})
        await store.commit("src", 3, {"k": "v"})
        persistent_redis.restart()
        checkpoint = await store.load("src")
        assert checkpoint is not None
        assert (checkpoint.revision, checkpoint.state) == (3, {"k": "v"})
    finally:
        await client.aclose()


# -- (g) a resumed leader does not poll again ---------------------------------------------------


async def test_g_leader_paused_between_polls_does_not_poll_again_when_resumed(
    redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    """2 replicas, 1 source. Its leader is SIGSTOPped between two polls, past its lease TTL, and
    the other replica takes over. When the old leader resumes, its next poll is long due, but
    its lease is lost: it must not poll the source again (it cannot lead it again either, the
    other replica holds it)."""
    await fresh_nats(nats_url)
    with Documents() as docs:
        url = docs.url("doc")
        versions = [docs.set("doc", b'{"v": 1}')]

        def config_for(replica: str) -> dict[str, Any]:
            return config(
                replica,
                redis_url=redis_url,
                nats_url=nats_url,
                sources=[http_source("doc", url, replica)],
            )

        async with (
            cluster(tmp_path, config_for) as replicas,
            redis_client(redis_url) as client,
        ):
            await replicas.start("r1", "r2")
            async with nats_consumer(nats_url) as received:
                await expect(received, "Added doc", has("doc", url, "added", versions[0]))
                paused, _ = (await holders(client, ["doc"]))["doc"]
                polls = sum(r.replica == paused for r in docs.requests("doc"))
                await until(
                    lambda: sum(r.replica == paused for r in docs.requests("doc")) > polls,
                    f"a poll by {paused}",
                    every_s=0.005,
                )
                os.kill(replicas[paused].pid, signal.SIGSTOP)  # just after a poll
                try:

                    async def taken_over() -> bool:
                        held = (await holders(client, ["doc"])).get("doc")
                        return held is not None and held[0] != paused

                    await until(taken_over, "the other replica to take doc over", replicas=replicas)
                    versions.append(docs.set("doc", b'{"v": 2}'))
                    await expect(received, "v2", has("doc", url, "modified", versions[-1]))
                    since = replicas[paused].mark()
                finally:
                    resumed_at = time.monotonic()
                    replicas[paused].resume()
                await until(
                    logged(replicas[paused], LEASE_LOST.format("doc"), since),
                    f"{paused} to log that it lost the lease on doc",
                    replicas=replicas,
                )
                versions.append(docs.set("doc", b'{"v": 3}'))
                await expect(received, "v3", has("doc", url, "modified", versions[-1]))
                polls = len(docs.requests("doc"))
                await until(
                    lambda: len(docs.requests("doc")) >= polls + 3,
                    "3 more polls of doc",
                    replicas=replicas,
                )
                events = list(received.events)

    late = [r for r in docs.requests("doc") if r.replica == paused and r.at > resumed_at]
    assert late == [], f"{paused} polled doc after it resumed without its lease"
    assert history(events, "doc", url) == [
        ("added", versions[0]),
        *(("modified", v) for v in versions[1:]),
    ]
    assert_no_duplicates(events)
