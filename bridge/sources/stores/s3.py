"""``S3Store``: any S3-compatible bucket (AWS, MinIO, SeaweedFS, GCS interop), via aioboto3.

Credentials, first match wins:

* explicit keys (``aws_access_key_id`` + ``aws_secret_access_key``, optional
  ``aws_session_token``): strings, or :class:`~bridge.secrets.Secret` values that are read
  again for every request, so keys in a file (a mounted Kubernetes Secret, a Vault agent) can
  rotate without a restart;
* web identity (``role_arn`` + ``web_identity_token_file``, optional ``sts_endpoint_url``):
  ``AssumeRoleWithWebIdentity`` with the token in the file, refreshed before the temporary
  credentials expire, the token file read again each time (Kubernetes rotates projected
  tokens). With only ``sts_endpoint_url``, role and token file come from ``AWS_ROLE_ARN`` and
  ``AWS_WEB_IDENTITY_TOKEN_FILE`` (IRSA's environment);
* otherwise the standard AWS chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, web
  identity from ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE`` (STS endpoint from
  ``AWS_ENDPOINT_URL_STS``), the shared credentials and config files (``profile_name``, else
  ``AWS_PROFILE``, else ``default``), container and instance metadata.

Listing is ``ListObjectsV2``, paginated. The store only needs ``s3:ListBucket`` (plus
``s3:PutObject``/``s3:DeleteObject`` if you call ``put``/``delete``): object bodies are never read.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from bridge.errors import MissingExtraError, SourceUnavailableError, StoreError
from bridge.secrets import Secret, redact_url
from bridge.sources.stores.base import StoredObject

try:
    import aioboto3
    from aiobotocore.credentials import (
        AioAssumeRoleWithWebIdentityCredentialFetcher,
        AioCredentials,
        AioDeferredRefreshableCredentials,
    )
    from aiobotocore.session import AioSession
    from botocore.config import Config
    from botocore.credentials import ReadOnlyCredentials
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        InvalidConfigError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
        UnknownCredentialError,
    )
except ModuleNotFoundError as exc:  # the `s3` extra is not installed
    raise MissingExtraError("S3Store", "s3", exc.name or "aioboto3") from exc

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3Store"]

_MISSING_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"})
_ASSUME_ROLE = frozenset({"AssumeRoleWithWebIdentity", "AssumeRole"})
_CREDENTIAL_ERRORS = (
    CredentialRetrievalError,
    InvalidConfigError,
    PartialCredentialsError,
    ProfileNotFound,
    UnknownCredentialError,
)
_WEB_IDENTITY = "assume-role-with-web-identity"

Key = str | Secret


class S3Store:
    """A bucket. ``endpoint_url`` selects an S3-compatible server other than AWS.

    Credentials: see the module's docstring. ``session`` (an ``aioboto3.Session`` of your own)
    replaces all the credential arguments.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: Key | None = None,
        aws_secret_access_key: Key | None = None,
        aws_session_token: Key | None = None,
        profile_name: str | None = None,
        role_arn: str | None = None,
        web_identity_token_file: str | os.PathLike[str] | None = None,
        sts_endpoint_url: str | None = None,
        session: aioboto3.Session | None = None,
        page_size: int = 1000,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise ValueError("aws_access_key_id and aws_secret_access_key must be given together")
        if aws_session_token is not None and aws_access_key_id is None:
            raise ValueError("aws_session_token needs aws_access_key_id and aws_secret_access_key")
        if (role_arn is None) != (web_identity_token_file is None):
            raise ValueError("role_arn and web_identity_token_file must be given together")
        if role_arn is not None and aws_access_key_id is not None:
            raise ValueError("give access keys or role_arn/web_identity_token_file, not both")
        credential_args = (aws_access_key_id, profile_name, role_arn, sts_endpoint_url)
        if session is not None and any(arg is not None for arg in credential_args):
            raise ValueError("give a session or credentials, not both")
        self.bucket = bucket
        self.uri = f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.profile_name = profile_name
        self.role_arn = role_arn
        # Made at first use, inside the error handling: a missing profile is then a poll error
        # that names the bucket (and is retried), not an exception from the constructor.
        self._session: aioboto3.Session | None = session
        self._new_session: Callable[[], aioboto3.Session]
        if aws_access_key_id is not None:
            assert aws_secret_access_key is not None
            key_id, secret, token = aws_access_key_id, aws_secret_access_key, aws_session_token
            self._new_session = lambda: _keys_session(key_id, secret, token, region_name)
        else:
            if role_arn is None and sts_endpoint_url is not None:
                role_arn = os.environ.get("AWS_ROLE_ARN") or None
                web_identity_token_file = os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or None
                if role_arn is None or web_identity_token_file is None:
                    role_arn = web_identity_token_file = None  # the chain decides
                self.role_arn = role_arn
            if role_arn is not None and web_identity_token_file is not None:
                arn, token_file = role_arn, Path(web_identity_token_file)
                self._new_session = lambda: _web_identity_session(
                    arn, token_file, sts_endpoint_url, region_name
                )
            else:
                self._new_session = lambda: aioboto3.Session(
                    region_name=region_name, profile_name=profile_name
                )
        self._config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self._stale_client = False

    async def _s3(self) -> S3Client:
        if self._stale_client:  # made without credentials: make it again, look for them again
            self._stale_client = False
            await self.aclose()
            self._stack = contextlib.AsyncExitStack()
        if self._client is None:
            client: S3Client = await self._stack.enter_async_context(
                self._aws().client("s3", endpoint_url=self.endpoint_url, config=self._config)
            )
            self._client = client
        return self._client

    def _aws(self) -> aioboto3.Session:
        if self._session is None:
            self._session = self._new_session()
        return self._session

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def credential_source(self) -> str | None:
        """Where the credentials come from, in botocore's words: ``explicit``, ``env``,
        ``assume-role-with-web-identity``, ``shared-credentials-file``, ``config-file``,
        ``iam-role``, ... (None: no credentials found). Never the credentials themselves."""
        with self._errors("find credentials for"):
            credentials = await self._aws().get_credentials()
        return None if credentials is None else str(credentials.method)

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
            where += f" at {redact_url(self.endpoint_url)}"
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if exc.operation_name in _ASSUME_ROLE:
                role = f" {self.role_arn}" if self.role_arn else ""
                detail = f": {error['Message']}" if error.get("Message") else ""
                raise StoreError(
                    f"cannot {action} {where}: STS refused to let it assume the role{role} "
                    f"({exc.operation_name}: {code or 'error'}{detail})"
                ) from exc
            if code in _MISSING_BUCKET:
                raise StoreError(f"cannot {action} {where}: the bucket does not exist") from exc
            if code in _DENIED:
                raise StoreError(f"cannot {action} {where}: access denied ({code})") from exc
            raise StoreError(f"cannot {action} {where}: {code or exc}") from exc
        except NoCredentialsError as exc:
            self._stale_client = True
            raise StoreError(
                f"cannot {action} {where}: no AWS credentials found (give access keys, a "
                "profile or role_arn + web_identity_token_file, or set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or AWS_ROLE_ARN/AWS_WEB_IDENTITY_TOKEN_FILE)"
            ) from exc
        except _CREDENTIAL_ERRORS as exc:
            self._stale_client = True
            raise StoreError(f"cannot {action} {where}: AWS credentials: {exc}") from exc
        except BotoCoreError as exc:
            raise SourceUnavailableError(f"cannot {action} {where}: {exc}") from exc


