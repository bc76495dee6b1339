"""What the router's hop costs: the same call direct to Triton and through the router, alternated in one run.

Run: ./dev bench -k router_hop   (figures land in the table printed at the end and in extra_info)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from modelyard.local import LocalFleet
from placement import registry
from tests.conftest import require_triton
from tests.fleet import FleetThread

ROUNDS = 300


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("hop")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)

    async def setup(fleet: LocalFleet) -> None:
        models = await fleet.start_store_and_models()
        await fleet.start_containers()
        await registry.write_shard_map(
            fleet.store, {m.key: ["triton-0"] for m in models}, expected_generation=0
        )
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


@pytest.mark.parametrize("size_bytes", [4096, 1 << 20], ids=["4KiB", "1MiB"])
def test_router_hop_vs_direct_triton(benchmark, fleet: FleetThread, size_bytes: int) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).random(size_bytes // 4, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", [x.size], "FP32")
    tensor.set_data_from_numpy(x)
    direct = grpcclient.InferenceServerClient(fleet.fleet.tritons[0].address)
    routed = grpcclient.InferenceServerClient(fleet.address)
    samples: dict[str, list[float]] = {"direct": [], "router": []}
    for client in (direct, routed):  # warm up both paths
        for _ in range(20):
            client.infer("identity", [tensor])
    for _ in range(ROUNDS):  # alternate so both see the same machine state
        for name, client in (("direct", direct), ("router", routed)):
            start = time.perf_counter()
            result = client.infer("identity", [tensor])
            samples[name].append(time.perf_counter() - start)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), x)
    benchmark.pedantic(routed.infer, args=("identity", [tensor]), rounds=50, iterations=1)
    direct_us, router_us = p50_us(samples["direct"]), p50_us(samples["router"])
    benchmark.extra_info.update(
        direct_p50_us=round(direct_us),
        router_p50_us=round(router_us),
        added_p50_us=round(router_us - direct_us),
        ratio=round(router_us / direct_us, 2),
    )
    print(
        f"\n{size_bytes} B identity: direct p50 {direct_us:.0f} us, router p50 {router_us:.0f} us, "
        f"+{router_us - direct_us:.0f} us ({router_us / direct_us:.2f}x)"
    )
    direct.close()
    routed.close()
