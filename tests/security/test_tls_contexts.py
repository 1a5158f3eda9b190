"""bridge.tls: one cache of client TLS contexts for brokers, Redis and HTTP sources; what
differs between them (the default CAs, how a bad file is reported) is a parameter."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import certifi
import pytest
import trustme

from bridge.errors import ConfigError
from bridge.tls import client_context


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_same_settings_share_a_context_until_a_file_rotates(ca_file: Path) -> None:
    first = client_context(ca_file=ca_file, default_ca="system", errors="config")
    assert client_context(ca_file=ca_file, default_ca="system", errors="config") is first
    assert client_context(ca_file=ca_file, default_ca="certifi", errors="raise") is not first
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # another CA, another size or inode
    os.utime(ca_file, ns=(1, 1))
    assert client_context(ca_file=ca_file, default_ca="system", errors="config") is not first


def test_the_default_cas_are_the_systems_or_certifis() -> None:
    certifi_ctx = client_context(default_ca="certifi", errors="raise")
    expected = ssl.create_default_context(cafile=certifi.where()).cert_store_stats()
    if "SSL_CERT_FILE" not in os.environ and "SSL_CERT_DIR" not in os.environ:
        assert certifi_ctx.cert_store_stats() == expected
    system_ctx = client_context(default_ca="system", errors="config")
    assert system_ctx.verify_mode == ssl.CERT_REQUIRED
    assert system_ctx.check_hostname


def test_a_missing_file_is_a_config_error_or_the_os_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"tls\.ca_file .*nope\.pem.*cannot load it"):
        client_context(ca_file=missing, default_ca="system", errors="config")
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        client_context(ca_file=missing, default_ca="certifi", errors="raise")


def test_without_verification_certifi_contexts_load_no_ca(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    # httpx's verify=False: the CA is not even read (but the stamp of a given file is)
    with pytest.raises(FileNotFoundError):
        client_context(verify=False, ca_file=missing, default_ca="certifi", errors="raise")
    context = client_context(verify=False, default_ca="certifi", errors="raise")
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    # brokers and Redis: the ca_file is loaded, so a wrong one is reported even then
    with pytest.raises(ConfigError, match="cannot load it"):
        client_context(verify=False, ca_file=missing, default_ca="system", errors="config")
