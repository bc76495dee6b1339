"""5,000 models imported into a live fleet of our containers with one `modelyard models import`, answering
through the router (per tenant) while a warm model keeps answering; a killed container's copies come back.

The callers run in their own processes (`python -m tests.test_five_thousand_models warm|calls ...`), so
their client work does not share the fleet's interpreter.
"""

from __future__ import annotations

import json
import random
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelyard.placement import registry
from tests.fleet import FleetThread, start_custom_fleet
from tests.test_lazy_load import scale_model
from tests.test_registration_races import scale_archive

COUNT = 5000
ARCHIVES = 10  # models share archives: model i scales by factor(i)
CONTAINERS = 4
PRIVATE = "acme"  # every tenth model is private to this tenant
OTHER = "globex"
WARM_FACTOR = 3.0
# A stall is the warm model's calls held up by the import's work (a loop blocked per registration, a load
# queued ahead of a loaded model): it shows in every call while it lasts, so in the p99 as much as in the
# slowest call. The bounds leave room for a loaded CI machine: over four runs on 2 shared CPUs the p99 was
# 110-370 ms and the slowest call 0.4-2.2 s (over 1 s only while the load average was above 10, where the
# scheduler alone holds a process that long); each bound is above twice the worst seen.
WARM_P99_MAX_S = 1.0
WARM_MAX_S = 5.0
X = [1.0, 2.0, -4.0]


def factor(i: int) -> float:
    return float(i % ARCHIVES + 1)


def is_private(i: int) -> bool:
    return i % 10 == 3


def name(i: int) -> str:
    return f"m{i:05d}"


# -- the callers, each in its own process -------------------------------------------------------------------


def _infer(client: Any, model: str, tenant: str | None, timeout_s: float) -> Any:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("INPUT", [len(X)], "FP32")
    tensor.set_data_from_numpy(np.array(X, dtype=np.float32))
    headers = {"x-tenant-id": tenant} if tenant else None
    return client.infer(model, [tensor], headers=headers, client_timeout=timeout_s).as_numpy("OUTPUT")


def warm_main(address: str, stop_file: str) -> None:
    """Calls the warm model every 5 ms until `stop_file` exists; prints "ready", then its figures (JSON)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    latencies_s: list[float] = []
    errors: list[str] = []
    expected = np.array(X, dtype=np.float32) * WARM_FACTOR
    with grpcclient.InferenceServerClient(address) as client:
        while not Path(stop_file).exists():
            started = time.perf_counter()
            try:
                out = _infer(client, "warm", None, 10)
                latencies_s.append(time.perf_counter() - started)
                if not np.allclose(out, expected):
                    errors.append(f"wrong answer {out}")
            except InferenceServerException as exc:
                errors.append(f"{exc.status()}: {exc.message()}")
            if len(latencies_s) == 1:
                print("ready", flush=True)
            time.sleep(0.005)  # a steady trickle, not a load test
    print(json.dumps({"latencies_s": latencies_s, "errors": errors}), flush=True)


def calls_main(address: str) -> None:
    """Reads [[model, tenant or null, factor or null (NOT_FOUND expected)], ...] from stdin and prints
    the failures (JSON), calling from 4 threads."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    wanted = json.load(sys.stdin)

    def run(chunk: list[list[Any]]) -> list[str]:
        failures = []
        with grpcclient.InferenceServerClient(address) as client:
            for model, tenant, scale in chunk:
                try:
                    out = _infer(client, model, tenant, 60)
                except InferenceServerException as exc:
                    if scale is not None or exc.status() != "StatusCode.NOT_FOUND":
                        failures.append(f"{model} as {tenant}: {exc.status()}: {exc.message()}")
                    continue
                if scale is None:
                    failures.append(f"{model} as {tenant}: answered, expected NOT_FOUND")
                elif not np.allclose(out, np.array(X, dtype=np.float32) * scale):
                    failures.append(f"{model} as {tenant}: {out}, expected x * {scale}")
        return failures

    with ThreadPoolExecutor(4) as pool:
        failures = [f for chunk in pool.map(run, [wanted[k::4] for k in range(4)]) for f in chunk]
    print(json.dumps(failures), flush=True)


