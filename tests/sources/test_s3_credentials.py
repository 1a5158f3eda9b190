"""S3 sources: where credentials come from, built from config documents by ``build_source``.

Two moto servers: the session's (``s3_server``, which accepts any credentials and implements
STS ``AssumeRoleWithWebIdentity``) for web identity, and one of this module's that enforces IAM
(moto's ``reset-auth``): only keys of IAM users it knows sign valid requests, and only users
whose policy allows ``s3:ListBucket`` may list. So a test that passes there proves the right
keys were used, and ``deploy/security/s3-policy.json`` is enough for the bridge (moto ignores the
policy's ``s3:prefix`` condition, so that part is not checked here).

A small STS stand-in (an HTTP server on 127.0.0.1) answers ``AssumeRoleWithWebIdentity`` with
credentials that are about to expire, so that every request refreshes them: that shows the
token file is read again (rotation) and lets STS refuse (moto's STS never does).

Every test runs in an emptied AWS environment: no ``AWS_*`` variables, config and credentials
files that do not exist, instance metadata disabled (nothing may leave 127.0.0.1).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest

from bridge import Added, ObjectStorePoller, SourceUnavailableError, StoreError
from bridge.service.config import parse_config
from bridge.service.runner import build_source
from bridge.sources.stores.s3 import S3Store
from tests.support.servers import LOOPBACK, S3Server

pytestmark = pytest.mark.servers

SOURCE = "manifests"
REGION = "us-east-1"
POLICY_FILE = Path(__file__).resolve().parents[2] / "deploy" / "security" / "s3-policy.json"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An AWS environment with no credentials at all; returns a folder for AWS files."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    folder = tmp_path / "aws"
    folder.mkdir()
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return folder


def s3_store(s3: dict[str, Any]) -> tuple[ObjectStorePoller, S3Store]:
    doc = {
        "broker": {"url": "nats://127.0.0.1:4222"},
        "sources": [{"name": SOURCE, "interval": "1s", "s3": s3}],
    }
    (source,) = parse_config(doc).sources
    poller = build_source(source).source
    assert isinstance(poller, ObjectStorePoller)
    assert isinstance(poller.store, S3Store)
    return poller, poller.store


async def added_paths(poller: ObjectStorePoller) -> list[str]:
    events = await poller.poll()
    assert all(isinstance(e, Added) for e in events)
    return sorted(e.resource.path for e in events)


def role_arn() -> str:
    return f"arn:aws:iam::123456789012:role/bridge-{uuid.uuid4().hex[:8]}"


def assumed_roles(server: S3Server) -> list[dict[str, Any]]:
    """The roles moto's STS handed out credentials for."""
    with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/data.json") as response:
        data = json.loads(response.read())
    roles: list[dict[str, Any]] = data.get("sts", {}).get("AssumedRole", [])
    return roles


# -- web identity against moto's STS ---------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("eyJhbGciOiJSUzI1NiJ9.projected-token-1.sig\n")
    return path


@pytest.fixture
def stocked_bucket(s3_server: S3Server, s3_bucket: str) -> str:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="prod/app.yaml", Body=b"a: 1")
    client.put_object(Bucket=s3_bucket, Key="dev/app.yaml", Body=b"a: 2")
    return s3_bucket


async def test_web_identity_from_the_config(
    s3_server: S3Server, stocked_bucket: str, token_file: Path
) -> None:
    arn = role_arn()
    poller, store = s3_store(
        {
            "bucket": stocked_bucket,
            "prefix": "prod/",
            "endpoint_url": s3_server.endpoint_url,
            "region": REGION,
            "role_arn": arn,
            "web_identity_token_file": str(token_file),
            "sts_endpoint_url": s3_server.endpoint_url,
        }
    )
    async with store:
        assert await store.credential_source() == "assume-role-with-web-identity"
        assert await added_paths(poller) == ["prod/app.yaml"]
    (assumed,) = [r for r in assumed_roles(s3_server) if r["role_arn"] == arn]
    assert assumed["session_name"].startswith("koprs-bridge-")


