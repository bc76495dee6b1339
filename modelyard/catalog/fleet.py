"""The declarative fleet file (`modelyard apply -f FLEET.yaml`, `modelyard export`): its schema, parsing and
writing. Pure: no store, no archives read.

A fleet file lists model versions (an archive or folder to upload, or an artifact already in the model
store), pipelines (the spec `pipelines register` reads), route rules and, once this build has them, tenant
limits. Its shape is checked with a JSON Schema (the `jsonschema` library, Draft 2020-12); every error is
one line naming the path of the bad field (`models[2].replicas: -1 is less than the minimum of 0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelyard.placement.model import BACKENDS, MODEL_KINDS, ModelVersion, RouteRule, version_order
from modelyard.placement.pipeline import Pipeline, PipelineError, parse_pipeline

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_NAME = {"type": "string", "pattern": _NAME_PATTERN}
# `version: 1` in YAML is an integer: taken as "1", as `pipelines register` does.
_VERSION = {
    "anyOf": [{"type": "string", "pattern": _NAME_PATTERN}, {"type": "integer", "minimum": 0}],
}
_MODEL = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "version"],
    "properties": {
        "name": _NAME,
        "version": _VERSION,
        "archive": {"type": "string", "minLength": 1},
        "artifact": {"type": "string", "minLength": 1},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "backend": {"enum": list(BACKENDS)},
        "kind": {"enum": list(MODEL_KINDS)},
        "memory_bytes": {"type": "integer", "minimum": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "max_replicas": {"type": "integer", "minimum": 0},
        "tenants": {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True},
    },
}
_ROUTE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["model"],
    "properties": {
        "model": _NAME,
        "default": _VERSION,
        "pins": {"type": "object", "additionalProperties": _VERSION},
        "split": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "models": {"type": ["array", "null"], "items": _MODEL},
        # The rest of a pipeline is checked by placement/pipeline.py, the parser `pipelines register` uses.
        "pipelines": {
            "type": ["array", "null"],
            "items": {"type": "object", "required": ["name", "version", "inputs", "outputs", "steps"]},
        },
        "routes": {"type": ["array", "null"], "items": _ROUTE},
        "tenants": {
            "type": ["array", "null"],
            "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        },
    },
}


class FleetFileError(ValueError):
    """The fleet file is refused; the message is one line naming the path of the bad field."""


@dataclass(frozen=True)
class ModelEntry:
    """One model version as the file wants it; `archive` (to check and upload) or `artifact` (stored)."""

    where: str  # "models[3]", for messages
    name: str
    version: str
    archive: Path | None = None
    artifact: str = ""
    sha256: str = ""  # the archive or artifact must have this hash ("": any)
    backend: str = ""  # the archive must be for this backend ("": any)
    kind: str = "cpu"
    memory_bytes: int | None = None  # None: declared by the archive
    replicas: int = 1
    max_replicas: int = 0
    tenants: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class FleetSpec:
    models: tuple[ModelEntry, ...] = ()
    pipelines: tuple[tuple[str, Pipeline], ...] = ()  # (where, pipeline)
    routes: tuple[tuple[str, RouteRule], ...] = ()  # (where, rule)
    tenants: tuple[dict[str, Any], ...] = ()  # tenant limits, as written (applied once the build has them)


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _version(value: Any) -> str:
    return str(value)


class _FleetLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data only) that refuses a key given twice in one mapping: plain YAML keeps
    the last one silently, and a fleet file's second `replicas:` must not hide its first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse(text: str, origin: str, base: Path) -> FleetSpec:
    """The fleet in `text` (YAML or JSON; `origin` names it in errors), archive paths relative to `base`."""
    try:
        data = yaml.load(text, Loader=_FleetLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark is not None else origin
        problem = getattr(exc, "problem", None) or str(exc)
        raise FleetFileError(f"{where}: not valid YAML: {' '.join(str(problem).split())}") from None
    if data is None:
        data = {}
    return parse_data(data, origin, base)


def parse_data(data: Any, origin: str, base: Path) -> FleetSpec:
    """The fleet in plain data (parsed YAML or JSON)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = _path(error.absolute_path)
        message = " ".join(error.message.split())
        if len(message) > 200:
            message = message[:200] + "..."
        raise FleetFileError(f"{origin}: {where + ': ' if where else ''}{message}")

    def fail(where: str, message: str) -> FleetFileError:
        return FleetFileError(f"{origin}: {where}: {message}")

    models: list[ModelEntry] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(data.get("models") or []):
        where = f"models[{i}]"
        if ("archive" in raw) == ("artifact" in raw):
            raise fail(where, "give archive (a file or folder to upload) or artifact (a stored one's URI)")
        if "artifact" in raw and "sha256" not in raw:
            raise fail(where, "an artifact needs its sha256")
        max_replicas = raw.get("max_replicas", 0)
        if max_replicas and max_replicas < raw.get("replicas", 1):
            raise fail(
                f"{where}.max_replicas", f"{max_replicas} is below replicas ({raw.get('replicas', 1)})"
            )
        entry = ModelEntry(
            where=where,
            name=raw["name"],
            version=_version(raw["version"]),
            archive=(base / raw["archive"]) if "archive" in raw else None,
            artifact=raw.get("artifact", ""),
            sha256=raw.get("sha256", ""),
            backend=raw.get("backend", ""),
            kind=raw.get("kind", "cpu"),
            memory_bytes=raw.get("memory_bytes"),
            replicas=raw.get("replicas", 1),
            max_replicas=max_replicas,
            tenants=tuple(sorted(raw.get("tenants", ()))),
        )
        if entry.key in seen:
            raise fail(where, f"{entry.key} is listed twice (also {seen[entry.key]})")
        seen[entry.key] = where
        models.append(entry)

    pipelines: list[tuple[str, Pipeline]] = []
    for i, raw in enumerate(data.get("pipelines") or []):
        where = f"pipelines[{i}]"
        try:
            pipeline = parse_pipeline(raw)
        except PipelineError as exc:
            raise fail(where, str(exc)) from None
        if pipeline.key in seen:
            raise fail(where, f"{pipeline.key} is listed twice (also {seen[pipeline.key]})")
        seen[pipeline.key] = where
        pipelines.append((where, pipeline))

    routes: list[tuple[str, RouteRule]] = []
    routed: dict[str, str] = {}
    for i, raw in enumerate(data.get("routes") or []):
        where = f"routes[{i}]"
        model = raw["model"]
        if model in routed:
            raise fail(where, f"model {model} has two route rules (also {routed[model]})")
        routed[model] = where
        rule = RouteRule(
            model=model,
            default_version=_version(raw.get("default", "")),
            tenant_versions=tuple(sorted((t, _version(v)) for t, v in (raw.get("pins") or {}).items())),
            weights=tuple(sorted(((_version(v), w) for v, w in (raw.get("split") or {}).items()))),
        )
        routes.append((where, rule))

    tenants = tuple(data.get("tenants") or ())
    return FleetSpec(tuple(models), tuple(pipelines), tuple(routes), tenants)


