"""A 3-step pipeline through the router, against the same three calls made by the client one after another
(through the router), and against a Triton ensemble of the same steps in one Triton (the anchor).

The three steps are the `identity` python-backend model (INPUT -> OUTPUT, so every answer is checked),
chained X -> A -> B -> Y on one Triton, so the ensemble runs exactly the work the pipeline runs. The router
is `modelyard serve` in its own process; the load generator (benchmarks/loadgen.py) in another; the
targets' order rotates every repetition. Targets: the pipeline's p50 <= the client's sequential calls',
and its added latency over the ensemble <= 1 ms per step.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from benchmarks.conftest import Verdict
from benchmarks.test_router_hop import LoadGen, Target, _serve, p50, rotated, spread
from modelyard.containers.triton.adapter import triton_model_name
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from tests.conftest import require_triton, stop_process
from tests.fleet import FleetThread

STEPS = 3
PIPELINE = """
name: chain
version: "1"
inputs:  [{name: INPUT, datatype: FP32, shape: [-1]}]
outputs: [{name: OUTPUT, datatype: FP32, shape: [-1]}]
steps:
  - {name: one,   model: identity, inputs: {INPUT: INPUT}, outputs: {OUTPUT: A}}
  - {name: two,   model: identity, inputs: {INPUT: A},     outputs: {OUTPUT: B}}
  - {name: three, model: identity, inputs: {INPUT: B},     outputs: {OUTPUT: OUTPUT}}
"""
ENSEMBLE = "chain_ensemble"


def ensemble_config(step_model: str) -> str:
    """Triton's own ensemble of the same three steps (the models under their internal names)."""
    tensors = ["INPUT", "A", "B", "OUTPUT"]
    steps = ",\n".join(
        f'    {{ model_name: "{step_model}" model_version: -1 '
        f'input_map {{ key: "INPUT" value: "{tensors[i]}" }} '
        f'output_map {{ key: "OUTPUT" value: "{tensors[i + 1]}" }} }}'
        for i in range(STEPS)
    )
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        f"ensemble_scheduling {{\n  step [\n{steps}\n  ]\n}}\n"
    )


@dataclass
class Bench:
    router: Target
    triton: str
    step_model: str  # identity's public name (through the router)
    secret: str
    gen: LoadGen


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    require_triton()
    workdir = tmp_path_factory.mktemp("pipelines-bench")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)
    internal: dict[str, str] = {}

    async def setup(fleet: LocalFleet) -> None:
        models = [m for m in await fleet.start_store_and_models() if m.name == "identity"]
        internal["identity"] = triton_model_name("identity", models[0].version)
        await fleet.start_containers()
        await registry.write_shard_map(
            fleet.store, {m.key: ["triton-0"] for m in models}, expected_generation=0
        )
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    processes: list[subprocess.Popen[bytes]] = []
    gen: LoadGen | None = None
    try:
        thread.start(setup)
        triton = thread.fleet.tritons[0]
        secret = thread.fleet.fleet_secret
        # The anchor: the ensemble in the same Triton, loaded through its repository API.
        folder = triton.repository / ENSEMBLE
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(ensemble_config(internal["identity"]))
        with grpcclient.InferenceServerClient(triton.address) as client:
            client.load_model(ENSEMBLE, headers={FLEET_SECRET_HEADER: secret})
        spec = workdir / "chain.yaml"
        spec.write_text(PIPELINE)
        modelyard = str(Path(sys.executable).with_name("modelyard"))
        store = str(workdir / "store")
        done = subprocess.run(
            [modelyard, "pipelines", "register", str(spec), "--store", store],
            capture_output=True,
            text=True,
            timeout=60,
            env={"MODELYARD_MODEL_STORE": str(workdir / "artifacts"), "PATH": ""},
        )
        assert done.returncode == 0, done.stderr
        router = _serve(store, 1, processes, thread.fleet.write_fleet_secret())
        gen = LoadGen()
        yield Bench(router, triton.address, "identity", secret, gen)
    finally:
        if gen is not None:
            gen.stop()
        for process in processes:
            stop_process(process)
        thread.stop()


SIZES = {"16B": 16, "64KiB": 64 << 10, "1MiB": 1 << 20}


@pytest.mark.parametrize("size", list(SIZES))
def test_three_step_pipeline_latency(bench: Bench, size: str, quick: bool, verdict: Verdict) -> None:
    """p50 of one call: the router's pipeline, the client's three calls through the router, the ensemble."""
    repetitions, calls = (1, 2) if quick else (5, 100)
    names = ["ensemble", "pipeline", "sequential"]
    latencies: dict[str, list[float]] = {n: [] for n in names}
    per_rep: dict[str, list[float]] = {n: [] for n in names}
    for repetition in range(repetitions):
        for name in rotated(names, repetition):
            common = {"secret": bench.secret, "size_bytes": SIZES[size], "calls": calls}
            if name == "sequential":
                answer = bench.gen.run(
                    op="chain", address=bench.router.address, models=[bench.step_model] * STEPS, **common
                )
            else:
                answer = bench.gen.run(
                    op="unary",
                    address=bench.triton if name == "ensemble" else bench.router.address,
                    model=ENSEMBLE if name == "ensemble" else "chain",
                    concurrency=1,
                    client="triton",
                    **common,
                )
            latencies[name] += answer["latencies_s"]
            per_rep[name].append(p50(answer["latencies_s"]))
    print(f"\n{size}, {STEPS} identity steps, {repetitions} x {calls} calls per target (rotated): p50 ms")
    for name in names:
        print(f"  {name:<10} {spread(per_rep[name], 1e3)}")
    pipeline, sequential, ensemble = (p50(latencies[n]) for n in ("pipeline", "sequential", "ensemble"))
    verdict(
        f"pipeline {size} p50 vs the client's {STEPS} sequential calls",
        f"{pipeline * 1e3:.2f} ms vs {sequential * 1e3:.2f} ms ({pipeline / sequential:.2f}x)",
        "<= the client's sequential calls",
        pipeline <= sequential,
    )
    added = (pipeline - ensemble) / STEPS
    verdict(
        f"pipeline {size} added over the Triton ensemble, per step",
        f"{added * 1e3:+.2f} ms (pipeline {pipeline * 1e3:.2f} ms, ensemble {ensemble * 1e3:.2f} ms)",
        "<= 1 ms per step",
        added <= 1e-3,
    )