async def test_web_identity_from_the_irsa_environment(
    s3_server: S3Server,
    stocked_bucket: str,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What EKS injects: AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE (STS endpoint from
    AWS_ENDPOINT_URL_STS here, which botocore honours); nothing in the config."""
    arn = role_arn()
    monkeypatch.setenv("AWS_ROLE_ARN", arn)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "irsa-session")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3_server.endpoint_url)
    poller, store = s3_store(
        {"bucket": stocked_bucket, "endpoint_url": s3_server.endpoint_url, "region": REGION}
    )
    async with store:
        assert await store.credential_source() == "assume-role-with-web-identity"
        assert await added_paths(poller) == ["dev/app.yaml", "prod/app.yaml"]
    (assumed,) = [r for r in assumed_roles(s3_server) if r["role_arn"] == arn]
    assert assumed["session_name"] == "irsa-session"


async def test_web_identity_from_the_environment_with_the_sts_endpoint_in_the_config(
    s3_server: S3Server,
    stocked_bucket: str,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arn = role_arn()
    monkeypatch.setenv("AWS_ROLE_ARN", arn)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    poller, store = s3_store(
        {
            "bucket": stocked_bucket,
            "endpoint_url": s3_server.endpoint_url,
            "region": REGION,
            "sts_endpoint_url": s3_server.endpoint_url,
        }
    )
    async with store:
        assert await added_paths(poller) == ["dev/app.yaml", "prod/app.yaml"]
    assert [r for r in assumed_roles(s3_server) if r["role_arn"] == arn]


# -- web identity against an STS stand-in: rotation and refusal ------------------------------


@dataclass
class StubSts:
    """``AssumeRoleWithWebIdentity`` on 127.0.0.1: credentials valid for 5 minutes (inside
    botocore's refresh window, so each request fetches new ones), or a refusal."""

    deny: bool = False
    calls: list[dict[str, str]] = field(default_factory=list)
    endpoint_url: str = ""

    def answer(self, form: dict[str, str]) -> tuple[int, bytes]:
        self.calls.append(form)
        if self.deny:
            return 403, (
                b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                b"<Type>Sender</Type><Code>AccessDenied</Code><Message>Not authorized to "
                b"perform sts:AssumeRoleWithWebIdentity</Message></Error>"
                b"<RequestId>stub</RequestId></ErrorResponse>"
            )
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return 200, (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult><Credentials>"
            f"<AccessKeyId>ASIASTUB{len(self.calls):08d}</AccessKeyId>"
            "<SecretAccessKey>stub-secret</SecretAccessKey>"
            "<SessionToken>stub-session-token</SessionToken>"
            f"<Expiration>{expires.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>"
            "</Credentials><AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/x/y</Arn>"
            "<AssumedRoleId>AROASTUB:y</AssumedRoleId></AssumedRoleUser>"
            "</AssumeRoleWithWebIdentityResult>"
            "<ResponseMetadata><RequestId>stub</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        ).encode()


@pytest.fixture
def stub_sts() -> Iterator[StubSts]:
    sts = StubSts()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            with lock:
                status, reply = sts.answer(form)
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    sts.endpoint_url = f"http://{LOOPBACK}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield sts
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def web_identity(
    endpoint_url: str, bucket: str, sts: StubSts, token_file: Path, arn: str
) -> dict[str, Any]:
    return {
        "bucket": bucket,
        "endpoint_url": endpoint_url,
        "region": REGION,
        "role_arn": arn,
        "web_identity_token_file": str(token_file),
        "sts_endpoint_url": sts.endpoint_url,
    }


async def test_a_rotated_web_identity_token_is_read_again(
    s3_server: S3Server, stocked_bucket: str, stub_sts: StubSts, token_file: Path
) -> None:
    arn = role_arn()
    poller, store = s3_store(
        web_identity(s3_server.endpoint_url, stocked_bucket, stub_sts, token_file, arn)
    )
    async with store:
        assert len(await added_paths(poller)) == 2
        token_file.write_text("eyJhbGciOiJSUzI1NiJ9.projected-token-2.sig\n")  # kubelet rotates
        assert await poller.poll() == []
    tokens = [call["WebIdentityToken"] for call in stub_sts.calls]
    assert tokens[0] == "eyJhbGciOiJSUzI1NiJ9.projected-token-1.sig"
    assert tokens[-1] == "eyJhbGciOiJSUzI1NiJ9.projected-token-2.sig"
    assert {call["Action"] for call in stub_sts.calls} == {"AssumeRoleWithWebIdentity"}
    assert {call["RoleArn"] for call in stub_sts.calls} == {arn}


async def test_a_refused_web_identity_is_a_clear_error(
    s3_server: S3Server, s3_bucket: str, stub_sts: StubSts, token_file: Path
) -> None:
    stub_sts.deny = True
    arn = role_arn()
    poller, store = s3_store(
        web_identity(s3_server.endpoint_url, s3_bucket, stub_sts, token_file, arn)
    )
    async with store:
        with pytest.raises(StoreError) as caught:
            await poller.poll()
    message = str(caught.value)
    assert f"bucket {s3_bucket!r}" in message
    assert arn in message
    assert "AssumeRoleWithWebIdentity: AccessDenied" in message
    assert "projected-token" not in message
    assert not isinstance(caught.value, SourceUnavailableError)


async def test_a_missing_web_identity_token_file_is_a_clear_error(
    s3_server: S3Server, s3_bucket: str, stub_sts: StubSts, token_file: Path
) -> None:
    poller, store = s3_store(
        web_identity(s3_server.endpoint_url, s3_bucket, stub_sts, token_file, role_arn())
    )
    token_file.unlink()
    async with store:
        with pytest.raises(StoreError) as caught:
            await poller.poll()
        token_file.write_text("eyJhbGciOiJSUzI1NiJ9.projected-token-3.sig")
        assert await poller.poll() == []  # back: no restart needed
    message = str(caught.value)
    assert str(token_file) in message
    assert "No such file" in message
    assert stub_sts.calls[-1]["WebIdentityToken"].endswith("token-3.sig")


# -- keys, profiles and refusals against an IAM-enforcing moto -------------------------------


@dataclass
class StrictS3:
    server: S3Server
    bucket: str
    admin: Any
    """An IAM client (boto3) with every permission."""

    def user(self, *, allowed: bool = True) -> tuple[str, str]:
        """A new IAM user (with the bridge's policy, or none) and an access key of it."""
        name = f"bridge-{uuid.uuid4().hex[:8]}"
        self.admin.create_user(UserName=name)
        if allowed:
            policy = POLICY_FILE.read_text()
            policy = policy.replace("BUCKET_NAME", self.bucket).replace("PREFIX", "prod/")
            self.admin.put_user_policy(UserName=name, PolicyName="bridge", PolicyDocument=policy)
        return self.key(name)

    def key(self, user: str) -> tuple[str, str]:
        key = self.admin.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def user_of(self, key_id: str) -> str:
        return str(self.admin.get_access_key_last_used(AccessKeyId=key_id)["UserName"])


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[StrictS3]:
    with S3Server() as server:
        bucket = "koprs-strict"
        client = server.client()
        client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key="prod/app.yaml", Body=b"a: 1")
        admin = boto3.client(
            "iam",
            endpoint_url=server.endpoint_url,
            region_name=REGION,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
        )
        admin.create_user(UserName="admin")
        everything = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        admin.put_user_policy(
            UserName="admin", PolicyName="all", PolicyDocument=json.dumps(everything)
        )
        key = admin.create_access_key(UserName="admin")["AccessKey"]
        admin = boto3.client(
            "iam",
            endpoint_url=server.endpoint_url,
            region_name=REGION,
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        request = urllib.request.Request(
            f"{server.endpoint_url}/moto-api/reset-auth",
            data=b"0",  # from now on, every request is authenticated and authorized
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        yield StrictS3(server, bucket, admin)


def strict_config(strict: StrictS3, **credentials: Any) -> dict[str, Any]:
    return {
        "bucket": strict.bucket,
        "prefix": "prod/",
        "endpoint_url": strict.server.endpoint_url,
        "region": REGION,
        **credentials,
    }


async def test_keys_from_files_are_used_and_rotated_without_a_restart(
    strict_s3: StrictS3, tmp_path: Path
) -> None:
    key_id, secret = strict_s3.user()
    id_file, secret_file = tmp_path / "key-id", tmp_path / "secret"
    an_hour_ago = time.time() - 3600  # mounted a while ago (a rewrite then has another mtime)
    for path, value in ((id_file, key_id), (secret_file, secret)):
        path.write_text(value)
        os.utime(path, (an_hour_ago, an_hour_ago))
    poller, store = s3_store(
        strict_config(
            strict_s3,
            access_key_id={"file": str(id_file)},
            secret_access_key={"file": str(secret_file)},
        )
    )
    async with store:
        assert await store.credential_source() == "explicit"
        assert await added_paths(poller) == ["prod/app.yaml"]
        new_id, new_secret = strict_s3.key(strict_s3.user_of(key_id))
        strict_s3.admin.delete_access_key(UserName=strict_s3.user_of(new_id), AccessKeyId=key_id)
        with pytest.raises(StoreError, match=r"access denied \(InvalidAccessKeyId\)"):
            await poller.poll()  # the old key is revoked...
        id_file.write_text(new_id)  # ...and the mounted secret catches up
        secret_file.write_text(new_secret)
        assert await poller.poll() == []


async def test_keys_from_environment_variables_named_in_the_config(
    strict_s3: StrictS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, secret = strict_s3.user()
    monkeypatch.setenv("S3_KEY", key_id)
    monkeypatch.setenv("S3_SECRET", secret)
    poller, store = s3_store(
        strict_config(
            strict_s3, access_key_id={"env": "S3_KEY"}, secret_access_key={"env": "S3_SECRET"}
        )
    )
    async with store:
        assert await added_paths(poller) == ["prod/app.yaml"]


async def test_keys_from_the_standard_aws_environment(
    strict_s3: StrictS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, secret = strict_s3.user()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    poller, store = s3_store(strict_config(strict_s3))
    async with store:
        assert await store.credential_source() == "env"
        assert await added_paths(poller) == ["prod/app.yaml"]


@pytest.mark.parametrize("how", ["config", "AWS_PROFILE"])
async def test_a_profile_from_a_shared_credentials_file(
    strict_s3: StrictS3, aws_env: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    key_id, secret = strict_s3.user()
    (aws_env / "credentials").write_text(
        "[default]\naws_access_key_id = AKIANOTTHISONE\naws_secret_access_key = nope\n\n"
        f"[bridge]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    )
    if how == "config":
        s3 = strict_config(strict_s3, profile="bridge")
    else:
        monkeypatch.setenv("AWS_PROFILE", "bridge")
        s3 = strict_config(strict_s3)
    poller, store = s3_store(s3)
    async with store:
        assert await store.credential_source() == "shared-credentials-file"
        assert await added_paths(poller) == ["prod/app.yaml"]


async def test_refused_credentials_are_a_clear_error(strict_s3: StrictS3, tmp_path: Path) -> None:
    key_id, secret = strict_s3.user(allowed=False)  # a user without the bridge's policy
    unknown = tmp_path / "unknown"
    unknown.write_text("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {"access_key_id": key_id, "secret_access_key": secret},
            "access denied (AccessDenied)",
            secret,
        ),
        (
            {"access_key_id": "AKIAUNKNOWN0000", "secret_access_key": {"file": str(unknown)}},
            "access denied (InvalidAccessKeyId)",
            "wJalrXUtnFEMI",
        ),
    ]
    for credentials, problem, secret_value in cases:
        poller, store = s3_store(strict_config(strict_s3, **credentials))
        async with store:
            with pytest.raises(StoreError) as caught:
                await poller.poll()
        message = str(caught.value)
        assert message == (
            f"cannot list bucket {strict_s3.bucket!r} at {strict_s3.server.endpoint_url}: {problem}"
        )
        assert secret_value not in message
        assert not isinstance(caught.value, SourceUnavailableError)


# -- no credentials, unknown profile ---------------------------------------------------------


async def test_no_credentials_is_a_clear_error_until_some_appear(
    s3_server: S3Server, stocked_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    poller, store = s3_store(
        {"bucket": stocked_bucket, "endpoint_url": s3_server.endpoint_url, "region": REGION}
    )
    async with store:
        assert await store.credential_source() is None
        with pytest.raises(StoreError) as caught:
            await poller.poll()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        assert len(await added_paths(poller)) == 2  # found at the next poll, no restart
    message = str(caught.value)
    assert f"bucket {stocked_bucket!r}" in message
    assert "no AWS credentials found" in message
    assert "AWS_ROLE_ARN" in message


async def test_an_unknown_profile_is_a_clear_error(s3_server: S3Server, s3_bucket: str) -> None:
    poller, store = s3_store(
        {
            "bucket": s3_bucket,
            "endpoint_url": s3_server.endpoint_url,
            "region": REGION,
            "profile": "no-such-profile",
        }
    )
    async with store:
        with pytest.raises(StoreError, match=r"AWS credentials: .*no-such-profile"):
            await poller.poll()


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"aws_access_key_id": "a"}, "given together"),
        ({"aws_session_token": "t"}, "needs aws_access_key_id"),
        ({"role_arn": "arn:aws:iam::1:role/r"}, "given together"),
        (
            {
                "aws_access_key_id": "a",
                "aws_secret_access_key": "s",
                "role_arn": "arn:aws:iam::1:role/r",
                "web_identity_token_file": "/t",
            },
            "not both",
        ),
    ],
)
def test_contradictory_credentials_are_refused(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        S3Store("bucket", **kwargs)
