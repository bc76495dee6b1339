"""The S3 model store against a local one: artifact fetch throughput from an S3 endpoint (moto_server as
its own process on loopback) vs copying the same files locally, and a cold load into our container from
S3 (fetch into the agent's cache, verify, load) vs from a file:// store (load in place).

Run: ./dev bench -k s3   (100 MiB artifact; --quick: 8 MiB, one round). moto keeps objects in memory
and serves them from one Python process: a real S3 (or MinIO) endpoint is faster; the figures show what
the store's own work (parts, temp file, unpack, sha256) costs next to the transfer.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelyard.catalog.modelstore import checked
from modelyard.catalog.s3store import ArtifactCache, S3ModelStore
from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.containers.custom.process import CustomContainerProcess
from modelyard.containers.fetching import FetchingAdapter
from modelyard.placement.model import ModelVersion
from tests.catalog.test_s3store import numpy_model
from tests.s3 import MotoServer, aws_environment

MiB = 1 << 20
STORE = "s3://bench/models"
Record = Callable[[str], None]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    server.client().create_bucket(Bucket="bench")
    try:
        with aws_environment(server):
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def artifact(
    moto: MotoServer, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> tuple[Path, str, int]:
    """(local folder, S3 URI, bytes) of a model whose files weigh 100 MiB (8 MiB quick)."""
    from benchmarks.conftest import is_quick

    size = (8 if is_quick(pytestconfig) else 100) * MiB
    folder = numpy_model(tmp_path_factory.mktemp("artifact") / "model", 2.0, padding_bytes=size)
    started = time.perf_counter()
    with checked(folder, max_bytes=4 * size) as checked_artifact:
        uri = S3ModelStore(STORE).put(checked_artifact)
    print(f"\n  upload {size / MiB:.0f} MiB to S3: {time.perf_counter() - started:.2f} s")
    return folder, uri, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_s3_fetch_throughput_vs_local_copy(
    artifact: tuple[Path, str, int], tmp_path: Path, record: Record, quick: bool
) -> None:
    folder, uri, size = artifact
    rounds = 1 if quick else 3
    fetch_s, copy_s = [], []
    for i in range(rounds):
        cache = ArtifactCache(tmp_path / f"cache-{i}", model_store=STORE)
        started = time.perf_counter()
        cache.fetch(uri)  # download in parts to a temp file, unpack, hash, rename
        fetch_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        shutil.copytree(folder, tmp_path / f"copy-{i}")
        copy_s.append(time.perf_counter() - started)
        shutil.rmtree(tmp_path / f"cache-{i}")
        shutil.rmtree(tmp_path / f"copy-{i}")
    fetch, copy = min(fetch_s), min(copy_s)
    line = (
        f"{size / MiB:.0f} MiB artifact: S3 fetch (verified) {fetch:.2f} s = "
        f"{size / MiB / fetch:.0f} MiB/s | "
        f"local copy {copy:.2f} s = {size / MiB / copy:.0f} MiB/s | S3/local {fetch / copy:.1f}x "
        f"(best of {rounds})"
    )
    print(f"  {line}")
    record(line)


@pytest.fixture
def container(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CustomContainerProcess]:
    # It loads from inside the session's temporary folder: the artifact's and every cache's.
    process = CustomContainerProcess(
        tmp_path / "container", 1024 * MiB, model_store=tmp_path_factory.getbasetemp()
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_cold_load_from_s3_vs_file(
    artifact: tuple[Path, str, int],
    container: CustomContainerProcess,
    tmp_path: Path,
    record: Record,
    quick: bool,
) -> None:
    folder, uri, size = artifact
    rounds = 1 if quick else 3

    async def measure() -> tuple[float, float]:
        s3_s, file_s = [], []
        adapter = CustomAdapter(container.address)
        try:
            for i in range(rounds):
                # A new cache each round: cold, as on an agent that never fetched this artifact.
                fetching = FetchingAdapter(adapter, ArtifactCache(tmp_path / f"cache-{i}", model_store=STORE))
                model = ModelVersion(f"s3-{i}", "1", backend="custom", artifact_uri=uri)
                started = time.perf_counter()
                await fetching.load(model)
                s3_s.append(time.perf_counter() - started)
                await adapter.unload(model)
                local = ModelVersion(f"file-{i}", "1", backend="custom", artifact_uri=folder.as_uri())
                started = time.perf_counter()
                await adapter.load(local)
                file_s.append(time.perf_counter() - started)
                await adapter.unload(local)
        finally:
            await adapter.close()
        return min(s3_s), min(file_s)

    s3, file = asyncio.run(measure())
    line = (
        f"cold load into our container, {size / MiB:.0f} MiB artifact: from S3 {s3:.2f} s | "
        f"from file:// {file * 1e3:.0f} ms | difference {s3 - file:.2f} s (the fetch; best of {rounds})"
    )
    print(f"  {line}")
    record(line)
