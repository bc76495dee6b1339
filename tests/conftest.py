"""Fixtures that start real servers (etcd, Triton) on free loopback ports and stop them by PID.

With CI=true a missing binary fails the run, saying how to install it; elsewhere it skips the tests
that need it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyard.containers.archives import register_archive_checks
from modelyard.containers.process import stop_process_group
from modelyard.containers.triton.server import TritonInstall, TritonNotInstalled, free_port
from modelyard.placement.store import open_store

IN_CI = os.environ.get("CI", "").lower() == "true"

# The tests check archives in-process (upload, import) as `modelyard models` does: register every backend.
register_archive_checks()


def missing(component: str, hint: str) -> None:
    message = f"{component} is not installed; {hint}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_triton() -> TritonInstall:
    try:
        return TritonInstall.find()
    except TritonNotInstalled as exc:
        missing("tritonserver", str(exc))
        raise


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(
        f"nothing listening on 127.0.0.1:{port} after {timeout_s} s:\n{log.read_text()[-2000:]}"
    )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL if it lingers."""
    stop_process_group(process, timeout_s)


class EtcdServer:
    def __init__(
        self,
        workdir: Path,
        *,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        compaction_retention: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """`tls`: (certificate, key) to serve clients over TLS only; `client_ca`: with `tls`, accept only
        clients holding a certificate signed by this CA; `compaction_retention`: periodic auto-compaction
        (as deploy/k8s/etcd.yaml runs etcd) keeping this much history, e.g. "1m"; `extra_args`: more etcd
        flags (a tiny quota)."""
        self.workdir = workdir
        self.extra_args = extra_args
        self.tls = tls
        self.client_ca = client_ca
        self.compaction_retention = compaction_retention
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            missing("etcd", "install Debian's etcd-server package: apt-get install etcd-server")
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        tls = [f"--cert-file={self.tls[0]}", f"--key-file={self.tls[1]}"] if self.tls else []
        if self.client_ca is not None:
            tls += ["--client-cert-auth", f"--trusted-ca-file={self.client_ca}"]
        compaction = (
            [
                "--auto-compaction-mode=periodic",
                f"--auto-compaction-retention={self.compaction_retention}",
                "--snapshot-count=10000",  # as deploy/k8s/etcd.yaml
            ]
            if self.compaction_retention
            else []
        )
        log = self.workdir / "etcd.log"
        self.process = subprocess.Popen(
            [
                str(binary),
                f"--data-dir={self.workdir / 'data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--log-level=warn",
                *tls,
                *compaction,
                *self.extra_args,
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_for_port(self.client_port, self.process, timeout_s, log)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def _wipe(url: str) -> None:
    async with open_store(url) as store:
        items, _ = await store.get_prefix("/")
        await store.apply({}, [item.key for item in items])


@pytest.fixture
def etcd_url(etcd_server: EtcdServer) -> str:
    """The shared test etcd, emptied for this test."""
    asyncio.run(_wipe(etcd_server.url))
    return etcd_server.url


@pytest.fixture(params=["embedded", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store implementation in turn: the embedded one in a temp dir, then a real etcd."""
    if request.param == "embedded":
        return str(tmp_path / "store")
    return str(request.getfixturevalue("etcd_url"))
