"""Seeded placement workloads: a fleet of GPU (80 GB) and CPU (64 GB) containers and a heavy-tailed model mix.

Model sizes are lognormal (most models small, a few huge) clipped to [MIN_MODEL_BYTES, MAX_MODEL_BYTES],
then scaled so that the bytes of all copies reach a chosen fraction of the fleet's memory. Kinds are mixed
(pinned gpu, pinned cpu, any) and some models want 2 or 3 replicas.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from modelyard.placement.planner import Capacity, Demand

GB = 10**9
GPU_BYTES = 80 * GB
CPU_BYTES = 64 * GB
MIN_MODEL_BYTES = 20 * 10**6
MAX_MODEL_BYTES = 40 * GB
KIND_WEIGHTS = {"gpu": 0.3, "cpu": 0.3, "any": 0.4}
REPLICA_WEIGHTS = {1: 0.8, 2: 0.15, 3: 0.05}


def make_containers(count: int, *, gpu_fraction: float = 0.5, prefix: str = "") -> list[Capacity]:
    """`count` containers, the first `gpu_fraction` of them GPU, ids numbered so that they sort as created."""
    gpus = round(count * gpu_fraction)
    return [
        Capacity(f"{prefix}gpu-{i:05d}", GPU_BYTES, "gpu")
        if i < gpus
        else Capacity(f"{prefix}cpu-{i:05d}", CPU_BYTES, "cpu")
        for i in range(count)
    ]


def make_models(count: int, containers: Sequence[Capacity], demand: float, *, seed: int) -> list[Demand]:
    """`count` models whose copies need about `demand` x the containers' memory in all."""
    rng = random.Random(seed)
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=count)
    replicas = rng.choices(list(REPLICA_WEIGHTS), weights=list(REPLICA_WEIGHTS.values()), k=count)
    shape = [rng.lognormvariate(0.0, 1.3) for _ in range(count)]
    target = demand * sum(container.memory_bytes for container in containers)
    # Clipping changes the total, so find the scale by a few fixed-point steps.
    scale = target / sum(s * r for s, r in zip(shape, replicas, strict=True))
    for _ in range(8):
        sizes = [min(MAX_MODEL_BYTES, max(MIN_MODEL_BYTES, int(s * scale))) for s in shape]
        total = sum(size * r for size, r in zip(sizes, replicas, strict=True))
        scale *= target / total
    return [
        Demand(f"model-{i:06d}", size, r, kind)
        for i, (size, r, kind) in enumerate(zip(sizes, replicas, kinds, strict=True))
    ]


def demand_fraction(models: Sequence[Demand], containers: Sequence[Capacity]) -> float:
    wanted = sum(model.memory_bytes * model.replicas for model in models)
    return wanted / sum(container.memory_bytes for container in containers)


def write_models(path: Path, models: Sequence[Demand]) -> None:
    lines = (
        json.dumps({"name": m.name, "memory_bytes": m.memory_bytes, "replicas": m.replicas, "kind": m.kind})
        for m in models
    )
    path.write_text("".join(line + "\n" for line in lines))


def write_containers(path: Path, containers: Sequence[Capacity]) -> None:
    lines = (json.dumps({"id": c.id, "memory_bytes": c.memory_bytes, "kind": c.kind}) for c in containers)
    path.write_text("".join(line + "\n" for line in lines))
