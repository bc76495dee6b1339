"""Memory as a cache and copies that follow load (issue 15).

(a) `test_memory_as_a_cache`: 10,000 load-on-demand models on containers that fit 1,000, Zipf calls. Run at
    the controller level with the real store: a real etcd, the real PlacementController (incremental
    placement + the autoscaler's LRU evictions), the router's own RateCounter, RoutingTable and LazyLoader
    (the cold-call path of every real call), and simulated agents in place of containers (a copy is ready
    `LOAD_S` after it is assigned, and unloaded `DRAIN_S` after it leaves the map). A real fleet of 10,000
    models does not fit this machine; what is measured is the control path a cold call waits on. Warm
    latency is the router's time to a ready copy (no inference), cold the time a lazy load waits.
(b) `test_copies_follow_load`: Zipf load over 200 models on 4 containers, fixed copies vs follow-load, as a
    discrete-event simulation driven by the real policy (placement/autoscale.py plan_autoscale, the real
    planner for the first placement). Each container serves one call at a time (2 ms), the router picks
    the less busy of two ready copies; a new copy serves after 0.5 s of loading, a removed one at once
    stops taking calls. Same arrivals for both runs.

Run: ./dev bench -k autoscale (quick: --quick).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.conftest import Verdict
from modelyard.errors import ModelyardError
from modelyard.placement import registry
from modelyard.placement.autoscale import ModelLoad, Policy, Room, Timers, plan_autoscale
from modelyard.placement.controller import PlacementController
from modelyard.placement.follow import StoreFollower
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.planner import Capacity, Demand, plan
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store import Store, open_store
from modelyard.router.lazy import LazyLoader
from modelyard.router.rates import RateCounter
from modelyard.router.table import RoutingTable
from tests.conftest import EtcdServer

MiB = 1024**2
LOAD_S = 0.005
DRAIN_S = 0.05


def zipf_sampler(n: int, a: float, seed: int) -> Callable[[], int]:
    """Indexes 0..n-1 with P(rank k) ~ 1/k^a, ranks shuffled over the indexes."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n + 1) ** a
    order = rng.permutation(n)
    draws = iter(order[rng.choice(n, size=2_000_000, p=weights / weights.sum())].tolist())
    return lambda: next(draws)


