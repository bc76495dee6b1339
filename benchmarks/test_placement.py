"""Placement benchmarks: `plan` as a process, packing against first-fit decreasing, moves on fleet changes.

Run with `pytest benchmarks/ --benchmark-only`. Each test records its figures in `benchmark.extra_info`
and in the table printed at the end. Targets (2 cores): 10k x 200 well under 0.5 s, 100k x 2,000 well
under 3 s and 1M x 10,000 within 10 s (issue 30; judged PASS / FALLS SHORT) as whole processes;
removal moves exactly the removed container's copies; addition moves <= 1.5x the new container's fair
share and leaves no container > 10 points above mean utilization.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmarks.workload import (
    GB,
    demand_fraction,
    make_containers,
    make_models,
    write_containers,
    write_models,
)
from modelyard.placement.planner import Capacity, Demand, Plan, plan

REPO = Path(__file__).resolve().parents[1]
SEED = 20240611
Record = Callable[[str], None]
Verdict = Callable[[str, str, str, bool], None]


def used_bytes(models: Sequence[Demand], assignments: dict[str, Any]) -> dict[str, int]:
    size = {model.name: model.memory_bytes for model in models}
    used: dict[str, int] = defaultdict(int)
    for name, ids in assignments.items():
        for container_id in ids:
            used[container_id] += size[name]
    return used


def budget_violations(
    models: Sequence[Demand], containers: Sequence[Capacity], assignments: dict[str, Any]
) -> int:
    used = used_bytes(models, assignments)
    return sum(used[c.id] > c.memory_bytes for c in containers)


def copies(assignments: dict[str, Any]) -> set[tuple[str, str]]:
    return {(name, container_id) for name, ids in assignments.items() for container_id in ids}


def utilization_spread(
    models: Sequence[Demand], containers: Sequence[Capacity], result: Plan
) -> dict[str, float]:
    """Per kind: mean utilization and how far the fullest container is above it, in percentage points."""
    used = used_bytes(models, result.assignments)
    spread = {}
    for kind in ("gpu", "cpu"):
        of_kind = [c for c in containers if c.kind == kind]
        mean = sum(used[c.id] for c in of_kind) / sum(c.memory_bytes for c in of_kind)
        fullest = max(used[c.id] / c.memory_bytes for c in of_kind)
        spread[f"{kind}_mean_pct"] = round(100 * mean, 1)
        spread[f"{kind}_max_above_mean_pts"] = round(100 * (fullest - mean), 1)
    return spread


# -- plan as a process: JSON in, JSON out ------------------------------------------------------------------


def modelyard_command() -> str:
    """The installed `modelyard` console script: what a user runs, start-up imports included."""
    script = Path(sys.executable).with_name("modelyard")
    found = str(script) if script.is_file() else shutil.which("modelyard")
    if found is None:
        pytest.fail("the modelyard console script is not installed (pip install -e .)", pytrace=False)
    return found


def run_plan_process(models: Path, containers: Path, out: Path, timeout_s: float = 120) -> None:
    subprocess.run(
        [
            modelyard_command(),
            "placement",
            "plan",
            "--models",
            str(models),
            "--containers",
            str(containers),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
        timeout=timeout_s,
    )


@pytest.mark.parametrize(
    ("model_count", "container_count", "rounds", "target_s"),
    [(10_000, 200, 5, 0.5), (100_000, 2_000, 3, 3.0)],
    ids=["10k-x-200", "100k-x-2000"],
)
def test_plan_process(
    benchmark: Any,
    record: Record,
    tmp_path: Path,
    model_count: int,
    container_count: int,
    rounds: int,
    target_s: float,
) -> None:
    containers = make_containers(container_count)
    models = make_models(model_count, containers, 0.7, seed=SEED)
    models_path, containers_path = tmp_path / "models.jsonl", tmp_path / "containers.jsonl"
    write_models(models_path, models)
    write_containers(containers_path, containers)
    outputs: list[bytes] = []
    times_s: list[float] = []

    def once() -> None:
        out = tmp_path / f"map-{len(outputs)}.json"
        started = time.perf_counter()
        run_plan_process(models_path, containers_path, out)
        times_s.append(time.perf_counter() - started)
        outputs.append(out.read_bytes())

    benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=0)
    document = json.loads(outputs[0])
    seconds = statistics.median(times_s)
    info = {
        "median_s": round(seconds, 3),
        "target_s": target_s,
        "placed_copies": sum(len(ids) for ids in document["assignments"].values()),
        "unplaced": len(document["unplaced"]),
        "budget_violations": budget_violations(models, containers, document["assignments"]),
        "byte_identical_reruns": all(output == outputs[0] for output in outputs),
    }
    benchmark.extra_info.update(info)
    record(
        f"{seconds:.2f} s median (target < {target_s} s), {info['placed_copies']} copies, "
        f"{info['unplaced']} unplaced, {info['budget_violations']} over budget, "
        f"reruns identical: {info['byte_identical_reruns']}"
    )
    assert info["budget_violations"] == 0
    assert info["byte_identical_reruns"]


PLAN_1M_TARGET_S = 10.0  # issue 30: 1,000,000 models x 10,000 containers as a whole process


def test_plan_process_1m_models_10k_containers(
    record: Record, verdict: Verdict, tmp_path: Path, quick: bool
) -> None:
    """`modelyard placement plan` at 1,000,000 models x 10,000 containers, once (quick: 10k x 100), timed as a
    user runs it: start-up, reading 80 MB of JSONL, planning, writing the map."""
    model_count, container_count = (10_000, 100) if quick else (1_000_000, 10_000)
    containers = make_containers(container_count)
    models = make_models(model_count, containers, 0.7, seed=SEED)
    models_path, containers_path = tmp_path / "models.jsonl", tmp_path / "containers.jsonl"
    write_models(models_path, models)
    write_containers(containers_path, containers)
    out = tmp_path / "map.json"
    started = time.perf_counter()
    run_plan_process(models_path, containers_path, out, timeout_s=600)
    seconds = time.perf_counter() - started
    document = json.loads(out.read_bytes())
    violations = budget_violations(models, containers, document["assignments"])
    record(
        f"{model_count:,} x {container_count:,}: {seconds:.1f} s, "
        f"{sum(len(ids) for ids in document['assignments'].values())} copies, "
        f"{len(document['unplaced'])} unplaced, {violations} over budget"
    )
    verdict(
        f"plan {model_count:,} models x {container_count:,} containers (whole process)",
        f"{seconds:.1f} s",
        f"<= {PLAN_1M_TARGET_S:.0f} s",
        seconds <= PLAN_1M_TARGET_S,
    )
    assert violations == 0


def test_plan_in_process_100k_models_2000_containers(benchmark: Any, record: Record) -> None:
    """The planner alone, without the process start and JSON of `test_plan_process`."""
    containers = make_containers(2_000)
    models = make_models(100_000, containers, 0.7, seed=SEED)
    times_s: list[float] = []

    def once() -> Plan:
        started = time.perf_counter()
        result = plan(models, containers)
        times_s.append(time.perf_counter() - started)
        return result

    result = benchmark.pedantic(once, rounds=3, iterations=1)
    seconds = statistics.median(times_s)
    benchmark.extra_info.update({"median_s": round(seconds, 3), "unplaced": len(result.unplaced)})
    record(f"{seconds:.2f} s median for plan() alone")


# -- packing against first-fit decreasing ------------------------------------------------------------------


class _MaxTree:
    """Free bytes of containers in a fixed order; finds the first container with at least `size` free."""

    def __init__(self, free: list[int]) -> None:
        self.size = 1
        while self.size < max(1, len(free)):
            self.size *= 2
        self.tree = [-1] * (2 * self.size)
        self.tree[self.size : self.size + len(free)] = free
        for node in range(self.size - 1, 0, -1):
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def set(self, i: int, value: int) -> None:
        node = self.size + i
        self.tree[node] = value
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2

    def get(self, i: int) -> int:
        return self.tree[self.size + i]

    def first(self, size: int) -> int | None:
        if self.tree[1] < size:
            return None
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= size else 2 * node + 1
        return node - self.size


def first_fit_decreasing(
    models: Sequence[Demand], containers: Sequence[Capacity], *, pinned_first: bool = False
) -> dict[str, list[str]]:
    """The reference: biggest model first (kind-pinned models before `any` ones if `pinned_first`), each
    copy on the first container (in fleet order) of an allowed kind with room, copies on distinct ones."""
    members = {kind: [c for c in containers if c.kind == kind] for kind in ("gpu", "cpu")}
    position = {c.id: i for i, c in enumerate(containers)}
    trees = {kind: _MaxTree([c.memory_bytes for c in members[kind]]) for kind in members}
    allowed = {"gpu": ("gpu",), "cpu": ("cpu",), "any": ("gpu", "cpu")}
    assignments: dict[str, list[str]] = {}
    for model in sorted(models, key=lambda m: (pinned_first and m.kind == "any", -m.memory_bytes, m.name)):
        chosen: list[tuple[str, int, int]] = []  # (kind, index in kind, free before)
        for _ in range(model.replicas):
            found = [(kind, trees[kind].first(model.memory_bytes)) for kind in allowed[model.kind]]
            candidates = [(position[members[kind][i].id], kind, i) for kind, i in found if i is not None]
            if not candidates:
                break
            _, kind, i = min(candidates)
            free = trees[kind].get(i)
            chosen.append((kind, i, free))
            trees[kind].set(i, -1)  # distinct containers: hidden until this model is done
        for kind, i, free in chosen:
            trees[kind].set(i, free - model.memory_bytes)
        if chosen:
            assignments[model.name] = [members[kind][i].id for kind, i, _ in chosen]
    return assignments


@pytest.mark.parametrize("demand", [0.70, 0.90, 0.97, 0.99, 1.02])
@pytest.mark.parametrize("model_count", [10_000, 2_000], ids=["10k-models", "2k-big-models"])
def test_bytes_placed_against_first_fit_decreasing(
    benchmark: Any, record: Record, model_count: int, demand: float
) -> None:
    """On 200 containers; 2k models for the same demand are 5x bigger on average, which packs harder."""
    containers = make_containers(200)
    models = make_models(model_count, containers, demand, seed=SEED)
    result = benchmark.pedantic(plan, args=(models, containers), rounds=3, iterations=1)
    reference = first_fit_decreasing(models, containers)
    pinned_reference = first_fit_decreasing(models, containers, pinned_first=True)
    capacity = sum(c.memory_bytes for c in containers)
    planned = sum(used_bytes(models, result.assignments).values())
    ffd = sum(used_bytes(models, reference).values())
    ffd_pinned = sum(used_bytes(models, pinned_reference).values())
    info = {
        "demand": round(demand_fraction(models, containers), 4),
        "planned_bytes_pct_of_capacity": round(100 * planned / capacity, 3),
        "ffd_bytes_pct_of_capacity": round(100 * ffd / capacity, 3),
        "planned_vs_ffd": round(planned / ffd, 4),
        "ffd_pinned_first_bytes_pct_of_capacity": round(100 * ffd_pinned / capacity, 3),
        "planned_vs_ffd_pinned_first": round(planned / ffd_pinned, 4),
        "planned_unplaced": len(result.unplaced),
        "ffd_unplaced": sum(len(reference.get(m.name, ())) < m.replicas for m in models),
        "ffd_pinned_first_unplaced": sum(len(pinned_reference.get(m.name, ())) < m.replicas for m in models),
        "budget_violations": budget_violations(models, containers, result.assignments),
        **utilization_spread(models, containers, result),
    }
    benchmark.extra_info.update(info)
    record(
        f"demand {info['demand']:.2f}: placed {info['planned_bytes_pct_of_capacity']}% of capacity "
        f"vs FFD {info['ffd_bytes_pct_of_capacity']}% (x{info['planned_vs_ffd']}), "
        f"vs pinned-first FFD {info['ffd_pinned_first_bytes_pct_of_capacity']}%, "
        f"unplaced {info['planned_unplaced']} vs {info['ffd_unplaced']} "
        f"/ {info['ffd_pinned_first_unplaced']}, "
        f"max above mean gpu {info['gpu_max_above_mean_pts']} / cpu {info['cpu_max_above_mean_pts']} pts"
    )
    assert info["budget_violations"] == 0


# -- moves when the fleet changes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_100k() -> tuple[list[Demand], list[Capacity], Plan]:
    containers = make_containers(2_000)
    models = make_models(100_000, containers, 0.7, seed=SEED)
    return models, containers, plan(models, containers)


def test_moves_after_removing_a_container(
    benchmark: Any, record: Record, fleet_100k: tuple[list[Demand], list[Capacity], Plan]
) -> None:
    models, containers, before = fleet_100k
    gone = containers[len(containers) // 3]
    remaining = [c for c in containers if c.id != gone.id]
    after = benchmark.pedantic(plan, args=(models, remaining, before.assignments), rounds=2, iterations=1)
    ideal = {copy for copy in copies(before.assignments) if copy[1] == gone.id}
    moved = copies(before.assignments) - copies(after.assignments)
    added = copies(after.assignments) - copies(before.assignments)
    info = {
        "removed": gone.id,
        "moved_copies": len(moved),
        "ideal_copies": len(ideal),
        "moved_over_ideal": round(len(moved) / len(ideal), 3),
        "replaced_copies": len(added),
        "newly_unplaced": len(after.unplaced) - len(before.unplaced),
        "budget_violations": budget_violations(models, remaining, after.assignments),
    }
    benchmark.extra_info.update(info)
    record(
        f"moved {info['moved_copies']} / ideal {info['ideal_copies']} = {info['moved_over_ideal']}, "
        f"{info['replaced_copies']} re-placed, {info['newly_unplaced']} newly unplaced"
    )
    assert moved == ideal
    assert info["budget_violations"] == 0


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_moves_after_adding_a_container(
    benchmark: Any, record: Record, fleet_100k: tuple[list[Demand], list[Capacity], Plan], kind: str
) -> None:
    models, containers, before = fleet_100k
    new = Capacity(f"new-{kind}", 80 * GB if kind == "gpu" else 64 * GB, kind)
    grown = [*containers, new]
    after = benchmark.pedantic(
        plan, args=(models, grown, before.assignments), kwargs={"rebalance": True}, rounds=2, iterations=1
    )
    size = {model.name: model.memory_bytes for model in models}
    moved = copies(before.assignments) - copies(after.assignments)
    moved_bytes = sum(size[name] for name, _ in moved)
    used = used_bytes(models, after.assignments)
    of_kind = [c for c in grown if c.kind == kind]
    placed_of_kind = sum(used[c.id] for c in of_kind)
    fair_bytes = new.memory_bytes / sum(c.memory_bytes for c in of_kind) * placed_of_kind
    kind_of = {c.id: c.kind for c in grown}
    copies_of_kind = sum(1 for _, container_id in copies(after.assignments) if kind_of[container_id] == kind)
    fair_copies = copies_of_kind * new.memory_bytes / sum(c.memory_bytes for c in of_kind)
    spread = utilization_spread(models, grown, after)
    info = {
        "moved_copies": len(moved),
        "fair_share_copies": round(fair_copies, 1),
        "moved_copies_over_fair_share": round(len(moved) / fair_copies, 3),
        "moved_bytes_over_fair_share": round(moved_bytes / fair_bytes, 3),
        "new_container_pct": round(100 * used[new.id] / new.memory_bytes, 1),
        "moves_onto_old_containers": sum(
            1 for _, c in copies(after.assignments) - copies(before.assignments) if c != new.id
        ),
        "budget_violations": budget_violations(models, grown, after.assignments),
        **spread,
    }
    benchmark.extra_info.update(info)
    record(
        f"moved {info['moved_copies']} copies = {info['moved_copies_over_fair_share']}x fair share "
        f"({info['moved_bytes_over_fair_share']}x in bytes), new container {info['new_container_pct']}% vs "
        f"mean {spread[kind + '_mean_pct']}%, max above mean {spread[kind + '_max_above_mean_pts']} pts"
    )
    assert info["budget_violations"] == 0
    assert info["moves_onto_old_containers"] == 0
