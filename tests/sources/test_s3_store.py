"""``S3Store`` against a real S3 server (moto's, from the ``s3_server`` fixture)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

import pytest

from bridge import (
    Added,
    ObjectStorePoller,
    Removed,
    SourceUnavailableError,
    StoredObject,
    StoreError,
)
from bridge.sources.stores.s3 import S3Store
from tests.support.backends import make_store
from tests.support.servers import LOOPBACK, S3Server, free_port

pytestmark = pytest.mark.servers


@pytest.fixture
async def store(s3_server: S3Server, s3_bucket: str) -> AsyncIterator[S3Store]:
    async with make_store(s3_server, s3_bucket) as opened:
        yield opened


async def pages_of(store: S3Store, prefix: str = "") -> list[Sequence[StoredObject]]:
    return [page async for page in store.list(prefix)]


async def put_many(store: S3Store, paths: Sequence[str], *, concurrency: int = 32) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def put(path: str) -> None:
        async with limit:
            await store.put(path, path.encode())

    await asyncio.gather(*(put(path) for path in paths))


async def test_listing_paginates_past_1000_keys(store: S3Store) -> None:
    paths = [f"objects/{i:05d}.json" for i in range(1100)]
    await put_many(store, paths)
    assert store.page_size == 1000
    pages = await pages_of(store)
    assert len(pages) > 1
    assert all(len(page) <= 1000 for page in pages)
    listed = [obj.path for page in pages for obj in page]
    assert sorted(listed) == paths  # every key, each once

    poller = ObjectStorePoller(store)
    events = await poller.poll()
    assert len(events) == 1100
    assert all(isinstance(e, Added) for e in events)
    assert await poller.poll() == []
    etag_0 = poller.state()["objects/00000.json"]
    await store.delete("objects/00000.json")  # on the first page
    await store.delete("objects/01099.json")  # on the last page
    assert await poller.poll() == [
        Removed(StoredObject("objects/00000.json", etag_0)),
        Removed(StoredObject("objects/01099.json", hashlib.md5(b"objects/01099.json").hexdigest())),
    ]


async def test_page_size_and_prefix_together(s3_server: S3Server, s3_bucket: str) -> None:
    async with make_store(s3_server, s3_bucket, page_size=10) as store:
        await put_many(store, [f"p/{i:02d}" for i in range(25)] + [f"q/{i}" for i in range(5)])
        pages = await pages_of(store, "p/")
        assert [len(page) for page in pages] == [10, 10, 5]
        assert {obj.path for page in pages for obj in page} == {f"p/{i:02d}" for i in range(25)}


async def test_prefix_listing(store: S3Store) -> None:
    await put_many(store, ["configs/a.json", "configs/b/c.json", "config.yaml", "other/d"])
    listed = {obj.path for page in await pages_of(store, "configs/") for obj in page}
    assert listed == {"configs/a.json", "configs/b/c.json"}
    listed = {obj.path for page in await pages_of(store, "config") for obj in page}
    assert listed == {"configs/a.json", "configs/b/c.json", "config.yaml"}
    poller = ObjectStorePoller(store).with_prefix("configs/")
    assert poller.name == f"s3://{store.bucket}/configs/"
    assert {e.resource.path for e in await poller.poll()} == {"configs/a.json", "configs/b/c.json"}


async def test_etags_come_without_quotes(store: S3Store) -> None:
    await store.put("x.json", b'{"hello": "world"}')
    ((obj,),) = await pages_of(store)
    assert obj.etag == hashlib.md5(b'{"hello": "world"}').hexdigest()
    assert obj.size == len(b'{"hello": "world"}')
    assert obj.last_modified is not None


async def test_a_missing_bucket_is_a_clear_store_error(s3_server: S3Server) -> None:
    bucket = "koprs-no-such-bucket"
    async with make_store(s3_server, bucket) as store:
        with pytest.raises(StoreError) as listing:
            await pages_of(store)
        with pytest.raises(StoreError) as putting:
            await store.put("x", b"x")
        with pytest.raises(StoreError):
            await ObjectStorePoller(store).poll()
    message = str(listing.value)
    assert f"bucket {bucket!r}" in message
    assert "does not exist" in message
    assert s3_server.endpoint_url in message
    assert "does not exist" in str(putting.value)
    assert not isinstance(listing.value, SourceUnavailableError)


async def test_an_unreachable_endpoint_is_source_unavailable() -> None:
    endpoint = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    store = S3Store(
        "some-bucket",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    async with store:
        with pytest.raises(SourceUnavailableError) as caught:
            await pages_of(store)
    assert "'some-bucket'" in str(caught.value)
    assert endpoint in str(caught.value)


def test_a_bucket_name_is_required() -> None:
    with pytest.raises(ValueError, match="bucket"):
        S3Store("")
    assert S3Store("b", region_name="us-east-1").uri == "s3://b"
