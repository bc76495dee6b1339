"""`modelyard up`: a whole fleet on one machine — store, containers, agents, controller and the router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from modelyard import settings
from modelyard.catalog.examples import EXAMPLE_NAMES, install_example
from modelyard.commands.logs import ROUTER_LOG
from modelyard.containers.adapter import ContainerAdapter
from modelyard.containers.agent import Agent, register_agent_gauges
from modelyard.containers.archives import register_archive_checks
from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.containers.custom.archive import CUSTOM_EXAMPLE_NAMES, install_custom_example
from modelyard.containers.custom.process import CustomContainerProcess
from modelyard.containers.mlserver.adapter import (
    MLSERVER_EXAMPLE_NAMES,
    MLServerAdapter,
    install_mlserver_example,
)
from modelyard.containers.mlserver.process import MLServerProcess
from modelyard.containers.process import backoff_s, describe_exit, restart_on_failure, wait_for_exit
from modelyard.containers.sagemaker.adapter import SageMakerAdapter
from modelyard.containers.sagemaker.archive import SAGEMAKER_EXAMPLE_NAMES, install_sagemaker_example
from modelyard.containers.sagemaker.process import SageMakerProcess
from modelyard.containers.triton.adapter import TritonAdapter
from modelyard.containers.triton.server import TritonServer
from modelyard.placement import registry
from modelyard.placement.controller import PlacementController
from modelyard.placement.follow import StoreFollower
from modelyard.placement.metrics import register_controller_gauges
from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.store import Store
from modelyard.router.process import RouterProcess
from modelyard.router.server import RouterServer
from modelyard.telemetry import Telemetry

if TYPE_CHECKING:
    from modelyard.catalog.s3store import ArtifactCache

log = logging.getLogger(__name__)
register_archive_checks()  # `up` stores the example models: every backend's archive check, before any is read

STOP_STEP_S = 20.0  # the longest one step of stopping the fleet may take before it is left behind
T = TypeVar("T")

# Replicas for the example models: add_sub on both containers shows a replicated model.
EXAMPLE_REPLICAS = {"add_sub": 2, "scale": 1, "identity": 1, "stream": 1}


# A container process that ran this long before it died was not crash-looping: its restart backoff
# starts over (1 s) instead of doubling.
HEALTHY_RUN_S = 30.0


@dataclass
class LocalFleet:
    workdir: Path
    store_url: str
    containers: int = 2
    container_memory_bytes: int = 2 * 1024**3
    custom_containers: int = 0
    custom_memory_bytes: int = 1024**3
    mlserver_containers: int = 0
    mlserver_memory_bytes: int = 1024**3
    sagemaker_containers: int = 0  # AWS's multi-model-server with sagemaker-inference (containers/sagemaker/)
    sagemaker_memory_bytes: int = 1024**3
    max_inflight: int = 0  # calls each container runs at once (0: its backend's default)
    lease_ttl_s: float = 10.0
    copy_target_rps: float = 0.0  # copies follow load above this many calls/s per copy (0: off)
    scale_down_after_s: float = 300.0
    host: str = "127.0.0.1"
    port: int = 8001
    http_port: int | None = None  # KServe v2 REST on the router (None: none; 0: any free port)
    tritons: list[TritonServer] = field(default_factory=list)
    customs: list[CustomContainerProcess] = field(default_factory=list)
    mlservers: list[MLServerProcess] = field(default_factory=list)
    sagemakers: list[SageMakerProcess] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    # The router as `modelyard serve`, a child process (`modelyard up`: the data path keeps its own event loop
    # while this process imports, loads and plans); False: in this process (tests that read its table).
    router_process: bool = False
    router: RouterServer | None = None  # the router in this process
    router_child: RouterProcess | None = None  # or the router process
    controller: PlacementController | None = None
    restarts: Counter[str] = field(default_factory=Counter)  # container restarts by container id
    # Containers accept only calls carrying this secret (only the agents and the router hold it); it is
    # also written to WORKDIR/fleet-secret (mode 0600) for trusted zero-hop clients.
    fleet_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    model_store: Path | None = None  # our containers load only from inside it (default: WORKDIR)
    # Where the example models' artifacts go: None for WORKDIR/artifacts, or s3://BUCKET/PREFIX (the agents
    # then fetch them into WORKDIR/artifact-cache, which our containers may load from).
    artifact_store: str | None = None
    artifact_cache_bytes: int = 10 * 1024**3
    # One /metrics for the router, the controller and every agent of this process (0: a free port; None:
    # no metrics). Agents' series carry their container's id; the controller's fleet gauges, its lead.
    metrics_port: int | None = None
    telemetry: Telemetry | None = None
    _store: Store | None = None
    _artifact_cache: ArtifactCache | None = None
    _follower: StoreFollower | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _router_task: asyncio.Task[None] | None = None

    async def start(self, ready_timeout_s: float = 120.0) -> list[ModelVersion]:
        """Everything, supervised; the placement controller (the one writer of the shard map) places the
        example models once every container is registered."""
        models = await self.start_store_and_models()
        await self.start_containers()
        self.supervise_containers()
        await self.wait_registered(ready_timeout_s)
        self.start_controller()
        if self.router_process:  # it reads a store where the examples are ready already
            if self.telemetry is not None and self.telemetry.metrics:  # (the router serves its own)
                self.telemetry.serve_metrics(ready=self.follower.loaded.is_set)
            await self.wait_ready(models, ready_timeout_s)
            await self.start_router_process()
        else:
            await self.start_router()
            await self.wait_ready(models, ready_timeout_s)
        return models

    @property
    def router_address(self) -> str:
        if self.router_child is not None:
            return self.router_child.address
        assert self.router is not None, "start() first"
        return self.router.address

    @property
    def rest_address(self) -> str | None:
        if self.router_child is not None:
            return self.router_child.rest_address
        return self.router.rest_address if self.router is not None else None

    @property
    def processes(
        self,
    ) -> list[TritonServer | CustomContainerProcess | MLServerProcess | SageMakerProcess]:
        return [*self.tritons, *self.customs, *self.mlservers, *self.sagemakers]

    @property
    def follower(self) -> StoreFollower:
        assert self._follower is not None, "start_store_and_models() first"
        return self._follower

    @property
    def store(self) -> Store:
        assert self._store is not None, "start_store_and_models() first"
        return self._store

    async def start_store_and_models(self, *, examples: bool = True) -> list[ModelVersion]:
        """Opens the store and registers the example models (Triton ones, and custom ones if any)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.metrics_port is not None and self.telemetry is None:
            self.telemetry = Telemetry(
                "modelyard-up", metrics_port=self.metrics_port, metrics_host=settings.metrics_host()
            )
        self._store = store = settings.open_configured_store(self.store_url)
        # One follower of the store for the router, the controller and every agent of this process.
        self._follower = StoreFollower(store, name="local fleet")
        self._follower.start()
        if not examples:
            return []
        artifacts = self.artifacts_dir
        models = [
            install_example(name, artifacts, replicas=EXAMPLE_REPLICAS.get(name, 1)) for name in EXAMPLE_NAMES
        ]
        if self.custom_containers:
            models += [install_custom_example(name, artifacts) for name in CUSTOM_EXAMPLE_NAMES]
        if self.mlserver_containers:  # `iris`: a scikit-learn classifier trained now
            models += [
                await asyncio.to_thread(install_mlserver_example, name, artifacts)
                for name in MLSERVER_EXAMPLE_NAMES
            ]
        if self.sagemaker_containers:  # `sagemaker_scale`: OUTPUT = INPUT x 2 on a SageMaker container
            models += [install_sagemaker_example(name, artifacts) for name in SAGEMAKER_EXAMPLE_NAMES]
        if self.artifact_store is not None:
            models = [await self.store_artifact(model) for model in models]
        for model in models:
            await registry.register_model(store, model)
        return models

    @property
    def artifacts_dir(self) -> Path:
        """Where example artifacts are put locally (then, with an S3 store, uploaded from)."""
        from modelyard.catalog.modelstore import file_path

        local = file_path(self.artifact_store) if self.artifact_store else None
        return local or self.workdir / "artifacts"

    async def store_artifact(self, model: ModelVersion) -> ModelVersion:
        """The model with its artifact put in the fleet's artifact store (S3), for the agents to fetch."""
        from modelyard.catalog.modelstore import file_path
        from modelyard.catalog.s3store import S3ModelStore
        from modelyard.catalog.stores import open_model_store

        artifacts = open_model_store(
            self.artifact_store or str(self.artifacts_dir), cache_dir=settings.artifact_cache_dir()
        )
        source = file_path(model.artifact_uri)
        if not isinstance(artifacts, S3ModelStore) or source is None:
            return model
        uri = await asyncio.to_thread(artifacts.put_files, source, model.sha256)
        return replace(model, artifact_uri=uri)

    def fetching(self, adapter: ContainerAdapter) -> ContainerAdapter:
        """The adapter, handed S3 artifacts as verified local copies from the fleet's one cache: those of
        an S3 artifact store, and those of models uploaded to S3 later (`file://` ones pass as they are)."""
        from modelyard.catalog.s3store import ArtifactCache
        from modelyard.containers.fetching import FetchingAdapter

        if self._artifact_cache is None:
            store = self.artifact_store or ""
            s3 = store if store.startswith("s3://") else None  # fetch only from it, when it is one
            self._artifact_cache = ArtifactCache(
                self.workdir / "artifact-cache", max_bytes=self.artifact_cache_bytes, model_store=s3
            )
        return FetchingAdapter(adapter, self._artifact_cache)

    @property
    def fleet_secret_file(self) -> Path:
        return self.workdir / "fleet-secret"

    def write_fleet_secret(self) -> Path:
        """WORKDIR/fleet-secret, readable by this user only."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.fleet_secret_file
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(self.fleet_secret + "\n")
        os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
        return path

    async def start_containers(self) -> list[Container]:
        """Starts the Triton and custom container processes (in parallel) and an agent for each; every
        container refuses calls without the fleet secret, and ours loads only from WORKDIR."""
        containers_dir = self.workdir / "containers"
        secret_file = self.write_fleet_secret()
        self.tritons = [
            TritonServer(containers_dir / f"triton-{i}", fleet_secret=self.fleet_secret)
            for i in range(self.containers)
        ]
        for triton in self.tritons:
            triton.workdir.mkdir(parents=True, exist_ok=True)
        self.customs = [
            CustomContainerProcess(
                containers_dir / f"custom-{i}",
                self.custom_memory_bytes,
                fleet_secret_file=secret_file,
                model_store=(self.model_store or self.workdir).resolve(),
            )
            for i in range(self.custom_containers)
        ]
        self.mlservers = [
            MLServerProcess(containers_dir / f"mlserver-{i}", self.mlserver_memory_bytes)
            for i in range(self.mlserver_containers)
        ]
        # Each under its own workdir (config, temp files, logs, metrics, the models it loads).
        self.sagemakers = [
            SageMakerProcess(containers_dir / f"sagemaker-{i}", host=self.host)
            for i in range(self.sagemaker_containers)
        ]
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in self.processes))
        adapters: list[tuple[Container, ContainerAdapter]] = [
            (
                Container(f"triton-{i}", t.address, kind="cpu", memory_bytes=self.container_memory_bytes),
                TritonAdapter(t.address, t.repository, fleet_secret=self.fleet_secret),
            )
            for i, t in enumerate(self.tritons)
        ]
        adapters += [
            (
                Container(
                    f"custom-{i}", c.address, kind="cpu", memory_bytes=c.memory_bytes, backend="custom"
                ),
                CustomAdapter(c.address, fleet_secret=self.fleet_secret),
            )
            for i, c in enumerate(self.customs)
        ]
        adapters += [
            (
                Container(
                    f"mlserver-{i}", m.address, kind="cpu", memory_bytes=m.memory_bytes, backend="mlserver"
                ),
                self._adapter_for(m, fetching=False),
            )
            for i, m in enumerate(self.mlservers)
        ]
        adapters += [
            (
                Container(
                    f"sagemaker-{i}",
                    s.address,
                    kind="cpu",
                    memory_bytes=self.sagemaker_memory_bytes,
                    backend="sagemaker",
                ),
                self._adapter_for(s),
            )
            for i, s in enumerate(self.sagemakers)
        ]
        for container, adapter in adapters:
            if self.max_inflight:
                container = replace(container, max_inflight=self.max_inflight)
            agent = Agent(
                self.store,
                container,
                self.fetching(adapter),
                lease_ttl_s=self.lease_ttl_s,
                follower=self.follower,
                telemetry=self.telemetry,
            )
            self.agents.append(agent)
            # An agent whose loop crashes (a bug) runs again, keeping its lease and its loaded models.
            task = restart_on_failure(f"agent {container.id}", agent.run)
            self._tasks.append(asyncio.create_task(task, name=f"agent-{container.id}"))
        if self.telemetry is not None and self.telemetry.metrics:
            register_agent_gauges(self.telemetry, self.agents)
        return [container for container, _ in adapters]

    def supervise_containers(self) -> None:
        """Restarts a container process that exits (a crash, kill -9) with backoff, on its port if free;
        its agent registers it again (with a new address if the port was taken) and reloads its models."""
        for process, agent in zip(self.processes, self.agents, strict=True):
            task = self._supervise(process, agent)
            self._tasks.append(asyncio.create_task(task, name=f"supervise-{agent.container.id}"))

    async def _supervise(
        self,
        process: TritonServer | CustomContainerProcess | MLServerProcess | SageMakerProcess,
        agent: Agent,
    ) -> None:
        cid = agent.container.id
        failures = 0
        while process.process is not None:
            pid, up_since = process.process.pid, time.monotonic()
            status = await wait_for_exit(process.process)
            agent.check_container()  # withdraw it now, not at the next heartbeat
            # A process that ran for a while before dying starts its backoff over: backoff is for a crash
            # loop (dying again within seconds of each start), not for a container killed now and then.
            failures = 1 if time.monotonic() - up_since >= HEALTHY_RUN_S else failures + 1
            waited_s = await _restart_with_backoff(f"container {cid}", process.restart, failures)
            self.restarts[cid] += 1
            if process.address != agent.container.address:
                old = agent.adapter
                agent.container_restarted(process.address, self._adapter_for(process))
                # Not closed now: closing a channel cancels the calls on it, and an agent call in flight
                # to the old address (a liveness check) would end in a CancelledError not its own.
                self._tasks.append(asyncio.create_task(_close_later(old), name=f"close-old-client-{cid}"))
            else:
                agent.container_restarted()
            assert process.process is not None
            log.warning(
                "container %s (pid %d) %s; restarted after %.1f s as pid %d on %s (restart %d)",
                cid,
                pid,
                describe_exit(status),
                waited_s,
                process.process.pid,
                process.address,
                self.restarts[cid],
            )

    def _adapter_for(
        self,
        process: TritonServer | CustomContainerProcess | MLServerProcess | SageMakerProcess,
        *,
        fetching: bool = True,
    ) -> ContainerAdapter:
        if isinstance(process, SageMakerProcess):  # artifacts are linked into its model store
            return self.fetching(SageMakerAdapter(process.address, process.model_store))
        if isinstance(process, TritonServer):
            adapter: ContainerAdapter = TritonAdapter(
                process.address, process.repository, fleet_secret=self.fleet_secret
            )
        elif isinstance(process, MLServerProcess):
            adapter = MLServerAdapter(process.address, process.repository, pid=lambda: process.pid)
        else:
            adapter = CustomAdapter(process.address, fleet_secret=self.fleet_secret)
        return self.fetching(adapter) if fetching else adapter

    async def wait_registered(self, timeout_s: float) -> None:
        """Waits until every agent has registered its container (so the first plan uses them all)."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(a.wait_registered() for a in self.agents))
        except TimeoutError:
            missing = ", ".join(a.container.id for a in self.agents if not a.registered)
            raise TimeoutError(
                f"containers not registered within {timeout_s:.0f} s: {missing}; "
                f"see {self.workdir}/containers/*/*.log"
            ) from None

    def start_controller(self, *, eager: bool = True) -> PlacementController:
        """Places the models, re-places copies of containers that die and places models registered later
        (`models upload`; with `eager` False only when a call wants them). Restarted if its loop crashes."""
        self.controller = controller = PlacementController(
            self.store,
            eager=eager,
            follower=self.follower,
            copy_target_rps=self.copy_target_rps,
            scale_down_after_s=self.scale_down_after_s,
            telemetry=self.telemetry,
        )
        if self.telemetry is not None and self.telemetry.metrics:
            register_controller_gauges(self.telemetry, controller)
        task = restart_on_failure("placement controller", controller.run)
        self._tasks.append(asyncio.create_task(task, name="placement-controller"))
        return controller

    async def start_router(self) -> None:
        # Tenants from the x-tenant-id header as sent: loopback development (run_up says so).
        # With metrics, the router starts the one /metrics endpoint (telemetry.metrics_port once started).
        self.router = RouterServer(
            self.store,
            self.host,
            self.port,
            self.telemetry,
            fleet_secret=self.fleet_secret,
            follower=self.follower,
            rate_period_s=settings.rate_period_s(),
            admission=settings.admission(),
            http_port=self.http_port,
        )
        await self.router.start()

    async def start_router_process(self) -> None:
        """`modelyard serve` on the fleet's store, address and secret (its log: WORKDIR/router.log),
        restarted if it dies; with metrics, its own /metrics on a free port."""
        self.router_child = RouterProcess(
            self.workdir / ROUTER_LOG,
            self.store_url,
            host=self.host,
            port=self.port,
            http_port=self.http_port,
            metrics_port=None if self.metrics_port is None else 0,
            fleet_secret_file=self.write_fleet_secret(),
        )
        await _finish_in_thread(self.router_child.start)
        self._router_task = asyncio.create_task(
            self._supervise_router(self.router_child), name="supervise-router"
        )

    async def _supervise_router(self, router: RouterProcess) -> None:
        """Starts the router process again whenever it exits, as containers are (on its ports if free)."""
        failures = 0
        while router.process is not None:
            pid, up_since = router.process.pid, time.monotonic()
            status = await wait_for_exit(router.process)
            failures = 1 if time.monotonic() - up_since >= HEALTHY_RUN_S else failures + 1
            waited_s = await _restart_with_backoff("the router process", router.restart, failures)
            assert router.process is not None
            log.warning(
                "the router process (pid %d) %s; started again after %.1f s as pid %d on %s",
                pid,
                describe_exit(status),
                waited_s,
                router.process.pid,
                router.address,
            )

    async def wait_ready(self, models: list[ModelVersion], timeout_s: float) -> None:
        """Waits until every copy the shard map assigns to `models` is ready (in this process's view of
        the store, which the router in this process shares)."""

        def waiting() -> list[str]:
            fleet = self.follower.fleet
            return [
                m.key
                for m in models
                if not 0 < len(fleet.assignments.get(m.key, ())) == len(fleet.ready_on(m.key))
            ]

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.follower.loaded.is_set() and not waiting():
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(
            f"models not ready within {timeout_s:.0f} s: {', '.join(waiting())}; "
            f"see {self.workdir}/containers/*/*.log"
        )

    async def stop(self) -> bool:
        """Stops everything, in order. A step that does not finish within STOP_STEP_S is logged, with
        what every task was doing, and left behind, so stopping never hangs; returns False if one was."""
        clean = True

        async def step(what: str, work: Awaitable[object]) -> None:
            nonlocal clean
            try:
                async with asyncio.timeout(STOP_STEP_S):
                    await work
            except TimeoutError:
                clean = False
                log.error(
                    "stopping: %s did not finish within %.0f s; going on. Tasks:\n%s",
                    what,
                    STOP_STEP_S,
                    describe_tasks(),
                )

        if self.router is not None:
            await step("the router", self.router.stop())
        if self.router_child is not None:
            if self._router_task is not None:
                self._router_task.cancel()
                await asyncio.gather(self._router_task, return_exceptions=True)
            # SIGTERM: it drains its calls (2 s), then exits; SIGKILL after 10 s
            await asyncio.to_thread(self.router_child.stop)
        for task in self._tasks:
            task.cancel()
        tasks = asyncio.gather(*self._tasks, return_exceptions=True)
        await step("agents, supervisors and the controller", tasks)
        for agent in self.agents:
            await step(f"closing the client of {agent.container.id}", agent.adapter.close())
        # Each process gets SIGTERM, then SIGKILL after 10 s: this step ends on its own.
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in self.processes))
        if self._follower is not None:
            await step("the store follower", self._follower.stop())
        if self._store is not None:
            await step("the store", self._store.close())
        if self.telemetry is not None:
            self.telemetry.shutdown()
        return clean