def normalized_rule(rule: RouteRule) -> RouteRule:
    """The rule with pins and split in one order: two rules that route alike compare equal."""
    return RouteRule(
        rule.model, rule.default_version, tuple(sorted(rule.tenant_versions)), tuple(sorted(rule.weights))
    )


def model_document(model: ModelVersion) -> dict[str, Any]:
    """A registered version as a fleet-file entry: its stored artifact, hash and settings."""
    data: dict[str, Any] = {
        "name": model.name,
        "version": model.version,
        "artifact": model.artifact_uri,
        "sha256": model.sha256,
        "backend": model.backend,
        "kind": model.kind,
        "memory_bytes": model.memory_bytes,
        "replicas": model.replicas,
    }
    if model.max_replicas:
        data["max_replicas"] = model.max_replicas
    if model.tenants:
        data["tenants"] = list(model.tenants)
    return data


def route_document(rule: RouteRule) -> dict[str, Any]:
    data: dict[str, Any] = {"model": rule.model}
    if rule.default_version:
        data["default"] = rule.default_version
    if rule.tenant_versions:
        data["pins"] = dict(sorted(rule.tenant_versions))
    if rule.weights:
        data["split"] = dict(sorted(rule.weights))
    return data


def fleet_document(
    models: list[ModelVersion],
    pipelines: list[Pipeline],
    routes: list[RouteRule],
    tenants: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The fleet as a fleet file holds it, in a stable order (by name, then version)."""

    def by_version(item: ModelVersion | Pipeline) -> tuple[str, tuple[int, int, str]]:
        return item.name, version_order(item.version)

    document: dict[str, Any] = {
        "models": [model_document(m) for m in sorted(models, key=by_version)],
        "pipelines": [p.to_dict() for p in sorted(pipelines, key=by_version)],
        "routes": [route_document(r) for r in sorted(routes, key=lambda r: r.model)],
    }
    if tenants:
        document["tenants"] = tenants
    return document
