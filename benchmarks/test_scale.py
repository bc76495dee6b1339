"""The control path at 1k, 10k and 100k registered model versions (issue 10): full reconcile, one incremental
placement, `placement show` and `models list` (issue 30: <= 2 s each at 100k, on etcd and on the embedded
store, read from the controller's summary and one page), etcd's size per model version, a map change
reaching a router, router RSS, controller RSS (issue 30: <= 500 MiB at 100k, after a full reconcile),
router loop lag while 10k models' events arrive, and cold-call latency on a live fleet of our containers.

Run: ./dev bench -k scale (--quick or MODELYARD_BENCH_QUICK=1: 1k only). 1k runs on the embedded store,
10k and 100k on etcd. Each judged figure is printed with its target and PASS / FALLS SHORT; nothing is
asserted about speed.

A "fleet of N" in the store: N custom-backend model versions (4 KiB each), N/50 containers (at least 4),
the shard map the planner gives them (one copy each) and a ready copy state per copy, written through the
registry like agents and the controller write them. The containers are store entries, not processes,
except in the cold-call benchmark, which runs our container: every other figure says "stand-in agents".
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.containers.triton.server import free_port
from modelyard.memory import freeze_long_lived_objects
from modelyard.metric_names import RECONCILE
from modelyard.placement import registry
from modelyard.placement.controller import PlacementController
from modelyard.placement.follow import StoreFollower
from modelyard.placement.mapwriter import MapWriter, RebalanceInProgress
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.rebalance import plan_rebalance
from modelyard.placement.store import Store, open_store
from modelyard.placement.summary import SUMMARY
from modelyard.router.server import RouterServer
from tests.conftest import EtcdServer, _wipe, etcd_server  # noqa: F401  (fixture)
from tests.fleet import start_custom_fleet
from tests.test_lazy_load import scale_model

T = TypeVar("T")
Record = Callable[[str], None]
SIZES = [1_000, 10_000, 100_000]
Verdict = Callable[[str, str, str, bool], None]
MODEL_BYTES = 4096
CHUNK = 1024  # puts per store.apply call while populating (the stores batch them into transactions)


def label(n: int) -> str:
    return f"{n // 1000}k"


STAND_INS = "stand-in agents"  # shown with every figure whose containers are store entries, not processes


def model_name(i: int) -> str:
    return f"m{i:06d}"


# -- a fleet of N in a store ---------------------------------------------------------------------------------


@dataclass
class Scene:
    size: int
    url: str
    store_kind: str
    containers: int
    populate_s: float


async def _put_all(store: Store, puts: dict[str, bytes]) -> None:
    items = list(puts.items())
    for start in range(0, len(items), CHUNK):
        await store.apply(dict(items[start : start + CHUNK]))


async def populate(
    url: str,
    size: int,
    artifact_uri: str = "file:///nonexistent",
    *,
    placed: bool = True,
    registered: bool = False,
) -> int:
    """Registers `size` models (unless `registered` already) and (`placed`) size/50 containers, the
    planner's map and ready copy states."""
    count = max(4, size // 50)
    async with open_store(url) as store:
        models = [
            ModelVersion(
                model_name(i), "1", backend="custom", memory_bytes=MODEL_BYTES, artifact_uri=artifact_uri
            )
            for i in range(size)
        ]
        containers = [
            Container(f"c{j:04d}", f"127.0.0.1:{10000 + j}", memory_bytes=1024**3, backend="custom")
            for j in range(count)
        ]
        if not registered:
            await _put_all(store, {registry.MODELS + m.key: m.to_json() for m in models})
        if not placed:
            return 0
        await _put_all(store, {registry.CONTAINERS + c.id: c.to_json() for c in containers})
        fleet = await registry.load_fleet(store)
        proposal = plan_rebalance(fleet)
        await registry.write_shard_map(store, proposal.after, base=fleet)
        ready = CopyState("ready", measured_bytes=MODEL_BYTES).to_json()
        await _put_all(
            store, {registry.state_key(cid, key): ready for key, ids in proposal.after.items() for cid in ids}
        )
    return count


def store_url_for(size: int, tmp: Path, request: pytest.FixtureRequest) -> tuple[str, str]:
    """The embedded store for 1k, etcd (emptied) for more; quick mode runs 1k only."""
    if size > 1_000 and request.getfixturevalue("quick"):
        pytest.skip("quick mode: 1k only")
    if size <= 1_000:
        return str(tmp / "store"), "embedded"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    asyncio.run(_wipe(server.url))
    return server.url, "etcd"


@pytest.fixture(scope="module", params=SIZES, ids=label)
def scene(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    size: int = request.param
    url, kind = store_url_for(size, tmp_path_factory.mktemp(f"scale-{label(size)}"), request)
    started = time.perf_counter()
    containers = asyncio.run(populate(url, size))
    populated_s = time.perf_counter() - started
    print(f"\n{label(size)} models on {kind}: fleet written in {populated_s:.1f} s")
    yield Scene(size, url, kind, containers, populated_s)
    if kind == "etcd":
        asyncio.run(_wipe(url))


async def _followed(store: Store, name: str) -> StoreFollower:
    follower = StoreFollower(store, name=name)
    follower.start()
    await follower.loaded.wait()
    return follower


async def _until(follower: StoreFollower, condition: Callable[[], bool], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        seen = follower.version
        if condition():
            return
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"{follower.name}: condition not met within {timeout_s:.0f} s")
        await follower.wait_changed(left, seen)


def _assigned(follower: StoreFollower, key: str, ids: tuple[str, ...] | None = None) -> Callable[[], bool]:
    """A condition: `key` assigned in `follower`'s view (to exactly `ids`, if given)."""

    def check() -> bool:
        assigned = follower.fleet.assignments.get(key)
        return assigned is not None and (ids is None or assigned == ids)

    return check


def _one_round(benchmark: Any, figures: dict[str, Any]) -> None:
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)


# -- controller ----------------------------------------------------------------------------------------------


def test_controller_full_reconcile(benchmark: Any, scene: Scene, record: Record, verdict: Verdict) -> None:
    """A reconcile with nothing to move (the planning pass), then one after a container joined: plan,
    staged union map, copies ready (their states are written before, as infinitely fast agents would),
    final map."""
    figures: dict[str, float] = {}

    async def run() -> None:
        async with open_store(scene.url) as store:
            controller = PlacementController(store)
            controller.follower.start()
            await controller.follower.loaded.wait()
            try:
                started = time.perf_counter()
                moved = await controller.reconcile()
                figures["noop_s"] = time.perf_counter() - started
                assert not moved
                joined = Container("c-joined", "127.0.0.1:9", memory_bytes=1024**3, backend="custom")
                await registry.register_container(store, joined)
                await _until(
                    controller.follower, lambda: joined.id in controller.follower.fleet.containers, 60
                )
                proposal = plan_rebalance(controller.follower.fleet)
                ready = CopyState("ready", measured_bytes=MODEL_BYTES).to_json()
                await _put_all(
                    store,
                    {registry.state_key(m.target, m.model): ready for m in proposal.moves if m.target},
                )
                figures["moves"] = len(proposal.moves)
                started = time.perf_counter()
                moved = await controller.reconcile()
                figures["join_s"] = time.perf_counter() - started
                assert moved
            finally:
                await controller.follower.stop()

    asyncio.run(run())
    target_s = 1.0 if scene.size <= 10_000 else 3.0  # issue 30: <= 3 s at 100k
    judged = scene.size in (10_000, 100_000)
    record(
        f"{label(scene.size)} ({scene.store_kind}, {scene.containers} containers, {STAND_INS}): "
        f"nothing to move {figures['noop_s']:.2f} s; container joined, {figures['moves']:.0f} moves "
        f"{figures['join_s']:.2f} s; per 1k models {1000 * figures['join_s'] / scene.size:.3f} s"
    )
    if judged:
        verdict(
            f"{label(scene.size)} full reconcile after a join ({scene.store_kind}, {STAND_INS})",
            f"{figures['join_s']:.2f} s",
            f"<= {target_s:.0f} s",
            figures["join_s"] <= target_s,
        )
    _one_round(benchmark, {k: round(v, 3) for k, v in figures.items()})


def test_one_incremental_placement(benchmark: Any, scene: Scene, record: Record) -> None:
    """A running, leading controller: one model registered -> its assignment in the controller's view."""
    took_s: list[float] = []

    async def run() -> None:
        async with open_store(scene.url) as store:
            controller = PlacementController(store, debounce_s=0.1)
            task = asyncio.create_task(controller.run())
            try:
                await asyncio.wait_for(controller.leading.wait(), 60)
                follower = controller.follower
                # Its first full pass (nothing to move) must be over: it would delay the placements.
                deadline = time.monotonic() + 300
                await asyncio.sleep(controller.debounce_s)
                while controller._full.is_set() or controller.writer._depth:
                    assert time.monotonic() < deadline, "the controller's first full pass did not end"
                    await asyncio.sleep(0.05)
                for k in range(7):
                    model = ModelVersion(
                        f"new-{time.time_ns()}-{k}", "1", backend="custom", memory_bytes=MODEL_BYTES
                    )
                    started = time.perf_counter()
                    await registry.register_model(store, model)
                    await _until(follower, _assigned(follower, model.key), 60)
                    took_s.append(time.perf_counter() - started)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    record(
        f"{label(scene.size)} ({scene.store_kind}, {STAND_INS}): registered -> assigned median "
        f"{1000 * statistics.median(took_s):.0f} ms, max {1000 * max(took_s):.0f} ms ({len(took_s)} models; "
        "includes the store's watch delivering both events)"
    )
    _one_round(benchmark, {"median_ms": round(1000 * statistics.median(took_s), 1)})


# -- etcd's size -----------------------------------------------------------------------------------------


def test_etcd_bytes_per_model_version(benchmark: Any, record: Record, tmp_path: Path, quick: bool) -> None:
    """A fresh etcd of its own (so no earlier test's history counts): its database size (dbSize, what
    --quota-backend-bytes limits; `etcdctl endpoint status`) empty, after N registrations, and after the
    fleet of N is placed and its copies reported ready (map + copy states: 3 keys per version)."""
    size = 1_000 if quick else 100_000
    server = EtcdServer(tmp_path)
    try:
        server.start()

        async def db_bytes() -> int:
            # etcd commits its backend every 100 ms (--backend-batch-interval): dbSize shows writes after.
            await asyncio.sleep(1.0)
            async with open_store(server.url) as store:
                space = await store.space()
                assert space is not None
                return space.db_bytes

        empty = asyncio.run(db_bytes())
        asyncio.run(populate(server.url, size, placed=False))
        registered = asyncio.run(db_bytes())
        asyncio.run(populate(server.url, size, registered=True))
        placed = asyncio.run(db_bytes())
    finally:
        server.stop()
    per_version = (registered - empty) / size
    per_placed = (placed - empty) / size
    mib = 1024**2
    record(
        f"{label(size)} on etcd: {size} registrations {registered / mib:.1f} MiB "
        f"({per_version:.0f} bytes per model version; value {len(_bench_model(0).to_json())} bytes); "
        f"placed and ready (map, copy states, {max(4, size // 50)} containers) {placed / mib:.1f} MiB "
        f"({per_placed:.0f} bytes per version); empty {empty / mib:.2f} MiB"
    )
    if size == 100_000:
        # etcd's default quota is 2 GiB; deploy/k8s/etcd.yaml sets 8 GiB.
        record(
            f"100k fleet: {100 * placed / (2 * 1024**3):.1f}% of etcd's default 2 GiB quota, "
            f"{100 * placed / (8 * 1024**3):.1f}% of deploy/'s 8 GiB (before any history: each rewrite of a "
            "key adds its new value until compaction)"
        )
    _one_round(
        benchmark, {"bytes_per_version": round(per_version), "placed_bytes_per_version": round(per_placed)}
    )


def _bench_model(i: int) -> ModelVersion:
    return ModelVersion(
        model_name(i), "1", backend="custom", memory_bytes=MODEL_BYTES, artifact_uri="file:///nonexistent"
    )


# -- CLI and routers -----------------------------------------------------------------------------------------


def modelyard() -> str:
    return str(Path(sys.executable).with_name("modelyard"))


CLI_TARGET_S = 2.0  # issue 30: placement show and models list at 100k, each as a whole process


async def write_summary(url: str) -> float:
    """What a running fleet has: a leading controller that wrote the fleet summary; returns the seconds that
    took (the controller loads the fleet, leads, then summarizes). The controller is stopped after."""
    async with open_store(url) as store:
        await store.delete(SUMMARY)
        controller = PlacementController(store, summary_every_s=0.1)
        task = asyncio.create_task(controller.run())
        started = time.perf_counter()
        try:
            async with asyncio.timeout(600):
                # The summary is only in the store: nothing in this process signals its write.
                while await store.get(SUMMARY) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return time.perf_counter() - started


def time_command(*args: str, runs: int = 3) -> tuple[list[float], str]:
    """Seconds of each run of `modelyard ARGS` as a user runs it (the whole process), and the last output."""
    took_s = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run([modelyard(), *args], capture_output=True, text=True, timeout=600)
        took_s.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
    return took_s, result.stdout


def judge_cli_views(
    scene_size: int, url: str, kind: str, record: Record, verdict: Verdict
) -> dict[str, float]:
    """`placement show` and `models list` by default (the controller's summary, one page), 3 runs each,
    judged at 100k; then each once without a summary / with --all (the whole fleet read), recorded."""
    summary_s = asyncio.run(write_summary(url))
    figures: dict[str, float] = {"summary_written_s": summary_s}
    for name, args in (
        ("placement show", ("placement", "show", "--store", url)),
        ("models list", ("models", "list", "--store", url)),
    ):
        took_s, out = time_command(*args)
        figures[name] = max(took_s)
        record(
            f"{label(scene_size)} ({kind}): {name} {min(took_s):.2f}-{max(took_s):.2f} s "
            f"({len(out.splitlines())} lines of output; the controller's summary was written "
            f"{summary_s:.1f} s after it started)"
        )
        if scene_size == 100_000:
            verdict(
                f"100k {name} ({kind}), whole process, slowest of 3",
                f"{max(took_s):.2f} s",
                f"<= {CLI_TARGET_S:.0f} s",
                max(took_s) <= CLI_TARGET_S,
            )
    full_s, out = time_command("models", "list", "--store", url, "--all", runs=1)
    record(
        f"{label(scene_size)} ({kind}, {STAND_INS}): models list --all (every version, whole fleet read) "
        f"{full_s[0]:.2f} s"
    )
    asyncio.run(_delete(url, SUMMARY))
    show_s, out = time_command("placement", "show", "--store", url, runs=1)
    record(
        f"{label(scene_size)} ({kind}): placement show with no controller summary (computed from a full "
        f"read) {show_s[0]:.2f} s"
    )
    return figures


async def _delete(url: str, key: str) -> None:
    async with open_store(url) as store:
        await store.delete(key)


def test_placement_show_and_models_list(
    benchmark: Any, scene: Scene, record: Record, verdict: Verdict
) -> None:
    """`modelyard placement show` and `modelyard models list` as a user runs them (whole processes)."""
    figures = judge_cli_views(scene.size, scene.url, scene.store_kind, record, verdict)
    _one_round(benchmark, {k.replace(" ", "_"): round(v, 3) for k, v in figures.items()})


@pytest.fixture(scope="module")
def embedded_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    """100k (quick: 1k) on the embedded store, for the CLI views: the other benchmarks run 100k on etcd."""
    size = 1_000 if request.getfixturevalue("quick") else 100_000
    url = str(tmp_path_factory.mktemp("scale-embedded") / "store")
    started = time.perf_counter()
    containers = asyncio.run(populate(url, size))
    return Scene(size, url, "embedded", containers, time.perf_counter() - started)


def test_placement_show_and_models_list_on_the_embedded_store(
    benchmark: Any, embedded_fleet: Scene, record: Record, verdict: Verdict
) -> None:
    scene = embedded_fleet
    figures = judge_cli_views(scene.size, scene.url, scene.store_kind, record, verdict)
    _one_round(benchmark, {k.replace(" ", "_"): round(v, 3) for k, v in figures.items()})


def test_map_change_visible_to_router(benchmark: Any, scene: Scene, record: Record) -> None:
    """One assignment written through the map writer -> seen in a router's routing table."""
    took_s: list[float] = []
    lock_wait_s: list[float] = []

    async def run() -> None:
        async with open_store(scene.url) as store:
            router = RouterServer(store, port=free_port())
            await router.start()
            writer_view = await _followed(store, "bench writer")
            try:
                table = router.router.table
                await _until(router.router.follower, lambda: table.loaded, 120)
                writer = MapWriter(store, writer_view, "scale benchmark")
                # A controller stopped by an earlier benchmark may have left the lock until its lease
                # expires (see the report of issue 10); the figure is the write, not that wait.
                waited = time.perf_counter()
                while True:
                    try:
                        async with writer.locked():
                            break
                    except RebalanceInProgress:
                        assert time.perf_counter() - waited < 60, "the map writer's lock stayed held"
                        await asyncio.sleep(0.2)
                lock_wait_s.append(time.perf_counter() - waited)
                for k in range(7):
                    key = f"{model_name(k)}@1"
                    current = writer_view.fleet.assignments.get(key, ())
                    target = next(c for c in sorted(writer_view.fleet.containers) if c not in current)
                    started = time.perf_counter()
                    async with writer.locked():
                        await writer.update({key: (target,)})
                    await _until(
                        router.router.follower,
                        _assigned(router.router.follower, key, (target,)),
                        60,
                    )
                    took_s.append(time.perf_counter() - started)
            finally:
                await writer_view.stop()
                await router.stop()

    asyncio.run(run())
    record(
        f"{label(scene.size)} ({scene.store_kind}, {STAND_INS}): write -> in the router's table median "
        f"{1000 * statistics.median(took_s):.0f} ms, max {1000 * max(took_s):.0f} ms (lock, CAS write, watch)"
        + (f"; waited {lock_wait_s[0]:.1f} s for a stale lock first" if lock_wait_s[0] > 0.5 else "")
    )
    _one_round(benchmark, {"median_ms": round(1000 * statistics.median(took_s), 1)})


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def serve_rss(url: str) -> int:
    """RSS of a `modelyard serve` process once its routing table is loaded (health SERVING) and settled."""
    port = free_port()
    process = subprocess.Popen(
        [modelyard(), "serve", "--store", url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.poll() is None, "modelyard serve exited"
                assert time.monotonic() < deadline, "modelyard serve never became SERVING"
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        return settled_rss(process.pid)
    finally:
        _stop(process)


def settled_rss(pid: int) -> int:
    """A process's RSS once two reads 0.5 s apart are within 1 % of each other."""
    last = rss_bytes(pid)
    while True:
        time.sleep(0.5)
        now = rss_bytes(pid)
        if abs(now - last) <= last / 100:
            return now
        last = now


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


RSS_TARGET_MIB = 250  # issue 30: a router holding 100k registered model versions


def _report_rss(
    benchmark: Any,
    scene: Scene,
    record: Record,
    verdict: Verdict,
    what: str,
    command: str,
    rss_of: Callable[[str], int],
    target_mib: int,
    empty_store: Path,
) -> None:
    """`command`'s RSS against an empty store, then against the fleet of N: RSS and RSS per 10k models,
    judged against `target_mib` at 100k."""
    empty = rss_of(str(empty_store))
    full = rss_of(scene.url)
    per_10k = (full - empty) * 10_000 / scene.size
    mib = 1024**2
    figure = (
        f"{full / mib:.0f} MiB (empty store {empty / mib:.0f} MiB), {per_10k / mib:.1f} MiB per 10k models"
    )
    line = f"{label(scene.size)} ({scene.store_kind}, {STAND_INS}): {figure}"
    if scene.size == 100_000:
        verdict(
            f"100k {what} ({command}, {STAND_INS})", figure, f"<= {target_mib} MiB", full <= target_mib * mib
        )
    else:
        print(f"  {line}")
    record(line)
    _one_round(benchmark, {"rss_mib": round(full / mib, 1), "per_10k_mib": round(per_10k / mib, 2)})


def test_router_rss(benchmark: Any, scene: Scene, record: Record, verdict: Verdict, tmp_path: Path) -> None:
    """`modelyard serve` against an empty store, then against the fleet of N: RSS and RSS per 10k."""
    _report_rss(
        benchmark, scene, record, verdict, "router RSS", "modelyard serve", serve_rss, RSS_TARGET_MIB,
        tmp_path / "empty-store",
    )  # fmt: skip


def full_reconciles(metrics: str) -> int:
    """How many full reconciles a controller's /metrics text counts (its reconcile histogram)."""
    count = 0.0
    for line in metrics.splitlines():
        if line.startswith(RECONCILE + "_count{") and 'pass="full"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return int(count)


def controller_rss(url: str) -> int:
    """RSS of a `modelyard controller` process (as deploy/k8s/controller.yaml runs it, metrics on) once it
    loaded the fleet, leads and finished its first full reconcile (counted on its /metrics), settled."""
    port = free_port()
    process = subprocess.Popen(
        [modelyard(), "controller", "--store", url, "--metrics-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, "modelyard controller exited"
            assert time.monotonic() < deadline, "modelyard controller finished no full reconcile"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    if full_reconciles(response.read().decode()) >= 1:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        return settled_rss(process.pid)
    finally:
        _stop(process)


CONTROLLER_RSS_TARGET_MIB = 500  # issue 30: a placement controller holding 100k registered model versions


def test_controller_rss(
    benchmark: Any, scene: Scene, record: Record, verdict: Verdict, tmp_path: Path
) -> None:
    """`modelyard controller` against an empty store, then against the fleet of N after its first full
    reconcile: RSS and RSS per 10k."""
    _report_rss(
        benchmark, scene, record, verdict, "controller RSS", "modelyard controller", controller_rss,
        CONTROLLER_RSS_TARGET_MIB, tmp_path / "empty-store",
    )  # fmt: skip


class LoopThread:
    """An event loop on its own thread, as a router process has."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _write_fleet_process(url: str, size: int) -> None:
    """In its own process: a fleet of `size` written into the store (the events a router then receives)."""
    asyncio.run(populate(url, size))


@pytest.mark.parametrize("size", [1_000, 10_000], ids=label)
def test_router_loop_lag_while_events_arrive(
    benchmark: Any,
    size: int,
    record: Record,
    verdict: Verdict,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A RouterServer on its own loop thread, following an empty store, while another process registers N
    models, writes their map and their ready states; a task that sleeps 1 ms in a loop records overshoot."""
    url, kind = store_url_for(size, tmp_path, request)
    loop = LoopThread()
    lags_s: list[float] = []
    freeze_long_lived_objects()  # as `modelyard serve` runs the router (modelyard/memory.py)

    async def start() -> tuple[Store, RouterServer]:
        store = open_store(url)
        router = RouterServer(store, port=free_port())
        await router.start()
        await router.router.follower.loaded.wait()
        return store, router

    async def monitor() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags_s.append(time.perf_counter() - started - 0.001)

    store, router = loop.call(start())
    lag_task = asyncio.run_coroutine_threadsafe(monitor(), loop.loop)
    try:
        started = time.perf_counter()
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from benchmarks.test_scale import _write_fleet_process as w; w({url!r}, {size})",
            ],
            cwd=Path(__file__).resolve().parents[1],
        )
        assert writer.wait(600) == 0
        written_s = time.perf_counter() - started
        table = router.router.table

        async def all_ready() -> None:
            await _until(router.router.follower, lambda: len(table.fleet.states) >= size, 300)

        loop.call(all_ready())
        seen_s = time.perf_counter() - started
    finally:
        lag_task.cancel()

        async def stop() -> None:
            await router.stop()
            await store.close()

        loop.call(stop())
        loop.stop()
        freeze_long_lived_objects(None)
        gc.unfreeze()
    lags_ms = sorted(1000 * lag for lag in lags_s)
    p99 = statistics.quantiles(lags_ms, n=100)[98]
    line = (
        f"{label(size)} ({kind}, {STAND_INS}): {3 * size} events written in {written_s:.1f} s, all in the "
        f"table after {seen_s:.1f} s; loop lag p99 {p99:.1f} ms, max {lags_ms[-1]:.1f} ms"
    )
    if size == 10_000:
        verdict(
            f"10k router loop lag max ({STAND_INS})", f"{lags_ms[-1]:.1f} ms", "<= 20 ms", lags_ms[-1] <= 20
        )
    record(line)
    if kind == "etcd":
        asyncio.run(_wipe(url))
    _one_round(benchmark, {"max_lag_ms": round(lags_ms[-1], 1), "p99_lag_ms": round(p99, 1)})


# -- cold calls on a live fleet ------------------------------------------------------------------------------

COLD_CALLS = 20


@pytest.mark.parametrize("size", [1_000, 10_000], ids=label)
def test_cold_call_latency(
    benchmark: Any,
    size: int,
    record: Record,
    verdict: Verdict,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Two of our containers, their agents, a lazy controller and the router, with N registered models:
    the first call to a model that has no copy (wanted key -> controller places -> agent loads -> ready ->
    forwarded). The container's own load time (load + measure, as the agent does) is measured apart."""
    url, kind = store_url_for(size, tmp_path, request)
    artifact = scale_model(tmp_path / "models", "scale", 2.0)
    asyncio.run(populate(url, size, artifact.artifact_uri, placed=False))
    fleet = start_custom_fleet(tmp_path / "fleet", [], store_url=url, containers=2, eager=False)
    x = np.array([1.0, 2.0], dtype=np.float32)
    cold_s: list[float] = []
    load_s: list[float] = []
    try:
        tensor = grpcclient.InferInput("INPUT", [2], "FP32")
        tensor.set_data_from_numpy(x)
        with grpcclient.InferenceServerClient(fleet.address) as client:
            for i in range(COLD_CALLS):
                name = model_name(size - 1 - 7 * i)
                started = time.perf_counter()
                out = client.infer(name, [tensor], client_timeout=60).as_numpy("OUTPUT")
                cold_s.append(time.perf_counter() - started)
                np.testing.assert_allclose(out, x * 2.0)

        async def loads() -> None:
            container = fleet.fleet.customs[0]
            adapter = CustomAdapter(container.address, fleet_secret=fleet.fleet.fleet_secret)
            try:
                for i in range(COLD_CALLS):
                    model = replace(artifact, name=f"direct{i}")
                    started = time.perf_counter()
                    await adapter.load(model)
                    await adapter.footprint(model)
                    load_s.append(time.perf_counter() - started)
            finally:
                await adapter.close()

        fleet.call(loads())
    finally:
        fleet.stop()
        if kind == "etcd":
            asyncio.run(_wipe(url))
    cold_ms = sorted(1000 * s for s in cold_s)
    load_ms = sorted(1000 * s for s in load_s)
    p50, p99 = (
        statistics.median(cold_ms),
        cold_ms[-1] if len(cold_ms) < 100 else statistics.quantiles(cold_ms, n=100)[98],
    )
    load_p50 = statistics.median(load_ms)
    line = (
        f"{label(size)} ({kind}): cold call p50 {p50:.0f} ms, p99 {p99:.0f} ms ({len(cold_ms)} calls; "
        f"with {len(cold_ms)} < 100 calls p99 is the max); container load p50 {load_p50:.0f} ms"
    )
    if size == 10_000:
        verdict(
            "10k cold call p50",
            f"{p50:.0f} ms (container load {load_p50:.0f} ms)",
            "<= load + 100 ms",
            p50 <= load_p50 + 100,
        )
    record(line)
    _one_round(benchmark, {"cold_p50_ms": round(p50, 1), "load_p50_ms": round(load_p50, 1)})
