"""The data model shared by placement, backends and router: plain frozen dataclasses, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Literal, TypeVar

Kind = Literal["gpu", "cpu", "any"]
ContainerKind = Literal["gpu", "cpu"]
Backend = Literal["triton", "custom", "sagemaker", "mlserver"]
CopyPhase = Literal["loading", "ready", "failed", "unloading", "lost"]

MODEL_KINDS: tuple[str, ...] = ("gpu", "cpu", "any")
CONTAINER_KINDS: tuple[str, ...] = ("gpu", "cpu")
BACKENDS: tuple[str, ...] = ("triton", "custom", "sagemaker", "mlserver")
# Containers that know each version as a model of its own named `name@version` (containers/triton/adapter.py,
# containers/mlserver/adapter.py): the router sends that name and shows the public one in answers.
PER_VERSION_NAME_BACKENDS: tuple[str, ...] = ("triton", "mlserver")
COPY_PHASES: tuple[str, ...] = ("loading", "ready", "failed", "unloading", "lost")
# Calls a container runs at once when its registration names no bound (`max_inflight` 0): about what its
# server runs in parallel before calls only wait inside it. Above the bound, routers queue calls per tenant
# and serve the queues in turn (router/fair_queue.py), so one tenant's flood cannot fill the container.
DEFAULT_MAX_INFLIGHT: dict[str, int] = {"triton": 16, "custom": 16, "mlserver": 8, "sagemaker": 4}

T = TypeVar("T")


def _pairs(value: Any, second: type) -> tuple[tuple[Any, Any], ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, list)
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], second)
        and not isinstance(p[1], bool)
        for p in value
    ):
        raise ValueError(f"expected [string, {second.__name__}] pairs, got {value!r}")
    return tuple((p[0], p[1]) for p in value)


_KINDS = {
    "str": "str",
    "Kind": "str",
    "ContainerKind": "str",
    "Backend": "str",
    "CopyPhase": "str",
    "int": "int",
    "bool": "bool",
    "tuple[str, ...]": "strs",
    "tuple[tuple[str, str], ...]": "str_pairs",
    "tuple[tuple[str, int], ...]": "int_pairs",
}
_FIELD_KINDS: dict[type, dict[str, str]] = {}


def _field_kinds(cls: type) -> dict[str, str]:
    """Field name -> the check it needs, worked out once per class."""
    kinds = _FIELD_KINDS.get(cls)
    if kinds is None:
        kinds = {}
        for f in fields(cls):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if kind not in _KINDS:
                raise TypeError(f"{cls.__name__}.{f.name}: no check for type {kind}")
            kinds[f.name] = _KINDS[kind]
        _FIELD_KINDS[cls] = kinds
    return kinds


_SORTED_FIELDS: dict[type, tuple[str, ...]] = {}


def dataclass_json(obj: Any) -> bytes:
    """The stored JSON of a flat dataclass (every store value that is one), keys sorted: what
    `json.dumps(asdict(obj), sort_keys=True)` gives, without asdict's deep copy (a bulk import encodes
    100,000 models: 10 us each instead of 42)."""
    names = _SORTED_FIELDS.get(obj.__class__)
    if names is None:
        names = _SORTED_FIELDS[obj.__class__] = tuple(sorted(f.name for f in fields(obj)))
    return json.dumps({name: getattr(obj, name) for name in names}).encode()


def _typed(cls: type[T], raw: bytes | str, choices: dict[str, tuple[str, ...]] | None = None) -> T:
    """Builds `cls` from untrusted JSON: unknown fields dropped, every known field type-checked.

    Store values are written by other processes (or by hand): a wrong type must fail here, with a clear
    ValueError, rather than deep inside a planner or a router later.
    """
    data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    kinds = _field_kinds(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        kind = kinds.get(name)
        if kind is None:
            continue
        if kind == "str":
            if value.__class__ is not str:
                raise ValueError(f"{name}: expected a string, got {value!r}")
        elif kind == "int":
            if value.__class__ is not int or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        elif kind == "bool":
            if value.__class__ is not bool:
                raise ValueError(f"{name}: expected true or false, got {value!r}")
        elif kind == "strs":
            if value.__class__ is not list:
                raise ValueError(f"{name}: expected a list of strings, got {value!r}")
            for x in value:
                if x.__class__ is not str:
                    raise ValueError(f"{name}: expected a list of strings, got {value!r}")
            value = tuple(value)
        else:
            value = _pairs(value, str if kind == "str_pairs" else int)
        values[name] = value
    for name, allowed in (choices or {}).items():
        if name in values:
            if values[name] not in allowed:
                raise ValueError(f"{name}: {values[name]!r} is not one of {', '.join(allowed)}")
            values[name] = allowed[allowed.index(values[name])]  # one string per choice, not one per value
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{cls.__name__}: {exc}") from exc


Tensors = tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, datatype, shape), in declared order


def signature_json(inputs: Tensors, outputs: Tensors, decoupled: bool) -> str:
    """The one stored spelling of a model's signature (ModelVersion.signature): compact JSON, keys sorted,
    tensors in the order the model declares them."""
    return json.dumps(
        {
            "inputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in inputs],
            "outputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in outputs],
            "decoupled": decoupled,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


# Models made from one archive share one signature: every registration a follower reads checks it, so a
# 100k import into a fleet of ten archives checked the same ten strings 100k times (~10% of a router's CPU).
@lru_cache(maxsize=4096)
def parse_signature(text: str) -> tuple[Tensors, Tensors, bool]:
    """(inputs, outputs, decoupled) from a stored signature; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"signature: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or set(data) != {"inputs", "outputs", "decoupled"}:
        raise ValueError(f"signature: expected an object with inputs, outputs and decoupled, got {text!r}")
    if data["decoupled"].__class__ is not bool:
        raise ValueError(f"signature: decoupled must be true or false, got {data['decoupled']!r}")
    tensors: list[Tensors] = []
    for what in ("inputs", "outputs"):
        items = data[what]
        if items.__class__ is not list or not items:
            raise ValueError(f"signature: {what} must be a non-empty list")
        out = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"name", "datatype", "shape"}:
                raise ValueError(f"signature: each of {what} needs name, datatype and shape, got {item!r}")
            name, datatype, shape = item["name"], item["datatype"], item["shape"]
            if (
                name.__class__ is not str
                or datatype.__class__ is not str
                or shape.__class__ is not list
                or not all(d.__class__ is int and d >= -1 for d in shape)
            ):
                raise ValueError(f"signature: {what} entry {item!r} has the wrong types")
            out.append((name, datatype, tuple(shape)))
        tensors.append(tuple(out))
    return tensors[0], tensors[1], data["decoupled"]


