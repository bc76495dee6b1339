"""The agent: one per container. Converges the container's loaded models to the shard map and reports.

It keeps the container registered under a lease (its liveness), follows the store's watch, loads what the
map assigns and unloads what it no longer does, and writes each copy's state (loading / ready / failed)
so routers send traffic to ready copies only.

It is built to outlive its surroundings:
- anything a load, unload or measurement raises is one failed copy (with the reason), retried with
  backoff, and a failed load is retried at once when its model's registration changes;
- a lost lease (store blip, expiry) re-registers the container and re-reports its copies; what is loaded
  stays loaded;
- what the container holds is asked of the container (its repository index) whenever the agent does not
  know it: at start, and after the container was down or restarted. Models the map no longer assigns are
  then unloaded, and the ones it still assigns are adopted without a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from modelyard import metric_names as names
from modelyard.containers.adapter import ContainerAdapter, ContainerFull, LoadError
from modelyard.placement import registry
from modelyard.placement.follow import StoreFollower
from modelyard.placement.model import Container, CopyState, ModelVersion, split_model_key
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store import Lease, Store, StoreError, StoreUnavailable
from modelyard.telemetry import Telemetry

log = logging.getLogger(__name__)

LOAD_SLICE = 64  # loads started per reconcile pass
# Loads an agent runs at once, by backend (others: 4). Our container reads a model holding the GIL, so
# reads at once only take turns: one container, 3,000 loads of a tiny model, 1.56 ms of its CPU per load
# and 621 loads/s two at a time, 1.88 ms and 564/s four at a time, 2.10 ms and 515/s eight at a time.
PARALLEL_LOADS = {"custom": 2}
# A liveness check that fails after this long ran out of time (the adapters' checks give up after 2 s); a
# refused connection or a "not live" answer comes back in milliseconds.
SLOW_PROBE_S = 1.5
DOWN_LOG_EVERY_S = 30.0  # how often a container that stays down is logged again


# Events under these prefixes can change what this container should hold.
@dataclass
class _Backoff:
    model: ModelVersion  # what failed: a different registration is worth a new try at once
    attempts: int = 0
    next_try: float = 0.0


def _reason(exc: BaseException) -> str:
    """An error's own words; with its type's name when it is not one of ours (a client's error, a bug)."""
    if isinstance(exc, LoadError | StoreError | OSError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def register_agent_gauges(telemetry: Telemetry, agents: Sequence[Agent]) -> None:
    """`modelyard_agent_registered{container}` for the agents of this process (one gauge for all of them:
    `modelyard up` runs several), so an alert can tell agents that stopped reporting (absent())."""
    telemetry.gauge(
        names.AGENT_REGISTERED,
        lambda: [(1.0 if a.registered else 0.0, {"container": a.container.id}) for a in agents],
        "1 while the agent's container is registered in the store",
    )


class Agent:
    def __init__(
        self,
        store: Store,
        container: Container,
        adapter: ContainerAdapter,
        *,
        lease_ttl_s: float = 10.0,
        max_parallel_loads: int | None = None,
        retry_base_s: float = 1.0,
        retry_max_s: float = 60.0,
        drain_s: float = 1.0,
        telemetry: Telemetry | None = None,
        follower: StoreFollower | None = None,
    ) -> None:
        """`follower`: a store follower shared with other components of this process (else its own)."""
        self.store = store
        self.container = container
        self.adapter = adapter
        self.lease_ttl_s = lease_ttl_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.drain_s = drain_s
        self.telemetry = telemetry
        self.loaded: dict[str, ModelVersion] = {}
        self.load_calls = 0  # loads sent to the container, for tests and metrics
        self.unload_calls = 0
        self.registrations = 0  # leases granted to this container, for tests and metrics
        self._measured: dict[str, int] = {}
        self._loaded_at: dict[str, float] = {}  # monotonic time each copy became ready, for eviction age
        self._load_backoff: dict[str, _Backoff] = {}
        self._unload_backoff: dict[str, _Backoff] = {}
        self._load_slots = asyncio.Semaphore(max_parallel_loads or PARALLEL_LOADS.get(container.backend, 4))
        self._wake = asyncio.Event()  # the reconcile loop has something to look at
        self._beat = asyncio.Event()  # the heartbeat should look now rather than at its next period
        self._fleet = Fleet()
        self._fleet_loaded = asyncio.Event()
        self._shared_follower = follower
        self._reports: dict[str, CopyState] = {}  # copy states waiting for the next store write
        self._flusher: asyncio.Task[None] | None = None
        self._lease: Lease | None = None
        self._registered = asyncio.Event()
        # True while the agent does not know what the container holds (start, container down/restarted).
        self._holdings_unknown = True
        self._registration_gone = False  # our container key vanished from the store while we held a lease
        self._slow_strikes = 0  # consecutive liveness checks that timed out (rather than being refused)
        self._saw_exit = False  # a supervisor saw the container's process exit since the last beat
        self._down_since: float | None = None  # when liveness checks began to fail, for the log
        self._down_logged = 0.0
        self.converged = asyncio.Event()  # set whenever a reconcile pass leaves nothing to do

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Registers (while the container answers), then reconciles until cancelled.

        Cancelled (an orderly stop), it withdraws the container. If one of its loops crashes (a bug), it
        raises and keeps the lease: run it again and it carries on where it was, without a reload.
        """
        self._holdings_unknown = True
        tasks = [
            asyncio.create_task(self._follow(), name=f"agent-{self.container.id}-follow"),
            asyncio.create_task(self._heartbeat(), name=f"agent-{self.container.id}-heartbeat"),
            asyncio.create_task(self._reconcile_forever(), name=f"agent-{self.container.id}-reconcile"),
        ]
        stopping = False
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    # Not our own stop (that cancels run() itself, which does not get here): something
                    # under the loop raised CancelledError, as grpc.aio does in a call whose channel was
                    # closed. A crash like any other: run() raises, and its supervisor runs it again.
                    raise RuntimeError(f"agent loop {task.get_name()} was cancelled from within")
                task.result()  # raises what stopped it
            raise RuntimeError("an agent loop returned")
        except asyncio.CancelledError:
            stopping = True
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if stopping and self._lease is not None:
                lease, self._lease = self._lease, None
                self._registered.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await lease.revoke()

    @property
    def registered(self) -> bool:
        return self._lease is not None

    async def wait_registered(self) -> None:
        await self._registered.wait()

    @property
    def failed_unloads(self) -> set[str]:
        """Keys whose unload failed and will be tried again."""
        return set(self._unload_backoff)

    def container_restarted(
        self, address: str | None = None, adapter: ContainerAdapter | None = None
    ) -> None:
        """A supervisor restarted the container: it holds nothing now, perhaps at a new address.

        With a new address, `adapter` talks to it; the container is registered again under that address.
        The caller closes the old adapter.
        """
        if address is not None and address != self.container.address:
            self.container = replace(self.container, address=address)
            self._registration_gone = True  # put the container's key again, with the new address
        if adapter is not None:
            self.adapter = adapter
        self._holdings_unknown = True
        self._beat.set()

    def check_container(self) -> None:
        """Look at the container now (a supervisor saw it exit) rather than at the next heartbeat."""
        self._saw_exit = True
        self._beat.set()

    # -- following the store -----------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Keeps `_fleet` current through the one store follower (placement/follow.py), until cancelled."""
        follower = self._shared_follower or StoreFollower(self.store, name=f"agent {self.container.id}")
        follower.listen(self._on_change)
        follower.start()  # idempotent: a shared follower may be running already
        try:
            await asyncio.Event().wait()
        finally:
            follower.unlisten(self._on_change)
            if follower is not self._shared_follower:
                await follower.stop()

    def _on_change(self, fleet: Fleet, changes: Changes) -> None:
        cid = self.container.id
        self._fleet = fleet
        self._fleet_loaded.set()
        if changes.everything:
            self._wake.set()
            return
        mine = fleet.by_container.get(cid, set())
        relevant = False
        for key in changes.registrations:
            if key in fleet.models and self._load_backoff.pop(key, None) is not None:
                # A new registration (a fixed archive) gets a failed load tried again now, not after backoff.
                log.info("container %s: %s registered again; retrying its load", cid, key)
            if key in mine or key in self.loaded:
                relevant = True
        if not relevant:
            relevant = any(key in mine or key in self.loaded for key in changes.assigned)
        if not relevant:  # a call waits for a model assigned here and not loaded yet: load it next
            relevant = any(key in mine and key not in self.loaded for key in changes.wanted)
        if cid in changes.containers and cid not in fleet.containers and self._lease is not None:
            self._registration_gone = True
            self._beat.set()
        if relevant:
            self._wake.set()

    def _desired(self) -> dict[str, ModelVersion]:
        fleet = self._fleet
        return {key: fleet.models[key] for key in fleet.copies_on(self.container.id) if key in fleet.models}

    # -- registration --------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Keeps the container registered while it answers ServerLive, and withdraws it when it stops.

        Withdrawing (revoking the lease) is what tells the placement controller to re-place its copies; a
        container that comes back is registered again and the agent asks it what it still holds.
        """
        await self._fleet_loaded.wait()  # what the container holds is matched against registered models
        while True:
            self._beat.clear()
            try:
                await self._beat_once()
            except Exception as exc:  # one bad beat (a store error, a client bug) must not stop the next
                log.warning("container %s: heartbeat failed (%s); retrying", self.container.id, _reason(exc))
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancel that stops us
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_ttl_s / 3):
                    await self._beat.wait()

    async def _beat_once(self) -> None:
        started = time.monotonic()
        try:
            # asyncio.timeout, never wait_for, in this module: on Python 3.11 wait_for can swallow the
            # cancellation that stops the agent, and the loop goes on (seen: `up` not stopping at Ctrl-C).
            async with asyncio.timeout(max(3.0, self.lease_ttl_s / 3)):
                live = await self.adapter.live()
        except Exception as exc:  # the client itself failing says as little about the container
            log.warning("container %s: liveness check failed: %s", self.container.id, _reason(exc))
            live = False
        saw_exit, self._saw_exit = self._saw_exit, False
        if not live:
            # A refused or negative answer means the container is gone: withdraw at once, so its copies are
            # re-placed. A check that only ran out of time is a starved machine as often as a dead
            # container: it takes a second slow check in a row (one period later) to withdraw it.
            slow = time.monotonic() - started >= SLOW_PROBE_S
            if slow and not saw_exit and self._lease is not None and self._slow_strikes == 0:
                self._slow_strikes += 1
                log.warning(
                    "container %s did not answer within %.1f s; withdrawing it if the next check is as slow",
                    self.container.id,
                    time.monotonic() - started,
                )
                await self._refresh_lease()
                return
            self._slow_strikes = 0
            self._holdings_unknown = True  # whatever comes back at this address is asked what it holds
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
            if self._lease is not None:
                log.warning("container %s does not answer; withdrawing it", self.container.id)
                self._down_logged = now
                lease, self._lease = self._lease, None
                self._registered.clear()
                async with asyncio.timeout(self.lease_ttl_s):
                    await lease.revoke()
            elif now - self._down_logged >= DOWN_LOG_EVERY_S:
                self._down_logged = now
                log.warning(
                    "container %s still does not answer (for %.0f s); it is registered again once it does",
                    self.container.id,
                    now - self._down_since,
                )
            return
        self._slow_strikes = 0
        if self._down_since is not None:
            down_s = time.monotonic() - self._down_since
            log.info("container %s answers again after %.1f s", self.container.id, down_s)
            self._down_since = None
        if self._holdings_unknown:
            await self._sync_holdings()
            if self._lease is not None:
                await self._report_states()  # copies the container lost stop looking ready
        if self._lease is None:
            await self._register()
            return
        if self._registration_gone:
            # Our key vanished (expired lease, a hand edit) or the address changed: put it again under the
            # lease we hold; if the lease itself is gone, the put fails and we take a new one.
            self._registration_gone = False
            try:
                await self._report_states()
                await registry.register_container(self.store, self.container, self._lease)
                return
            except StoreUnavailable:
                raise
            except StoreError:
                await self._register()
                return
        await self._refresh_lease()

    async def _refresh_lease(self) -> None:
        assert self._lease is not None
        try:
            async with asyncio.timeout(max(1.0, self.lease_ttl_s / 3)):
                await self._lease.refresh()
        except (StoreUnavailable, TimeoutError) as exc:
            # The store may come back before the lease runs out: keep it and refresh again next beat.
            log.warning("container %s: cannot refresh its lease (%s)", self.container.id, _reason(exc))
        except StoreError as exc:
            log.warning("container %s: lease lost (%s); registering again", self.container.id, exc)
            await self._register()

    async def _register(self) -> None:
        """A new lease, the copies' states as they are, then the container's key (which routers wait for)."""
        self._lease = None
        self._registered.clear()
        lease = await self.store.grant_lease(self.lease_ttl_s)
        try:
            await self._report_states()
            await registry.register_container(self.store, self.container, lease)
        except BaseException:
            with contextlib.suppress(Exception):
                await lease.revoke()
            raise
        self._lease = lease
        self._registration_gone = False
        self.registrations += 1
        self._registered.set()
        self._wake.set()
        log.info("container %s registered at %s", self.container.id, self.container.address)

    async def _sync_holdings(self) -> None:
        """`loaded` becomes what the container says it holds: models it lost are loaded again, models it
        holds that we did not know of (an agent restart) are kept if assigned and unloaded if not."""
        try:
            async with asyncio.timeout(30):
                held = await self.adapter.ready_versions()
        except Exception as exc:
            log.warning("container %s: cannot list its models (%s)", self.container.id, _reason(exc))
            return  # still unknown: asked again next beat
        models = self._fleet.models
        for key in [k for k in self.loaded if k not in held]:
            self.loaded.pop(key)
            self._measured.pop(key, None)
            self._loaded_at.pop(key, None)  # lost by the container (a restart), not evicted
        for key in held - self.loaded.keys():
            self._loaded_at[key] = time.monotonic()  # loaded before this agent knew: its age starts now
            if key in models:
                self.loaded[key] = models[key]
                continue
            try:
                name, version = split_model_key(key)
            except ValueError:
                continue
            # Not registered (any more): enough to unload it by name and version.
            self.loaded[key] = ModelVersion(name, version, backend=self.container.backend)
        self._holdings_unknown = False
        await self._clear_full_marks()  # started, or the container restarted: its memory is free again
        self._wake.set()

    async def _report_states(self) -> None:
        """Writes the states of the copies assigned here where the store's differ from the truth: ready
        for those loaded (no reload), loading for those the container lost."""
        cid = self.container.id
        puts: dict[str, bytes] = {}
        for key, model in self._desired().items():
            recorded = self._fleet.states.get((cid, key))
            if self.loaded.get(key) == model:
                measured = self._measured.get(key) or (recorded.measured_bytes if recorded else 0)
                state = CopyState("ready", measured_bytes=measured)
            elif recorded is not None and recorded.phase == "ready":
                state = CopyState("loading")
            else:
                continue
            if recorded != state:
                puts[registry.state_key(cid, key)] = state.to_json()
        if puts:
            await self.store.apply(puts)

    # -- reconciling ---------------------------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        failures = 0
        while True:
            # Clear before the pass, not after: a change that lands during the pass must wake the next one.
            self._wake.clear()
            try:
                delay = await self.reconcile()
                failures = 0
            except Exception:  # a bug: log it, and try again rather than stop converging
                failures += 1
                delay = min(self.retry_max_s, self.retry_base_s * 2 ** (failures - 1))
                log.exception(
                    "container %s: reconcile pass failed; again in %.0f s", self.container.id, delay
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def reconcile(self) -> float | None:
        """One pass: load what is missing, unload what is extra. Returns when to retry failures (s)."""
        if self._lease is None or self._holdings_unknown or not self._fleet_loaded.is_set():
            return None  # nothing to converge until registered and sure of what the container holds
        desired = self._desired()
        now = time.monotonic()
        for key, backoff in list(self._load_backoff.items()):
            if key not in desired:
                del self._load_backoff[key]  # no longer wanted here: its failed state goes too,
                state = self._fleet.states.get((self.container.id, key))
                if state is not None and state.container_full:
                    continue  # unless it says the container is full: placement reads it until memory frees
                with contextlib.suppress(Exception):
                    await registry.delete_copy_state(self.store, self.container.id, key)
            elif backoff.model != desired[key]:
                del self._load_backoff[key]  # registered anew (a fixed archive): worth a try now
        for key in [k for k in self._unload_backoff if k in desired or k not in self.loaded]:
            del self._unload_backoff[key]
        to_load = [
            m
            for key, m in desired.items()
            if self.loaded.get(key) != m and self._due(self._load_backoff.get(key), now)
        ]
        to_unload = [
            m
            for key, m in self.loaded.items()
            if key not in desired and self._due(self._unload_backoff.get(key), now)
        ]
        # Models a call waits for (wanted) first; a bounded slice per pass, so one wanted later does not
        # queue behind thousands of loads of a bulk import.
        wanted = self._fleet.wanted
        to_load.sort(key=lambda m: m.key not in wanted)
        more = len(to_load) > LOAD_SLICE
        await asyncio.gather(*(self._load(m) for m in to_load[:LOAD_SLICE]))
        if more:
            self._wake.set()
            self.converged.clear()
            return None
        # Loads first: a copy moving here must be up before anything else leaves (make-before-break).
        await asyncio.gather(*(self._unload(m) for m in to_unload))
        pending = [b.next_try for b in (*self._load_backoff.values(), *self._unload_backoff.values())]
        if not pending and all(self.loaded.get(k) == m for k, m in desired.items()):
            self.converged.set()
        else:
            self.converged.clear()
        return max(0.05, min(pending) - time.monotonic()) if pending else None

    @staticmethod
    def _due(backoff: _Backoff | None, now: float) -> bool:
        return backoff is None or backoff.next_try <= now

    def _failed(self, table: dict[str, _Backoff], model: ModelVersion) -> float:
        """Records one more failure of `model` in `table`; returns the delay before the next try."""
        backoff = table.get(model.key)
        if backoff is None or backoff.model != model:
            backoff = table[model.key] = _Backoff(model)
        backoff.attempts += 1
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** (backoff.attempts - 1))
        backoff.next_try = time.monotonic() + delay
        return delay

    async def _load(self, model: ModelVersion) -> None:
        cid = self.container.id
        async with self._load_slots:
            self._report_soon(model.key, CopyState("loading"))  # not waited for: see _report_soon
            self.load_calls += 1
            started = time.monotonic()
            try:
                await self.adapter.load(model)
            except Exception as exc:  # LoadError, tritonclient's or grpc's errors, anything: a failed copy
                self._observe_load("failed", started)
                delay = self._failed(self._load_backoff, model)
                reason = _reason(exc)
                log.warning(
                    "container %s: load of %s failed (%s); retry in %.0f s", cid, model.key, reason, delay
                )
                full = isinstance(exc, ContainerFull)
                state = CopyState("failed", message=reason, container_full=full)
            else:
                self._observe_load("ready", started)
                self._load_backoff.pop(model.key, None)
                self.loaded[model.key] = model
                self._loaded_at[model.key] = time.monotonic()
                measured = self._measured[model.key] = await self._measure(model)
                state = CopyState("ready", measured_bytes=measured)
        # The slot is free for the next load while the state is written: a busy store (a bulk load's
        # thousands of reports) no longer holds the container's loads back.
        await self._report(model.key, state)

    def _observe_load(self, outcome: str, started: float) -> None:
        if self.telemetry is not None and self.telemetry.metrics:
            self.telemetry.agent_loads.add(1, {"container": self.container.id, "outcome": outcome})
            took_s = time.monotonic() - started
            self.telemetry.agent_load_duration.record(took_s, {"container": self.container.id})
            if outcome == "ready":
                self.telemetry.model_load.record(took_s, {"backend": self.container.backend})

    async def _measure(self, model: ModelVersion) -> int:
        """The copy's real footprint (declared sizes lie); 0 when the container cannot tell."""
        try:
            return await self.adapter.footprint(model)
        except Exception as exc:  # measuring is best effort and must never fail a load
            log.warning("container %s: cannot measure %s: %s", self.container.id, model.key, exc)
            return 0

    async def _unload(self, model: ModelVersion) -> None:
        cid, key = self.container.id, model.key
        retry = key in self._unload_backoff
        if not retry:
            await self._report(key, CopyState("unloading"))
            # Routers stop choosing this copy when they see the new map or this state (well under a
            # second); calls already sent finish meanwhile. Triton also lets in-flight requests complete.
            await asyncio.sleep(self.drain_s)
        self.unload_calls += 1
        try:
            await self.adapter.unload(model)
        except Exception as exc:
            if not await self._still_held(key):
                log.info("container %s: unload of %s failed (%s) but it is gone", cid, key, _reason(exc))
            else:
                delay = self._failed(self._unload_backoff, model)
                reason = _reason(exc)
                log.warning(
                    "container %s: unload of %s failed (%s); retry in %.0f s", cid, key, reason, delay
                )
                await self._report(key, CopyState("unloading", message=f"unload failed: {reason}"))
                return
        self._unload_backoff.pop(key, None)
        self.loaded.pop(key, None)
        self._measured.pop(key, None)
        loaded_at = self._loaded_at.pop(key, None)
        if loaded_at is not None and self.telemetry is not None and self.telemetry.metrics:
            backend = {"backend": self.container.backend}
            self.telemetry.evictions.add(1, backend)
            self.telemetry.eviction_age.record(time.monotonic() - loaded_at, backend)
        with contextlib.suppress(Exception):
            await registry.delete_copy_state(self.store, cid, key)
        await self._clear_full_marks()  # memory was freed: the container may take a model again

    async def _clear_full_marks(self) -> None:
        """Deletes this container's "full" marks (failed copies it refused for lack of memory, SageMaker's
        507) that the map no longer assigns here: kept after the copy moved, they stop placement from
        sending the container more until it frees memory (an unload) or restarts."""
        cid = self.container.id
        desired = self._fleet.by_container.get(cid, set())
        marks = [k for k, cids in self._fleet.full_copies.items() if cid in cids and k not in desired]
        for key in marks:
            with contextlib.suppress(Exception):
                await registry.delete_copy_state(self.store, cid, key)

    async def _still_held(self, key: str) -> bool:
        try:
            async with asyncio.timeout(10):
                return key in await self.adapter.ready_versions()
        except Exception:
            return True  # cannot tell: assume it is, and try the unload again

    async def _report(self, key: str, state: CopyState) -> None:
        """Records a copy's state; reports made together go to the store in one write.

        Thousands of loads report twice each: one store write per report would make the store, not the
        container, the bottleneck of a bulk load (and wake every follower once per report).
        """
        await asyncio.shield(self._report_soon(key, state))

    def _report_soon(self, key: str, state: CopyState) -> asyncio.Task[None]:
        """Records a copy's state for the next write without waiting for it. A load's "loading" goes this
        way: the container is called at once, and when the store is busy (a bulk load) a fast load's
        "ready" replaces its "loading" before that is written: one write and one event for every follower
        instead of two. The order of a copy's states is kept (one pending state per copy, writes in turn).
        """
        self._reports[key] = state
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_reports())
        return self._flusher

    async def _flush_reports(self) -> None:
        await asyncio.sleep(0)  # let the reports of loads finishing together join this write
        while self._reports:
            batch, self._reports = self._reports, {}
            puts = {registry.state_key(self.container.id, k): s.to_json() for k, s in batch.items()}
            try:
                await self.store.apply(puts)
            except Exception as exc:
                log.warning(
                    "container %s: cannot report %d copy states (e.g. %s): %s",
                    self.container.id,
                    len(batch),
                    next(iter(batch)),
                    exc,
                )
