"""What the router adds in front of a SageMaker container, side by side in one run (issue 17).

Two ways to call the same model (`sagemaker_scale`, OUTPUT = INPUT x 2) on one real multi-model-server:
- direct: a client of the contract, `POST /models/{name}/invoke` with application/x-npy over a keep-alive
  HTTP connection (what an application calling the container itself would do);
- router: a KServe v2 gRPC client (tritonclient) through modelyard's router, which converts the request
  to the same invoke (.npy header + the tensor's bytes), calls the container with its pooled aiohttp
  client, and converts the answer back.
Each runs in its own process (benchmarks/sagemaker_load.py), sequential calls, the order alternating per
repetition. Target: the router adds at most 2 ms at p50 (its ~0.5 ms Python hop, the protobuf <-> .npy
conversion and the HTTP call it makes). Client, router and container share this machine's CPUs.

Run: ./dev bench -k sagemaker -s      (quick: pytest benchmarks/test_sagemaker.py --quick -s)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelyard.containers.sagemaker.adapter import container_model_name
from modelyard.containers.sagemaker.archive import install_sagemaker_example
from modelyard.containers.sagemaker.process import SageMakerNotInstalled, java_binary, mms_home
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from tests.conftest import missing
from tests.fleet import FleetThread

HERE = Path(__file__).resolve().parent
TARGET_ADDED_MS = 2.0
Verdict = Callable[[str, str, str, bool], None]  # the `verdict` fixture (conftest.py)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetThread, ModelVersion]]:
    try:
        java_binary()
        mms_home()
    except SageMakerNotInstalled as exc:
        missing("multi-model-server / Java", str(exc))
    workdir = tmp_path_factory.mktemp("smbench") / "fleet"
    thread = FleetThread(workdir, str(workdir / "store"), containers=0)
    thread.fleet.custom_containers = 0
    thread.fleet.sagemaker_containers = 1
    model = install_sagemaker_example("sagemaker_scale", workdir / "artifacts")

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        fleet.supervise_containers()
        await fleet.wait_registered(120)
        fleet.start_controller()
        await fleet.start_router()
        await fleet.wait_ready([model], 120)

    try:
        thread.start(setup)
    except BaseException:
        thread.stop()
        raise
    yield thread, model
    thread.stop()


def _measure(mode: str, address: str, model: str, floats: int, calls: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, str(HERE / "sagemaker_load.py"), mode, address, model, str(floats), str(calls)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("size", "floats"), [("64 B", 16), ("64 KiB", 16384)])
def test_router_vs_direct_invoke_latency(
    fleet: tuple[FleetThread, ModelVersion], size: str, floats: int, quick: bool, verdict: Verdict
) -> None:
    thread, model = fleet
    container = thread.fleet.sagemakers[0]
    name = container_model_name(model.name, model.version)
    calls, repetitions = (20, 1) if quick else (400, 4)
    direct: list[dict[str, float]] = []
    routed: list[dict[str, float]] = []
    for repetition in range(repetitions):
        runs = [
            (direct, "direct", container.address, name),
            (routed, "router", thread.address, model.name),
        ]
        for into, mode, address, target in runs if repetition % 2 == 0 else runs[::-1]:
            into.append(_measure(mode, address, target, floats, calls))
    direct_p50 = statistics.median(r["p50_ms"] for r in direct)
    routed_p50 = statistics.median(r["p50_ms"] for r in routed)
    direct_p90 = statistics.median(r["p90_ms"] for r in direct)
    routed_p90 = statistics.median(r["p90_ms"] for r in routed)
    added = routed_p50 - direct_p50
    print(
        f"\n  {size}: direct invoke p50 {direct_p50:.2f} ms p90 {direct_p90:.2f} ms | "
        f"router p50 {routed_p50:.2f} ms p90 {routed_p90:.2f} ms ({repetitions} x {calls} calls each)"
    )
    verdict(
        f"router -> SageMaker {size}, added p50",
        f"+{added:.2f} ms ({direct_p50:.2f} direct vs {routed_p50:.2f} ms routed, p90 "
        f"{direct_p90:.2f} vs {routed_p90:.2f})",
        f"<= +{TARGET_ADDED_MS:.1f} ms",
        added <= TARGET_ADDED_MS,
    )
