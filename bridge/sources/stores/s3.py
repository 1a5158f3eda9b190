"""``S3Store``: any S3-compatible bucket (AWS, MinIO, SeaweedFS, GCS interop), via aioboto3.

Credentials come from the standard AWS chain (env, shared files, web identity, instance
metadata) unless given explicitly. Listing is ``ListObjectsV2``, paginated. The store only
needs ``s3:ListBucket`` (plus ``s3:PutObject``/``s3:DeleteObject`` if you call ``put``/``delete``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Self

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from bridge.errors import SourceUnavailableError, StoreError
from bridge.sources.stores import StoredObject

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3Store"]

_MISSING_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"})


class S3Store:
    """A bucket. ``endpoint_url`` selects an S3-compatible server other than AWS."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        session: aioboto3.Session | None = None,
        page_size: int = 1000,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.bucket = bucket
        self.uri = f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self._session = session or aioboto3.Session(
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            region_name=region_name,
        )
        self._config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    async def _s3(self) -> S3Client:
        if self._client is None:
            client: S3Client = await self._stack.enter_async_context(
                self._session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
            )
            self._client = client
        return self._client

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        with self._errors("list"):
            paginator = (await self._s3()).get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
            )
            async for page in pages:
                yield [
                    StoredObject(
                        o["Key"], o["ETag"].strip('"'), o.get("Size"), o.get("LastModified")
                    )
                    for o in page.get("Contents", ())
                ]

    async def put(self, path: str, data: bytes) -> None:
        with self._errors(f"put {path!r} into"):
            await (await self._s3()).put_object(Bucket=self.bucket, Key=path, Body=data)

    async def delete(self, path: str) -> None:
        with self._errors(f"delete {path!r} from"):
            await (await self._s3()).delete_object(Bucket=self.bucket, Key=path)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn botocore's exceptions into the project's, naming the bucket and endpoint."""
        where = f"bucket {self.bucket!r}"
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_BUCKET:
                raise StoreError(f"cannot {action} {where}: the bucket does not exist") from exc
            if code in _DENIED:
                raise StoreError(f"cannot {action} {where}: access denied ({code})") from exc
            raise StoreError(f"cannot {action} {where}: {code or exc}") from exc
        except NoCredentialsError as exc:
            raise StoreError(f"cannot {action} {where}: no AWS credentials found") from exc
        except BotoCoreError as exc:
            raise SourceUnavailableError(f"cannot {action} {where}: {exc}") from exc