def _this_module(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_five_thousand_models", *args],
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        **kwargs,
    )


def call_through_router(address: str, wanted: Sequence[tuple[str, str | None, float | None]]) -> list[str]:
    """Makes the calls from a separate process; returns the failures."""
    process = _this_module("calls", address, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        out, _ = process.communicate(json.dumps(wanted), timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, out
    failures: list[str] = json.loads(out.strip().splitlines()[-1])
    return failures


class WarmCaller:
    """The warm-model caller process: started, waited for its first answer, stopped for its figures."""

    def __init__(self, address: str, folder: Path) -> None:
        self.stop_file = folder / "stop-warm"
        self.figures: dict[str, Any] | None = None
        self.process = _this_module("warm", address, str(self.stop_file), stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        assert ready and self.process.stdout.readline().strip() == "ready", "the warm caller never answered"

    def stop(self) -> dict[str, Any]:
        """Its figures: {"latencies_s": [...], "errors": [...]} (stopped once; later calls repeat them)."""
        if self.figures is None:
            self.stop_file.touch()
            try:
                out, _ = self.process.communicate(timeout=30)
            finally:
                self.process.kill()
            self.figures = json.loads(out.strip().splitlines()[-1])
        return self.figures


# -- the fleet -----------------------------------------------------------------------------------------------


@dataclass
class Imported:
    fleet: FleetThread
    warm: WarmCaller
    import_s: float
    all_ready_s: float


def write_catalog(folder: Path) -> Path:
    """COUNT lines over ARCHIVES archives; every tenth model private to PRIVATE."""
    for k in range(ARCHIVES):
        scale_archive(folder / "archives", float(k + 1))
    lines = []
    for i in range(COUNT):
        entry: dict[str, Any] = {
            "name": name(i),
            "version": "1",
            "archive": f"archives/scale-{factor(i)}.tgz",
        }
        if is_private(i):
            entry["tenants"] = [PRIVATE]
        lines.append(json.dumps(entry))
    path = folder / "models.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until(condition: Any, ceiling_s: float, what: str) -> float:
    """Polls `condition()` (every 0.2 s) until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < ceiling_s, f"{what} not within {ceiling_s:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - started


def ready_count(fleet: FleetThread) -> int:
    async def count() -> int:
        router = fleet.fleet.router
        assert router is not None
        table = router.router.table
        return sum(1 for i in range(COUNT) if table.ready_copies(f"{name(i)}@1"))

    return fleet.call(count())


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    """CONTAINERS of our containers, the controller and the router with a warm model answering, then
    COUNT models imported by `modelyard models import` while the warm caller calls."""
    root = tmp_path_factory.mktemp("five-thousand")
    warm_model = scale_model(root / "warm", "warm", WARM_FACTOR)
    fleet = start_custom_fleet(root / "fleet", [warm_model], containers=CONTAINERS)
    warm: WarmCaller | None = None
    try:
        warm = WarmCaller(fleet.address, root)
        catalog = write_catalog(root / "catalog")
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "modelyard", "models", "import", str(catalog),
             "--store", fleet.fleet.store_url, "--model-store", str(root / "artifacts")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        import_s = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert f"imported {COUNT}, skipped 0, failed 0" in result.stdout, result.stdout
        router = fleet.fleet.router
        assert router is not None
        table = router.router.table
        wait_until(lambda: len(table.fleet.models) == COUNT + 1, 30, "the router seeing every registration")
        yield Imported(fleet, warm, import_s, time.monotonic() - started)
    finally:
        if warm is not None:
            warm.stop()
        fleet.stop()


def test_random_models_of_5000_imported_answer_per_tenant_while_a_warm_model_never_stalls(
    imported: Imported,
) -> None:
    fleet = imported.fleet
    rng = random.Random(10)

    def sample(k: int) -> list[tuple[str, str | None, float | None]]:
        wanted: list[tuple[str, str | None, float | None]] = []
        for i in rng.sample(range(COUNT), k):
            if is_private(i):  # the owner gets an answer, another tenant and no tenant get NOT_FOUND
                wanted += [(name(i), PRIVATE, factor(i)), (name(i), OTHER, None), (name(i), None, None)]
            else:
                wanted.append((name(i), rng.choice([PRIVATE, OTHER, None]), factor(i)))
        return wanted

    # Called at once: most of these are still being loaded (the calls wait for their copies).
    started = time.monotonic()
    assert call_through_router(fleet.address, sample(300)) == []
    first_s = time.monotonic() - started
    ready_s = wait_until(lambda: ready_count(fleet) == COUNT, 120, f"all {COUNT} models ready")
    all_ready_s = imported.all_ready_s + first_s + ready_s
    started = time.monotonic()
    assert call_through_router(fleet.address, sample(1000)) == []
    warm_calls_s = time.monotonic() - started
    figures = imported.warm.stop()
    latencies_ms = sorted(1000 * s for s in figures["latencies_s"])
    p50, p99 = statistics.quantiles(latencies_ms, n=100)[49], statistics.quantiles(latencies_ms, n=100)[98]
    print(
        f"\n{COUNT} models: import {imported.import_s:.1f} s, all ready {all_ready_s:.1f} s after the import "
        f"began; 300 calls while loading {first_s:.1f} s, 1000 warm calls {warm_calls_s:.1f} s; warm model "
        f"{len(latencies_ms)} calls p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies_ms[-1]:.0f} ms"
    )
    assert figures["errors"] == []
    assert p99 < WARM_P99_MAX_S * 1000, f"the warm model stalled: p99 {p99:.0f} ms"
    assert latencies_ms[-1] < WARM_MAX_S * 1000, f"the warm model stalled: {latencies_ms[-1]:.0f} ms"
    copies = {a.container.id: len(a.loaded) for a in fleet.fleet.agents}
    assert sum(copies.values()) == COUNT + 1
    assert all(n > COUNT / CONTAINERS / 2 for n in copies.values()), copies  # spread over every container


def test_killing_a_container_gets_its_copies_replaced_and_answering(imported: Imported) -> None:
    fleet = imported.fleet
    agents = fleet.fleet.agents
    victim = next(a for a in agents if "warm@1" not in a.loaded)
    moved = sorted(k for k in victim.loaded if k.startswith("m"))
    assert len(moved) > COUNT / CONTAINERS / 2
    process = fleet.fleet.customs[agents.index(victim)].process
    assert process is not None
    process.kill()
    cid = victim.container.id

    async def replaced() -> bool:
        router = fleet.fleet.router
        assert router is not None
        table = router.router.table
        return all((copies := table.ready_copies(key)) and all(c.id != cid for c in copies) for key in moved)

    took_s = wait_until(lambda: fleet.call(replaced()), 120, f"{len(moved)} copies of {cid} ready elsewhere")
    print(f"\n{len(moved)} copies of the killed {cid} ready elsewhere {took_s:.1f} s after the kill")

    async def assigned_to_victim() -> int:
        fleet_now = await registry.load_fleet(fleet.fleet.store)
        return sum(1 for ids in fleet_now.assignments.values() if cid in ids)

    assert fleet.call(assigned_to_victim()) == 0
    wanted = [(key.partition("@")[0], PRIVATE, factor(int(key[1:6]))) for key in moved]
    assert call_through_router(fleet.address, wanted) == []


if __name__ == "__main__":
    if sys.argv[1] == "warm":
        warm_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "calls":
        calls_main(sys.argv[2])
    else:
        raise SystemExit(f"unknown caller {sys.argv[1]!r}")
