"""etcd's space quota: a store that reached it refuses writes at once with one line saying what to do
(compaction, defragmentation, disarming the alarm), never a stall; tested on an etcd with a 1 MiB quota."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import StoreFull, open_store
from tests.conftest import EtcdServer

QUOTA_BYTES = 1024 * 1024


@pytest.fixture
def tiny_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path, extra_args=(f"--quota-backend-bytes={QUOTA_BYTES}",))
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def fill(url: str) -> tuple[StoreFull, int, float]:
    """Registers model versions in batches of 100 until etcd refuses: (the error, versions written, seconds
    the refused write took)."""
    written = 0
    async with open_store(url) as store:
        for batch in range(1000):
            models = [ModelVersion(f"m{batch}-{i}", "1", artifact_uri="x" * 900) for i in range(100)]
            started = time.perf_counter()
            try:
                await registry.create_models(store, models)
            except StoreFull as exc:
                return exc, written, time.perf_counter() - started
            written += len(models)
    raise AssertionError("etcd never refused a write")


def test_a_full_store_refuses_writes_at_once_naming_the_quota_and_the_cure(tiny_etcd: EtcdServer) -> None:
    error, written, refused_s = asyncio.run(asyncio.wait_for(fill(tiny_etcd.url), 60))
    assert written > 0 and refused_s < 5
    message = str(error)
    assert "\n" not in message
    for words in (
        "space quota",
        "--quota-backend-bytes",
        "etcdctl compact",
        "etcdctl defrag",
        "alarm disarm",
    ):
        assert words in message, message


def test_a_cli_write_to_a_full_store_ends_with_that_one_line(tiny_etcd: EtcdServer) -> None:
    asyncio.run(asyncio.wait_for(fill(tiny_etcd.url), 60))
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "tenants", "set", "acme", "--rps", "5", "--store", tiny_etcd.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: etcd at 127.0.0.1:")
    assert "space quota" in result.stderr and "etcdctl defrag" in result.stderr


def test_a_full_store_says_so_in_its_space_and_a_controller_reads_it_without_leading(
    tiny_etcd: EtcdServer,
) -> None:
    """What the gauges modelyard_store_db_bytes / _quota_bytes / _full export (placement/metrics.py)."""
    from modelyard.placement.controller import PlacementController

    async def scenario() -> None:
        async with open_store(tiny_etcd.url) as store:
            empty = await store.space()
            assert empty is not None and not empty.full
        await fill(tiny_etcd.url)
        async with open_store(tiny_etcd.url) as store:
            controller = PlacementController(store, space_every_s=0.05, store_quota_bytes=QUOTA_BYTES)
            task = asyncio.create_task(controller.run())
            try:
                async with asyncio.timeout(20):
                    while controller.space is None:  # noqa: ASYNC110  (read on the controller's own clock)
                        await asyncio.sleep(0.05)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert controller.space.full and controller.space.db_bytes >= QUOTA_BYTES
            assert not controller.leading.is_set()  # campaigning is a write: refused

    asyncio.run(scenario())


def test_the_embedded_store_has_no_quota_to_report(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            assert await store.space() is None

    asyncio.run(scenario())
