"""etcd security: authentication (right credentials work, wrong or missing ones fail clearly) and TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyard.placement.store import StoreError
from modelyard.settings import open_configured_store
from tests.conftest import EtcdServer, missing


@pytest.fixture
def etcd_with_auth(tmp_path: Path) -> Iterator[EtcdServer]:
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        missing("etcdctl", "install Debian's etcd-client package: apt-get install etcd-client")
    server = EtcdServer(tmp_path)
    try:
        server.start()
        endpoint = f"--endpoints=http://127.0.0.1:{server.client_port}"
        for args in (
            ["user", "add", "root:s3cret"],
            ["user", "grant-role", "root", "root"],
            ["auth", "enable"],
        ):
            subprocess.run([str(etcdctl), endpoint, *args], check=True, capture_output=True, timeout=30)
        yield server
    finally:
        server.stop()


async def round_trip(url: str) -> bytes:
    # As every command opens it: MODELYARD_ETCD_* read by modelyard/settings.py, passed to open_store.
    async with open_configured_store(url) as store:
        await store.put("/t/auth", b"ok")
        item = await store.get("/t/auth")
        assert item is not None
        return item.value


def test_right_credentials_work(etcd_with_auth: EtcdServer) -> None:
    url = etcd_with_auth.url.replace("etcd://", "etcd://root:s3cret@")
    assert asyncio.run(round_trip(url)) == b"ok"


def test_wrong_credentials_are_refused_with_a_clear_error(etcd_with_auth: EtcdServer) -> None:
    url = etcd_with_auth.url.replace("etcd://", "etcd://root:wrong@")
    with pytest.raises(StoreError, match="authentication failed"):
        asyncio.run(round_trip(url))


def test_no_credentials_cannot_write(etcd_with_auth: EtcdServer) -> None:
    with pytest.raises(StoreError):
        asyncio.run(round_trip(etcd_with_auth.url))


def test_etcd_over_tls_works_with_the_ca_and_fails_clearly_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_tls import make_ca, make_cert

    make_ca(tmp_path, "ca")
    make_cert(tmp_path, "etcd", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    server = EtcdServer(tmp_path / "etcd", tls=(tmp_path / "etcd.pem", tmp_path / "etcd.key"))
    server.workdir.mkdir()
    try:
        server.start()
        monkeypatch.setenv("MODELYARD_ETCD_CA", str(tmp_path / "ca.pem"))
        assert asyncio.run(round_trip(server.url)) == b"ok"
        monkeypatch.delenv("MODELYARD_ETCD_CA")
        with pytest.raises(StoreError, match=r"etcd at 127\.0\.0\.1"):
            asyncio.run(round_trip(server.url))  # plaintext against a TLS-only etcd
    finally:
        server.stop()