async def _restart_with_backoff(what: str, restart: Callable[[], None], failures: int) -> float:
    """`restart()` (in a thread) after backoff, again and longer after each failed start, until one
    succeeds; returns the seconds waited."""
    waited_s = 0.0
    while True:
        delay = backoff_s(failures)
        await asyncio.sleep(delay)
        waited_s += delay
        try:
            await _finish_in_thread(restart)
            return waited_s
        except Exception as exc:  # a start error, or anything: keep trying, with backoff
            failures += 1
            log.error("%s did not restart (%s); trying again", what, exc)


async def _close_later(adapter: ContainerAdapter, after_s: float = 60.0) -> None:
    """Closes a replaced container client once every call that may still use it has run out of time
    (at once if the fleet stops first)."""
    try:
        await asyncio.sleep(after_s)
    finally:
        with contextlib.suppress(Exception):
            await adapter.close()


def describe_tasks() -> str:
    """One line per running asyncio task: its name and where it waits."""
    lines = []
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=1)
        where = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
        lines.append(f"  {task.get_name()} at {where}")
    return "\n".join(sorted(lines))


async def _finish_in_thread(fn: Callable[[], T]) -> T:
    """Runs `fn` in a thread; if cancelled meanwhile, waits for it to finish before passing the
    cancellation on, so a process it starts is known (and stopped) by whoever stops the fleet."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def example_call(address: str, model: str = "scale") -> str:
    code = (
        "import numpy as np, tritonclient.grpc as g; "
        f'c = g.InferenceServerClient("{address}"); '
        'x = g.InferInput("INPUT", [3], "FP32"); '
        "x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32)); "
        f'print(c.infer("{model}", [x]).as_numpy("OUTPUT"))'
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def iris_call(address: str) -> str:
    """A call of the MLServer example: two iris flowers, expected classes [0, 2]."""
    code = (
        "import numpy as np, tritonclient.grpc as g; "
        f'c = g.InferenceServerClient("{address}"); '
        'x = g.InferInput("INPUT", [2, 4], "FP32"); '
        "x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)); "
        'print(c.infer("iris", [x]).as_numpy("predict").ravel())'
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def rest_example_call(address: str, model: str = "scale") -> str:
    """A curl command that calls `model` (FP32 INPUT -> OUTPUT) through the router's REST port."""
    body = '{"inputs":[{"name":"INPUT","shape":[3],"datatype":"FP32","data":[1,2,3]}]}'
    return f"curl -s http://{address}/v2/models/{model}/infer -d '{body}'"