def model_key(name: str, version: str) -> str:
    """The one spelling of a model version used as a map key and in store keys."""
    return f"{name}@{version}"


def version_order(version: str) -> tuple[int, int, str]:
    """Numeric versions sort by value and above non-numeric ones; the highest is the default version.

    The one ordering of versions, for the router's choice and our container's alike."""
    return (1, int(version), version) if version.isascii() and version.isdigit() else (0, 0, version)


def split_model_key(key: str) -> tuple[str, str]:
    name, _, version = key.rpartition("@")
    if not name:
        raise ValueError(f"not a model key (expected NAME@VERSION): {key!r}")
    return name, version


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered version of a model and what placement and routing need to know about it."""

    name: str
    version: str
    backend: Backend = "triton"
    kind: Kind = "cpu"
    memory_bytes: int = 0
    replicas: int = 1  # copies kept whatever the load; 0: load on demand (memory as a cache)
    artifact_uri: str = ""
    sha256: str = ""
    tenants: tuple[str, ...] = ()  # empty: public
    max_replicas: int = 0  # copies under load (placement/autoscale.py); 0: as many as `replicas`
    # Inputs, outputs and decoupled as `signature_json` spells it, stored at registration so nothing reads
    # the artifact to learn them; "" for versions registered before it was stored.
    signature: str = ""

    @property
    def key(self) -> str:
        return model_key(self.name, self.version)

    @property
    def most_copies(self) -> int:
        """The copies load may bring: `max_replicas`, never below `replicas` nor below one."""
        return max(self.replicas, self.max_replicas, 1)

    @property
    def on_demand(self) -> bool:
        """Loaded only while called (`replicas` 0): its copies may be evicted to make room."""
        return self.replicas == 0

    def visible_to(self, tenant: str | None) -> bool:
        return not self.tenants or (tenant is not None and tenant in self.tenants)

    def to_json(self) -> bytes:
        return dataclass_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelVersion:
        model = _typed(cls, raw, {"backend": BACKENDS, "kind": MODEL_KINDS})
        if not model.name or not model.version:
            raise ValueError("a model needs a name and a version")
        if model.signature:
            parse_signature(model.signature)
        return model


@dataclass(frozen=True, slots=True)
class Container:
    """A serving container (a Triton instance or our own) with its memory budget."""

    id: str
    address: str
    kind: ContainerKind = "cpu"
    memory_bytes: int = 0
    backend: Backend = "triton"
    labels: tuple[tuple[str, str], ...] = ()
    max_inflight: int = 0  # calls it runs at once, across routers; 0: its backend's DEFAULT_MAX_INFLIGHT

    @property
    def inflight_bound(self) -> int:
        return self.max_inflight or DEFAULT_MAX_INFLIGHT.get(self.backend, 16)

    def to_json(self) -> bytes:
        return dataclass_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Container:
        container = _typed(cls, raw, {"kind": CONTAINER_KINDS, "backend": BACKENDS})
        if not container.id or not container.address:
            raise ValueError("a container needs an id and an address")
        return container


@dataclass(frozen=True, slots=True)
class CopyState:
    """What an agent reports about one copy of a model version on its container."""

    phase: CopyPhase
    message: str = ""
    measured_bytes: int = 0
    # A failed load the container refused for lack of memory (SageMaker's 507): placement moves the copy
    # and counts the container as full while this state stands.
    container_full: bool = False

    def to_json(self) -> bytes:
        return dataclass_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> CopyState:
        return _typed(cls, raw, {"phase": COPY_PHASES})


@dataclass(frozen=True, slots=True)
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
        return dataclass_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> RouteRule:
        rule = _typed(cls, raw)
        if not rule.model:
            raise ValueError("a route rule needs a model name")
        return rule
