"""The agent against our own container (a real process) and a real store: it survives container errors,
store blips and its own restarts without reloading what is loaded, and retries what failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from modelyard.containers.agent import Agent
from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.containers.custom.process import CustomContainerProcess
from modelyard.containers.process import restart_on_failure
from modelyard.placement import registry
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.store import Store, open_store
from modelyard.placement.store.embedded import EmbeddedStore
from tests.conftest import EtcdServer
from tests.test_lazy_load import scale_model

CID = "box"


@pytest.fixture
def container(tmp_path: Path) -> Iterator[CustomContainerProcess]:
    process = CustomContainerProcess(tmp_path / "container", 1 << 30, model_store=tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.05)


async def assign(store: Store, assignments: dict[str, list[str]]) -> None:
    generation = await registry.read_generation(store)
    await registry.write_shard_map(store, assignments, expected_generation=generation)


async def state(store: Store, key: str) -> CopyState | None:
    return (await registry.load_fleet(store)).states.get((CID, key))


def ready(store: Store, *keys: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        fleet = await registry.load_fleet(store)
        return CID in fleet.containers and all(
            (s := fleet.states.get((CID, k))) is not None and s.phase == "ready" for k in keys
        )

    return check


def phase(store: Store, key: str, wanted: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        copy = await state(store, key)
        return copy is not None and copy.phase == wanted

    return check


def box(process: CustomContainerProcess) -> Container:
    return Container(CID, process.address, memory_bytes=1 << 30, backend="custom")


async def held(process: CustomContainerProcess) -> set[str]:
    adapter = CustomAdapter(process.address)
    try:
        return await adapter.ready_versions()
    finally:
        await adapter.close()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def models(tmp_path: Path, *names: str) -> list[ModelVersion]:
    return [scale_model(tmp_path / "models", name, float(i + 2)) for i, name in enumerate(names)]


async def start(store: Store, process: CustomContainerProcess, items: list[ModelVersion], **options: float):
    """Registers `items`, assigns them to the container, and runs an agent until they are ready."""
    for model in items:
        await registry.register_model(store, model)
    await assign(store, {m.key: [CID] for m in items})
    adapter = CustomAdapter(process.address)
    agent = Agent(store, box(process), adapter, **options)  # type: ignore[arg-type]
    task = asyncio.create_task(agent.run())
    await until(ready(store, *(m.key for m in items)), "the models are ready")
    return agent, adapter, task


def revoke_from_elsewhere(url: str, lease_id: int) -> None:
    """What an expiry does, done by another client: the lease and every key under it go."""
    if url.startswith("etcd://"):
        endpoint = url.removeprefix("etcd://")
        subprocess.run(
            ["etcdctl", f"--endpoints={endpoint}", "lease", "revoke", f"{lease_id:x}"], check=True, timeout=30
        )
    else:
        other = EmbeddedStore(Path(url))  # a second handle on the same file, as another process has
        other._locked(other._revoke_lease, lease_id)


def test_a_store_side_lease_revocation_re_registers_without_reloading(
    store_url: str, container: CustomContainerProcess, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with open_store(store_url) as store:
            items = models(tmp_path, "a", "b")
            agent, adapter, task = await start(store, container, items, lease_ttl_s=3.0)
            try:
                assert agent.load_calls == 2 and agent.registrations == 1
                lease = agent._lease
                assert lease is not None
                await asyncio.to_thread(revoke_from_elsewhere, store_url, lease.id)
                await until(lambda: _true(agent.registrations == 2), "the agent registered again")
                await until(ready(store, "a@1", "b@1"), "the copies are reported ready again")
                assert agent.load_calls == 2  # nothing was reloaded
                assert await held(container) == {"a@1", "b@1"}
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


async def _true(value: bool) -> bool:
    return value


def test_etcd_paused_past_the_agent_s_lease_leaves_its_models_loaded(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    etcd = EtcdServer(tmp_path / "etcd")
    (tmp_path / "etcd").mkdir()
    etcd.start()

    async def scenario() -> None:
        async with open_store(etcd.url) as store:
            items = models(tmp_path, "a", "b")
            agent, adapter, task = await start(store, container, items, lease_ttl_s=2.0)
            try:
                assert etcd.process is not None
                os.kill(etcd.process.pid, signal.SIGSTOP)  # a hung store: no answer, no error
                try:
                    await asyncio.sleep(5.0)  # the fault itself: longer than the agent's 2 s lease
                finally:
                    os.kill(etcd.process.pid, signal.SIGCONT)
                await until(lambda: _true(agent.registrations >= 2), "the agent registered again")
                await until(ready(store, "a@1", "b@1"), "the copies are reported ready again")
                assert agent.load_calls == 2
                assert await held(container) == {"a@1", "b@1"}
            finally:
                await stop(task)
                await adapter.close()

    try:
        asyncio.run(scenario())
    finally:
        etcd.stop()


def test_after_a_restart_the_agent_keeps_what_is_assigned_and_unloads_the_rest(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            _, adapter, task = await start(store, container, models(tmp_path, "keep", "drop"))
            await stop(task)  # the agent goes; the container keeps both models
            await adapter.close()
            assert await held(container) == {"keep@1", "drop@1"}
            await assign(store, {"keep@1": [CID]})

            adapter = CustomAdapter(container.address)
            fresh = Agent(store, box(container), adapter, drain_s=0.0)
            task = asyncio.create_task(fresh.run())
            try:
                await until(lambda: held_is(container, {"keep@1"}), "drop@1 is unloaded")
                await until(ready(store, "keep@1"), "keep@1 is reported ready")
                assert fresh.load_calls == 0  # keep@1 was adopted, not reloaded
                assert await state(store, "drop@1") is None
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


async def held_is(process: CustomContainerProcess, keys: set[str]) -> bool:
    return await held(process) == keys


def test_a_failed_load_is_retried_at_once_when_its_registration_changes(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    broken = scale_model(tmp_path / "broken", "m", 3.0)
    (Path(broken.artifact_uri.removeprefix("file://")) / "weights.npz").write_bytes(b"not numpy")
    fixed = replace(broken, artifact_uri=scale_model(tmp_path / "fixed", "m", 3.0).artifact_uri)

    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            await registry.register_model(store, broken)
            await assign(store, {"m@1": [CID]})
            adapter = CustomAdapter(container.address)
            # A minute's backoff: only the new registration can explain a retry within the test.
            agent = Agent(store, box(container), adapter, retry_base_s=60.0)
            task = asyncio.create_task(agent.run())
            try:
                await until(phase(store, "m@1", "failed"), "the broken load is reported failed")
                assert agent.load_calls == 1
                started = time.monotonic()
                await store.put(registry.MODELS + "m@1", fixed.to_json())
                await until(ready(store, "m@1"), "the fixed model is ready")
                assert time.monotonic() - started < 30
                assert agent.load_calls == 2
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


def test_an_error_the_container_client_raises_is_a_failed_copy_and_the_agent_goes_on(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    # A lone surrogate cannot be encoded into the gRPC request: the client raises UnicodeEncodeError, not
    # one of the load errors, and before this was an uncaught exception that ended the agent.
    good = scale_model(tmp_path / "models", "m", 3.0)
    bad = replace(good, artifact_uri=good.artifact_uri + "\ud800")

    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            await registry.register_model(store, bad)
            await assign(store, {"m@1": [CID]})
            adapter = CustomAdapter(container.address)
            agent = Agent(store, box(container), adapter, retry_base_s=60.0)
            task = asyncio.create_task(agent.run())
            try:
                await until(phase(store, "m@1", "failed"), "the load is reported failed")
                copy = await state(store, "m@1")
                assert copy is not None and copy.message.startswith("UnicodeEncodeError: ")
                assert not task.done()
                await registry.register_model(store, good)
                await until(ready(store, "m@1"), "the good registration loads")
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


class FlakyAdapter(CustomAdapter):
    """Our container's adapter with faults the real container cannot produce on demand: the first
    `load_faults` loads raise tritonclient's InferenceServerException (as a Triton adapter's unguarded
    call does when Triton dies mid-load), the first `unload_faults` unloads fail as a timed-out call."""

    def __init__(self, address: str, *, load_faults: int = 0, unload_faults: int = 0) -> None:
        super().__init__(address)
        self.load_faults = load_faults
        self.unload_faults = unload_faults

    async def load(self, model: ModelVersion, timeout_s: float = 120.0) -> None:
        if self.load_faults:
            self.load_faults -= 1
            raise InferenceServerException("[StatusCode.UNAVAILABLE] Socket closed")
        await super().load(model, timeout_s)

    async def unload(self, model: ModelVersion, timeout_s: float = 60.0) -> None:
        if self.unload_faults:
            self.unload_faults -= 1
            raise TimeoutError("unload timed out")
        await super().unload(model, timeout_s)


def test_an_inference_server_exception_fails_the_copy_and_the_load_is_retried(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            (model,) = models(tmp_path, "m")
            await registry.register_model(store, model)
            await assign(store, {"m@1": [CID]})
            adapter = FlakyAdapter(container.address, load_faults=1)
            agent = Agent(store, box(container), adapter, retry_base_s=0.5)
            task = asyncio.create_task(agent.run())
            try:
                await until(phase(store, "m@1", "failed"), "the load is reported failed")
                copy = await state(store, "m@1")
                assert copy is not None and "Socket closed" in copy.message
                await until(ready(store, "m@1"), "the retry loads it")
                assert agent.load_calls == 2 and not task.done()
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


def test_a_failed_unload_is_retried_until_the_model_is_gone(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            (model,) = models(tmp_path, "m")
            await registry.register_model(store, model)
            await assign(store, {"m@1": [CID]})
            adapter = FlakyAdapter(container.address, unload_faults=2)
            agent = Agent(store, box(container), adapter, retry_base_s=0.2, drain_s=0.0)
            task = asyncio.create_task(agent.run())
            try:
                await until(ready(store, "m@1"), "the model is ready")
                await assign(store, {})
                await until(lambda: _true(agent.failed_unloads == {"m@1"}), "the unload failed once")
                await until(lambda: held_is(container, set()), "the model is unloaded in the end")
                assert agent.unload_calls == 3 and agent.failed_unloads == set()
                assert await state(store, "m@1") is None
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("crash", [RuntimeError, asyncio.CancelledError])
def test_an_agent_whose_loop_crashes_is_restarted_and_keeps_its_lease_and_models(
    container: CustomContainerProcess, tmp_path: Path, crash: type[BaseException]
) -> None:
    """A bug, or a CancelledError from under a loop (grpc.aio raises one in a call whose channel is
    closed; a restarted container's old client was closed under a liveness check), not the agent's stop."""

    async def scenario() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            (model,) = models(tmp_path, "m")
            await registry.register_model(store, model)
            await assign(store, {"m@1": [CID]})
            adapter = CustomAdapter(container.address)
            agent = Agent(store, box(container), adapter)
            # Every error the agent's loops know of is handled inside them; a crash is a bug, which no
            # real fault produces on demand: the follower raises once, when told to.
            crashed = asyncio.Event()
            real_follow = agent._follow
            runs = 0

            async def follow_until_crash() -> None:
                nonlocal runs
                runs += 1
                if runs > 1:
                    return await real_follow()
                following = asyncio.create_task(real_follow())
                try:
                    await crashed.wait()
                    raise crash("injected")
                finally:
                    following.cancel()

            agent._follow = follow_until_crash  # type: ignore[method-assign]
            task = asyncio.create_task(restart_on_failure("agent box", agent.run, base_s=0.1))
            try:
                await until(ready(store, "m@1"), "the model is ready")
                crashed.set()
                await until(lambda: _true(runs == 2), "the agent ran again")
                (extra,) = models(tmp_path / "2", "n")
                await registry.register_model(store, extra)
                await assign(store, {"m@1": [CID], "n@1": [CID]})
                await until(ready(store, "m@1", "n@1"), "the restarted agent loads a new assignment")
                assert agent.registrations == 1  # the lease outlived the crash
                assert agent.load_calls == 2  # m@1 once, n@1 once: no reload
            finally:
                await stop(task)
                await adapter.close()

    asyncio.run(scenario())


def _pid(process: CustomContainerProcess) -> int:
    assert process.process is not None
    return process.process.pid


@contextlib.asynccontextmanager
async def agent_of(process: CustomContainerProcess, tmp_path: Path) -> AsyncIterator[tuple[Store, Agent]]:
    """One model ready on the container through a running agent (6-s lease: a check every 2 s); stopped
    after the block."""
    async with open_store(str(tmp_path / "store")) as store:
        agent, adapter, task = await start(store, process, models(tmp_path, "m"), lease_ttl_s=6.0)
        try:
            yield store, agent
        finally:
            await stop(task)
            await adapter.close()


def test_one_liveness_check_that_times_out_does_not_withdraw_the_container(
    container: CustomContainerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A starved machine can make one check run out of time; that alone must not re-place every copy."""

    async def scenario() -> None:
        async with agent_of(container, tmp_path) as (store, agent):
            # A stopped process keeps its socket: connections are accepted and never answered, so the
            # check times out, as on a machine too busy to run the container.
            os.kill(_pid(container), signal.SIGSTOP)
            try:
                await until(lambda: _true(agent._slow_strikes == 1), "one check times out")
            finally:
                os.kill(_pid(container), signal.SIGCONT)
            await until(lambda: _true(agent._slow_strikes == 0), "the next check is answered", 30)
            assert agent.registrations == 1  # never withdrawn, so never registered again
            assert "withdrawing it\n" not in caplog.text.replace("withdrawing it if", "")
            assert await ready(store, "m@1")()

    asyncio.run(scenario())


def test_a_container_that_stays_unanswering_is_withdrawn_and_registered_again_when_it_answers(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with agent_of(container, tmp_path) as (store, agent):

            async def registered() -> bool:
                return CID in (await registry.load_fleet(store)).containers

            os.kill(_pid(container), signal.SIGSTOP)
            try:
                await until(lambda: _not(registered()), "the hung container is withdrawn")
                assert agent._lease is None
            finally:
                os.kill(_pid(container), signal.SIGCONT)
            await until(ready(store, "m@1"), "registered again, its copy ready")
            assert agent.registrations == 2
            assert agent.load_calls == 1  # the container kept the model: no reload

    asyncio.run(scenario())


def test_a_container_that_refuses_connections_is_withdrawn_at_the_first_check(
    container: CustomContainerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with agent_of(container, tmp_path) as (_, agent):
            os.kill(_pid(container), signal.SIGKILL)  # no supervisor here: nothing restarts it
            await until(lambda: _true(agent._lease is None), "the dead container is withdrawn")
            assert "did not answer within" not in caplog.text  # no second chance for a refusal

    asyncio.run(scenario())


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


def test_a_load_answers_the_copy_s_footprint_so_the_agent_measures_it_without_another_call(
    container: CustomContainerProcess, tmp_path: Path
) -> None:
    """Our container answers a load with the bytes it now accounts for the version (a trailer): the agent's
    measurement, recorded in the copy's ready state, is that figure, and asking the container again (its
    ModelStatistics) gives the same one."""
    model, by_agent = models(tmp_path, "measured", "by_agent")

    async def scenario() -> tuple[int, int, int]:
        adapter = CustomAdapter(container.address)
        try:
            await adapter.load(model)

            async def no_second_call(*args: object, **kwargs: object) -> None:
                raise AssertionError("the footprint of a copy just loaded was asked for again")

            asked = adapter._stub.ModelStatistics
            adapter._stub.ModelStatistics = no_second_call  # type: ignore[method-assign]
            from_load = await adapter.footprint(model)
            adapter._stub.ModelStatistics = asked  # type: ignore[method-assign]
            from_statistics = await adapter.footprint(model)  # the load's figure is used once
            async with open_store(str(tmp_path / "store")) as store:
                _agent, agent_adapter, task = await start(store, container, [by_agent])
                try:
                    copy = await state(store, by_agent.key)
                finally:
                    await stop(task)
                    await agent_adapter.close()
            assert copy is not None
            return from_load, from_statistics, copy.measured_bytes
        finally:
            await adapter.close()

    from_load, from_statistics, recorded = asyncio.run(scenario())
    assert from_load == from_statistics > 0
    assert recorded == from_load  # both models hold one float32 factor: the same footprint
