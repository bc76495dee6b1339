"""Writing and loading a 100k-model shard map through each store (etcd's limits force batching).

Run: ./dev bench -k shard_map
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from modelyard.placement import registry
from modelyard.placement.store import open_store
from tests.conftest import EtcdServer, _wipe, etcd_server  # noqa: F401  (fixture)

MODELS = 100_000


def assignments(count: int) -> dict[str, list[str]]:
    return {f"customer-{i:06d}/model@1": [f"c{i % 2000:04d}", f"c{(i + 7) % 2000:04d}"] for i in range(count)}


@pytest.mark.parametrize("kind", ["embedded", "etcd"])
def test_write_and_load_a_100k_model_map(
    benchmark: BenchmarkFixture, kind: str, tmp_path: Path, request: pytest.FixtureRequest, quick: bool
) -> None:
    if kind == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        url = server.url
    else:
        url = str(tmp_path / "store")
    models = 1000 if quick else MODELS
    wanted = assignments(models)
    figures: dict[str, float] = {}

    async def round_trip() -> None:
        await _wipe(url)
        async with open_store(url) as store:
            start = time.perf_counter()
            await registry.write_shard_map(store, wanted, expected_generation=0)
            figures["write_s"] = time.perf_counter() - start
            start = time.perf_counter()
            fleet = await registry.load_fleet(store)
            figures["load_s"] = time.perf_counter() - start
        assert len(fleet.assignments) == models

    benchmark.pedantic(lambda: asyncio.run(round_trip()), rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 2) for k, v in figures.items()})
    print(f"\n{kind}: {models}-model map write {figures['write_s']:.2f} s, load {figures['load_s']:.2f} s")
