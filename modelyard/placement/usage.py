"""What the shard map asks of each container: bytes and copies per container, copies on containers that
are gone, models short of copies. Pure functions of a Fleet snapshot (for `placement show`, metrics, plans).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelyard.placement.registry import Fleet


@dataclass(frozen=True)
class ContainerUsage:
    id: str
    kind: str
    capacity_bytes: int
    used_bytes: int
    copies: int
    live: bool

    @property
    def utilization(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


def usage(fleet: Fleet, assignments: Mapping[str, Sequence[str]]) -> list[ContainerUsage]:
    """Per container (live ones, and dead ones still holding copies): bytes used and copies."""
    used: dict[str, int] = {}
    copies: dict[str, int] = {}
    for key, ids in assignments.items():
        model = fleet.models.get(key)
        cost = fleet.budget_bytes(model) if model else 0
        for cid in ids:
            used[cid] = used.get(cid, 0) + cost
            copies[cid] = copies.get(cid, 0) + 1
    rows = [
        ContainerUsage(c.id, c.kind, c.memory_bytes, used.get(c.id, 0), copies.get(c.id, 0), True)
        for c in fleet.containers.values()
    ]
    rows += [
        ContainerUsage(cid, "?", 0, used[cid], copies[cid], False)
        for cid in used
        if cid not in fleet.containers
    ]
    return sorted(rows, key=lambda r: r.id)


def lost_copies(fleet: Fleet) -> list[tuple[str, str]]:
    """(model, container) for every assigned copy whose container's lease has expired."""
    return sorted(
        (key, cid) for key, ids in fleet.assignments.items() for cid in ids if cid not in fleet.containers
    )


def under_replicated(fleet: Fleet) -> dict[str, int]:
    """Registered models with fewer copies on live containers than their replicas: model -> live copies."""
    short = {}
    for key, model in fleet.models.items():
        live = sum(1 for cid in fleet.assignments.get(key, ()) if cid in fleet.containers)
        if live < model.replicas:
            short[key] = live
    return short
