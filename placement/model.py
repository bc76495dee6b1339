"""The data model shared by placement, backends and router: plain frozen dataclasses, no I/O."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["gpu", "cpu", "any"]
ContainerKind = Literal["gpu", "cpu"]
Backend = Literal["triton", "custom"]
CopyPhase = Literal["loading", "ready", "failed", "unloading", "lost"]

MODEL_KINDS: tuple[str, ...] = ("gpu", "cpu", "any")
CONTAINER_KINDS: tuple[str, ...] = ("gpu", "cpu")


def model_key(name: str, version: str) -> str:
    """The one spelling of a model version used as a map key and in store keys."""
    return f"{name}@{version}"


def split_model_key(key: str) -> tuple[str, str]:
    name, _, version = key.rpartition("@")
    if not name:
        raise ValueError(f"not a model key (expected NAME@VERSION): {key!r}")
    return name, version


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model and what placement and routing need to know about it."""

    name: str
    version: str
    backend: Backend = "triton"
    kind: Kind = "cpu"
    memory_bytes: int = 0
    replicas: int = 1
    artifact_uri: str = ""
    sha256: str = ""
    tenants: tuple[str, ...] = ()  # empty: public

    @property
    def key(self) -> str:
        return model_key(self.name, self.version)

    def visible_to(self, tenant: str | None) -> bool:
        return not self.tenants or (tenant is not None and tenant in self.tenants)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelVersion:
        data: dict[str, Any] = json.loads(raw)
        data["tenants"] = tuple(data.get("tenants", ()))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Container:
    """A serving container (a Triton instance or our own) with its memory budget."""

    id: str
    address: str
    kind: ContainerKind = "cpu"
    memory_bytes: int = 0
    backend: Backend = "triton"
    labels: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Container:
        data: dict[str, Any] = json.loads(raw)
        data["labels"] = tuple(tuple(pair) for pair in data.get("labels", ()))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CopyState:
    """What an agent reports about one copy of a model version on its container."""

    phase: CopyPhase
    message: str = ""
    measured_bytes: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> CopyState:
        data: dict[str, Any] = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ShardMap:
    """Which containers should hold each model version (`name@version` -> container ids)."""

    generation: int = 0
    assignments: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteRule:
    """How calls for a model name pick a version when the request names none.

    Precedence: the request's explicit version, then the caller's tenant pin, then the weighted split
    (deterministic per request id), then `default_version`, then the highest version the caller may see.
    """

    model: str
    default_version: str = ""
    tenant_versions: tuple[tuple[str, str], ...] = ()  # (tenant, version) pins
    weights: tuple[tuple[str, int], ...] = ()  # (version, weight) split

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> RouteRule:
        data: dict[str, Any] = json.loads(raw)
        data["tenant_versions"] = tuple(tuple(pair) for pair in data.get("tenant_versions", ()))
        data["weights"] = tuple(tuple(pair) for pair in data.get("weights", ()))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