# -- credentials ------------------------------------------------------------------------------


class _SecretKeys(AioCredentials):
    """Access keys whose values are read again (``Secret.reveal``) for every signed request."""

    def __init__(self, key_id: Key, secret: Key, token: Key | None) -> None:
        super().__init__("", "", None, method="explicit")
        self._keys = (key_id, secret, token)

    async def get_frozen_credentials(self) -> ReadOnlyCredentials:  # type: ignore[override]
        key_id, secret, token = self._keys
        return ReadOnlyCredentials(
            _reveal("aws_access_key_id", key_id),
            _reveal("aws_secret_access_key", secret),
            None if token is None else _reveal("aws_session_token", token),
        )


def _reveal(what: str, value: Key) -> str:
    if isinstance(value, str):
        return value
    try:
        current = value.reveal()
    except OSError as exc:
        raise CredentialRetrievalError(
            provider=value.origin, error_msg=f"cannot read {what}: {exc.strerror or exc}"
        ) from exc
    if not current:
        raise CredentialRetrievalError(provider=value.origin, error_msg=f"{what} is empty")
    return current


class _Resolver:
    """A credential resolver that always answers the same credentials object."""

    def __init__(self, credentials: AioCredentials | AioDeferredRefreshableCredentials) -> None:
        self._credentials = credentials

    async def load_credentials(self) -> AioCredentials | AioDeferredRefreshableCredentials:
        return self._credentials


def _session_with(
    credentials: AioCredentials | AioDeferredRefreshableCredentials,
    region_name: str | None,
    botocore_session: AioSession | None = None,
) -> aioboto3.Session:
    botocore_session = botocore_session or AioSession()
    botocore_session.register_component("credential_provider", _Resolver(credentials))
    return aioboto3.Session(botocore_session=botocore_session, region_name=region_name)


def _keys_session(
    key_id: Key, secret: Key, token: Key | None, region_name: str | None
) -> aioboto3.Session:
    if isinstance(key_id, str) and isinstance(secret, str) and not isinstance(token, Secret):
        return aioboto3.Session(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=token,
            region_name=region_name,
        )
    return _session_with(_SecretKeys(key_id, secret, token), region_name)


def _web_identity_session(
    role_arn: str, token_file: Path, sts_endpoint_url: str | None, region_name: str | None
) -> aioboto3.Session:
    """Credentials from ``AssumeRoleWithWebIdentity``, refreshed (token re-read) before expiry."""
    botocore_session = AioSession()

    def sts_client(service_name: str, **kwargs: Any) -> Any:
        region = region_name or botocore_session.get_config_variable("region") or "us-east-1"
        create: Any = botocore_session.create_client  # the stubs want a literal service name
        return create(service_name, region_name=region, endpoint_url=sts_endpoint_url, **kwargs)

    session_name = os.environ.get("AWS_ROLE_SESSION_NAME") or f"koprs-bridge-{int(time.time())}"
    fetcher = AioAssumeRoleWithWebIdentityCredentialFetcher(
        client_creator=sts_client,
        web_identity_token_loader=_token_loader(token_file),
        role_arn=role_arn,
        extra_args={"RoleSessionName": session_name},
    )
    credentials = AioDeferredRefreshableCredentials(
        refresh_using=fetcher.fetch_credentials, method=_WEB_IDENTITY
    )
    return _session_with(credentials, region_name, botocore_session)


def _token_loader(path: Path) -> Callable[[], str]:
    def load() -> str:
        try:
            token = path.read_text("utf-8").strip()
        except OSError as exc:
            raise CredentialRetrievalError(
                provider=_WEB_IDENTITY,
                error_msg=f"cannot read the web identity token file {str(path)!r}: "
                f"{exc.strerror or exc}",
            ) from exc
        if not token:
            raise CredentialRetrievalError(
                provider=_WEB_IDENTITY,
                error_msg=f"the web identity token file {str(path)!r} is empty",
            )
        return token

    return load