class SimAgents:
    """Stands in for the agents: assigned copies turn ready after LOAD_S, removed ones are unloaded (state
    deleted) after DRAIN_S; state writes are batched into transactions like a real agent's reports."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: dict[str, set[str]] = {}
        self.puts: dict[str, bytes] = {}
        self.deletes: set[str] = set()
        self.flushing: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def on_change(self, fleet: Fleet, changes: Changes) -> None:
        keys = fleet.assignments.keys() | self.held.keys() if changes.everything else changes.assigned
        for key in keys:
            want, have = set(fleet.assignments.get(key, ())), self.held.setdefault(key, set())
            for cid in want - have:
                have.add(cid)
                self._later(LOAD_S, registry.state_key(cid, key), CopyState("ready", measured_bytes=0))
            for cid in have - want:
                have.discard(cid)
                self._later(DRAIN_S, registry.state_key(cid, key), None)

    def _later(self, delay_s: float, key: str, state: CopyState | None) -> None:
        async def write() -> None:
            await asyncio.sleep(delay_s)
            if state is None:
                self.deletes.add(key)
                self.puts.pop(key, None)
            else:
                self.puts[key] = state.to_json()
                self.deletes.discard(key)
            if self.flushing is None or self.flushing.done():
                self.flushing = asyncio.create_task(self._flush())

        task = asyncio.create_task(write())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _flush(self) -> None:
        await asyncio.sleep(0.002)
        while self.puts or self.deletes:
            puts, self.puts = list(self.puts.items())[:100], dict(list(self.puts.items())[100:])
            deletes = sorted(self.deletes)[: 100 - len(puts)]
            self.deletes -= set(deletes)
            await self.store.apply(dict(puts), deletes)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


async def _cache_run(url: str, models: int, slots: int, duration_s: float, workers: int) -> dict[str, float]:
    containers = 4
    async with open_store(url) as store:
        registered = [
            ModelVersion(f"m{i:05d}", "1", backend="custom", memory_bytes=MiB, replicas=0)
            for i in range(models)
        ]
        for start in range(0, models, 1000):
            await registry.create_models(store, registered[start : start + 1000])
        for c in range(containers):
            container = Container(
                f"c{c}", f"sim:{c}", memory_bytes=slots // containers * MiB, backend="custom"
            )
            await registry.register_container(store, container)
        follower = StoreFollower(store, name="bench")
        table = RoutingTable()
        agents = SimAgents(store)
        follower.listen(table.on_change)
        follower.listen(agents.on_change)
        controller = PlacementController(store, follower=follower, eager=False)
        rates = RateCounter(store, period_s=1.0, router_id="bench")
        lazy = LazyLoader(store, table)
        running = asyncio.create_task(controller.run())
        rates.start()
        await controller.leading.wait()
        while not table.fleet.leader:  # the leader key reaches the router's view through the watch
            await table.wait_changed(registry.LEADER, 1.0)
        pick = zipf_sampler(models, 1.1, seed=7)
        warm: list[float] = []
        cold: list[float] = []
        failed: dict[str, int] = {}
        stop_at = time.monotonic() + duration_s

        async def worker() -> None:
            while time.monotonic() < stop_at:
                model = registered[pick()]
                started = time.perf_counter()
                rates.count(model.key)
                if table.ready_copies(model.key):
                    warm.append(time.perf_counter() - started)
                    await asyncio.sleep(0)  # the call itself (not simulated): let the rest run
                    continue
                try:
                    await lazy.ready_copies(model, 30.0)
                    cold.append(time.perf_counter() - started)
                except ModelyardError as exc:
                    why = "no room" if "cannot be placed" in str(exc) else type(exc).__name__
                    failed[why] = failed.get(why, 0) + 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.monotonic() - began
        evictions = controller.autoscaler.evictions
        await rates.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        for task in list(agents.tasks):
            task.cancel()
        await follower.stop()
    calls = len(warm) + len(cold) + sum(failed.values())
    return {
        "calls": calls,
        "hit_rate": len(warm) / max(calls, 1),
        "warm_p50_ms": _percentile(warm, 50) * 1e3,
        "warm_p99_ms": _percentile(warm, 99) * 1e3,
        "cold_p50_ms": _percentile(cold, 50) * 1e3,
        "cold_p99_ms": _percentile(cold, 99) * 1e3,
        "evictions_per_min": evictions / elapsed * 60,
        "failed_no_room": failed.get("no room", 0),
        "failed_other": sum(v for k, v in failed.items() if k != "no room"),
        "elapsed_s": elapsed,
        "failures": failed,  # type: ignore[dict-item]
    }


def test_memory_as_a_cache(
    tmp_path: Path, quick: bool, verdict: Verdict, record: Callable[[str], None]
) -> None:
    models, slots, duration_s = (1000, 100, 3.0) if quick else (10_000, 1000, 60.0)
    (tmp_path / "etcd").mkdir()
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        f = asyncio.run(_cache_run(server.url, models, slots, duration_s, workers=16))
    finally:
        server.stop()
    calls, elapsed = f["calls"], f["elapsed_s"]
    print(f"\n{models} load-on-demand models, room for {slots}, Zipf a=1.1, {calls} calls in {elapsed:.0f} s")
    # Simulated agents, no containers and no inference: a warm "call" is the router's table lookup of a
    # ready copy, a cold one the control path a lazy load waits on (loads take LOAD_S by construction).
    record(
        f"SIMULATED agents (no containers, no inference calls): {models} models / {slots} slots, Zipf 1.1: "
        f"hit rate {f['hit_rate']:.1%}; warm p50 {f['warm_p50_ms']:.3f} p99 {f['warm_p99_ms']:.3f} ms "
        f"(a routing-table lookup, not a call); cold p50 {f['cold_p50_ms']:.0f} p99 {f['cold_p99_ms']:.0f} "
        f"ms (wanted -> evict -> drain {DRAIN_S * 1e3:.0f} ms -> place -> simulated load "
        f"{LOAD_S * 1e3:.0f} ms); {f['evictions_per_min']:.0f} evictions/min"
    )
    print(
        f"  simulated agents: hit rate {f['hit_rate']:.1%}; warm p50/p99 {f['warm_p50_ms']:.3f}/"
        f"{f['warm_p99_ms']:.3f} ms (table lookup, no call); cold p50/p99 {f['cold_p50_ms']:.0f}/"
        f"{f['cold_p99_ms']:.0f} ms (simulated {LOAD_S * 1e3:.0f} ms loads); "
        f"{f['evictions_per_min']:.0f} evictions/min"
    )
    verdict(
        "calls failed for lack of room",
        f"{f['failed_no_room']} (other failures {f['failed_other']}: {f['failures']})",
        "0",
        f["failed_no_room"] == 0,
    )


# -- (b) copies that follow load: a discrete-event simulation over the real policy ------------------------

SERVICE_S = 0.002  # one container serves one call at a time
LOADING_S = 0.5


def _simulate(follow: bool, duration_s: float, rate: float, seed: int) -> dict[str, float]:
    n_models, n_containers = 200, 4
    models = [f"m{i:03d}@1" for i in range(n_models)]
    ids = [f"c{c}" for c in range(n_containers)]
    capacity = 100  # memory units per container; each copy costs 1
    first = plan(
        [Demand(key, 1, 1, "cpu") for key in models], [Capacity(cid, capacity, "cpu") for cid in ids]
    ).assignments
    copies: dict[str, list[str]] = {key: list(first[key]) for key in models}
    ready_at: dict[tuple[str, str], float] = {}  # copies still loading: (model, container) -> ready time
    policy = Policy(copy_target_rps=100, scale_down_after_s=30, scale_up_after_s=10)
    timers = Timers()
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(n_models)]
    ranks = list(range(n_models))
    rng.shuffle(ranks)
    cumulative = np.cumsum([weights[ranks.index(i)] for i in range(n_models)])
    queue: dict[str, deque[float]] = {cid: deque() for cid in ids}  # completion times in system
    free_at = dict.fromkeys(ids, 0.0)
    latencies: list[float] = []
    counts: dict[str, int] = {}
    changes: list[tuple[float, str]] = []
    now, next_tick, served = 0.0, 1.0, 0
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, int(rate * duration_s * 1.1)))
    choices = np.searchsorted(
        cumulative, np.random.default_rng(seed + 1).random(len(arrivals)) * cumulative[-1]
    )
    for t, m in zip(arrivals.tolist(), choices.tolist(), strict=True):
        if t > duration_s:
            break
        now = t
        while follow and now >= next_tick:
            loads = []
            used = dict.fromkeys(ids, 0)
            for cs in copies.values():
                for cid in cs:
                    used[cid] += 1
            for key, cs in copies.items():
                if counts.get(key) or len(cs) > 1:
                    serving = sum(1 for cid in cs if ready_at.get((key, cid), 0.0) <= next_tick)
                    loads.append(
                        ModelLoad(
                            key, "custom", "cpu", 1, 1, 4, tuple(cs), serving, float(counts.get(key, 0)), 0.0
                        )
                    )
            rooms = [Room(cid, "custom", "cpu", capacity - used[cid]) for cid in ids]
            result = plan_autoscale(loads, rooms, policy, timers, next_tick)
            for key, new in result.changes.items():
                for cid in set(new) - set(copies[key]):
                    ready_at[(key, cid)] = next_tick + LOADING_S
                copies[key] = list(new)
                changes.append((next_tick, key))
            counts = {}
            next_tick += 1.0
        key = models[m]
        counts[key] = counts.get(key, 0) + 1
        ready = [cid for cid in copies[key] if ready_at.get((key, cid), 0.0) <= now]
        for cid in ready:
            q = queue[cid]
            while q and q[0] <= now:
                q.popleft()
        two = rng.sample(ready, 2) if len(ready) > 1 else ready
        cid = min(two, key=lambda c: len(queue[c]))
        done = max(now, free_at[cid]) + SERVICE_S
        free_at[cid] = done
        queue[cid].append(done)
        latencies.append(done - now)
        served += 1
    warm = [lat for lat, t in zip(latencies, arrivals.tolist(), strict=False) if t > duration_s / 3]
    # Flapping: changes per model per scale-down period, over the whole run (the ramp-up of a hot model
    # adds one copy per up-delay) and after the first third (warmed up).
    per_model_period: dict[tuple[str, int], int] = {}
    late_per_model_period: dict[tuple[str, int], int] = {}
    for t, key in changes:
        window = (key, int(t // policy.scale_down_after_s))
        per_model_period[window] = per_model_period.get(window, 0) + 1
        if t > duration_s / 3:
            late_per_model_period[window] = late_per_model_period.get(window, 0) + 1
    return {
        "p99_ms": _percentile(warm, 99) * 1e3,
        "p50_ms": _percentile(warm, 50) * 1e3,
        "throughput": served / duration_s,
        "changes_per_min": len(changes) / duration_s * 60,
        "late_changes_per_min": sum(1 for t, _ in changes if t > duration_s / 3) / (duration_s * 2 / 3) * 60,
        "max_changes_per_model_period": max(per_model_period.values(), default=0),
        "late_max_changes_per_model_period": max(late_per_model_period.values(), default=0),
    }


def test_copies_follow_load(quick: bool, verdict: Verdict, record: Callable[[str], None]) -> None:
    duration_s = 60.0 if quick else 600.0
    rate = 0.6 * 4 / SERVICE_S  # 60% of the fleet's capacity (1,200 calls/s)
    fixed = _simulate(False, duration_s, rate, seed=3)
    follow = _simulate(True, duration_s, rate, seed=3)
    # The simulation queues every call until served: calls/s equals the arrival rate by construction, so it
    # is shown as the offered load, never as a measured throughput.
    print(
        f"\nSIMULATION: Zipf 1.1 over 200 models, 4 containers of 500 calls/s, {rate:.0f} calls/s offered "
        f"(all served by construction), {duration_s:.0f} s simulated"
    )
    print(f"  {'':14} {'p50 ms':>8} {'p99 ms':>8} {'changes/min':>12}")
    for name, f in (("fixed copies", fixed), ("follow load", follow)):
        figures = f"{f['p50_ms']:8.1f} {f['p99_ms']:8.1f} {f['changes_per_min']:12.1f}"
        print(f"  {name:14} {figures}")
        record(
            f"SIMULATED {name}: p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms at {rate:.0f} calls/s "
            f"offered (every call served by construction), {f['changes_per_min']:.1f} copy changes/min "
            f"({f['late_changes_per_min']:.1f} after warm-up)"
        )
    ratio = fixed["p99_ms"] / follow["p99_ms"]
    verdict(
        "simulated p99 fixed / follow-load, same arrivals",
        f"{ratio:.1f}x ({fixed['p99_ms']:.1f} vs {follow['p99_ms']:.1f} ms)",
        ">= 2x",
        ratio >= 2,
    )
    verdict(
        "simulated copy changes per model per scale-down period after warm-up (most)",
        f"{follow['late_max_changes_per_model_period']} "
        f"(during ramp-up: {follow['max_changes_per_model_period']})",
        "<= 1",
        follow["late_max_changes_per_model_period"] <= 1,
    )