async def run_up(fleet: LocalFleet) -> bool:
    """Starts the fleet, prints how to call it, and stops it at Ctrl-C (SIGINT) or SIGTERM. Returns whether
    everything stopped within its time."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"starting {fleet.containers} Triton, {fleet.custom_containers} custom and "
        f"{fleet.mlserver_containers} MLServer containers, agents, "
        f"the placement controller and the router (store: {fleet.store_url})"
    )
    try:
        await _serve_until(fleet, stop)
    finally:
        clean = await fleet.stop()
        print("stopped" if clean else "stopped, leaving behind what the log above names", flush=True)
    return clean


async def _serve_until(fleet: LocalFleet, stop: asyncio.Event) -> None:
    """Starts the fleet and prints how to call it; returns when `stop` is set (at once if during start)."""
    started = asyncio.create_task(fleet.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        return
    models = started.result()
    fleet_view = fleet.follower.fleet
    print()
    print(f"{'container':<12} {'address':<17} {'pid':>8}  models")
    for process, agent in zip(fleet.processes, fleet.agents, strict=True):
        pid = process.process.pid if process.process else 0
        print(f"{agent.container.id:<12} {process.address:<17} {pid:>8}  {', '.join(sorted(agent.loaded))}")
    print()
    for model in models:
        print(f"model {model.key:<12} ready on {', '.join(fleet_view.ready_on(model.key))}")
    print()
    child = fleet.router_child
    router_pid = f", pid {child.process.pid}" if child is not None and child.process is not None else ""
    print(f"router ready on {fleet.router_address} (KServe v2 gRPC and modelyard.v1.Router{router_pid})")
    if fleet.rest_address is not None:
        print(f"router REST on {fleet.rest_address} (KServe v2 REST)")
    if fleet.telemetry is not None and fleet.telemetry.metrics_port is not None:
        what = "controller and agents" if child is not None else "router, controller and agents"
        print(f"metrics on http://{fleet.host}:{fleet.telemetry.metrics_port}/metrics ({what})")
    if child is not None and child.metrics_url is not None:
        print(f"router metrics on {child.metrics_url}")
    if child is not None:
        print(f"router log: {child.log_path} (modelyard logs router)")
    print(
        "tenants: x-tenant-id is trusted as sent (local development; `modelyard serve` identifies "
        "callers by token or client certificate)"
    )
    print(f"containers accept only calls carrying the fleet secret in {fleet.fleet_secret_file}")
    print("try it:")
    print(f"  {example_call(fleet.router_address)}")
    if fleet.rest_address is not None:
        print(f"  {rest_example_call(fleet.rest_address)}")
    if fleet.sagemakers:
        print(f"  {example_call(fleet.router_address, 'sagemaker_scale')}")
        print(f"  curl http://{fleet.sagemakers[0].address}/ping   # and /models: the SageMaker contract")
    if fleet.mlserver_containers:
        print(f"  {iris_call(fleet.router_address)}")
    print("press Ctrl-C to stop everything", flush=True)
    await stopped
    print("stopping...", flush=True)
