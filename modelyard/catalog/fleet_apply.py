"""Making a fleet file true: plan the changes against the store, then write them all or none.

Nothing is half-applied:
1. Everything a user can get wrong is checked before the first write: the file (fleet.py), every archive
   (checked in full, as `models upload` does), immutable versions (a version already registered with
   another artifact or other settings is refused; only replicas and max replicas may change), every
   pipeline against the signatures of the models the fleet will have, every route rule against the versions
   it will have, and what `--prune` would leave dangling. Archives of new versions are stored in the model
   store by hash before the first store write: an artifact nobody registers is harmless (as in `upload`).
2. The plan is made against the store as read at one revision, and written with a compare-and-swap on one
   key, `/modelyard/fleet/applied`, that every apply changes: of two concurrent applies, the second writes
   nothing and is asked to run again.
3. Up to MAX_TXN_OPS - 1 changed keys are one store transaction (etcd's, or one SQLite transaction): all or
   nothing. More changes (etcd refuses transactions beyond 128 operations) are written in batches in
   dependency order (models, then pipelines, then route rules; removals the other way round), each batch a
   compare-and-swap on the marker, which reads `staging:TOKEN` meanwhile. If a batch fails, the batches
   written are undone (the values read at planning are written back) and the marker restored. If even that
   fails (the store went away), the marker stays `staging:...`: the next apply says so, and since applying
   is idempotent it finishes the job.

Other writers (`models upload`, `routes set`) do not take part in the compare-and-swap: a value they write
between this plan and its write is overwritten by the fleet's, as the last write wins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from modelyard.catalog.fleet import FleetSpec, ModelEntry, fleet_document, normalized_rule
from modelyard.catalog.modelstore import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    ArchiveError,
    LocalModelStore,
    ModelStore,
    artifact_signature,
    checked,
    read_manifest,
)
from modelyard.catalog.pipelines import read_signature
from modelyard.catalog.registration import RegistrationError, check_name, same_registration
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion, RouteRule, version_order
from modelyard.placement.pipeline import ModelSignature, Pipeline, PipelineError, check_signatures
from modelyard.placement.store import Store, StoreError
from modelyard.placement.store.base import MAX_TXN_OPS
from modelyard.placement.units import format_bytes

APPLIED = (
    registry.ROOT + "fleet/applied"
)  # the applies' compare-and-swap key: "REVISION:TOKEN" or "staging:…"
STAGING = "staging:"
TENANT_LIMITS_UNSUPPORTED = "tenant limits not supported by this build"


class FleetApplyError(ValueError):
    """The fleet cannot be made true as written; nothing was written. The message is one line."""


class FleetConflict(FleetApplyError):
    """The file changes what is immutable (a registered version's artifact or settings, a pipeline spec)."""


class FleetWriteError(StoreError):
    """Writing failed part-way; the message says what state the store is in."""


@dataclass(frozen=True)
class Section:
    """A fleet-file section owned by another part of modelyard (tenant limits): the store prefix it owns,
    how its entries become keys under it (raising ValueError with one line for a bad entry), and how the
    stored keys read back as entries (for export)."""

    prefix: str
    to_keys: Callable[[list[dict[str, Any]]], dict[str, bytes]]
    to_entries: Callable[[dict[str, bytes]], list[dict[str, Any]]]


def tenant_limits_section() -> Section | None:
    """The `tenants:` section's owner. None: this build has no tenant limits, and a fleet file that lists
    some is refused with TENANT_LIMITS_UNSUPPORTED rather than ignored. The tenant-limits work returns its
    Section here; planning, the diff, the all-or-nothing write and export then cover it like the rest.

    Entries are `{name, max_inflight, rps, burst, priority}` (placement/tenants.py; 0 or absent: no limit),
    one key per tenant. The defaults for tenants without an entry stay a command (`tenants set --default`).
    """
    from modelyard.placement.registry import TENANTS
    from modelyard.placement.tenants import TenantLimits, check_tenant_name

    def to_keys(entries: list[dict[str, Any]]) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        for entry in entries:
            name = check_tenant_name(str(entry.get("name", "")))
            unknown = sorted(set(entry) - {"name", "max_inflight", "rps", "burst", "priority"})
            if unknown:
                raise ValueError(f"{name}: unknown field {unknown[0]!r} (max_inflight, rps, burst, priority)")
            if TENANTS + name in keys:
                raise ValueError(f"{name}: listed twice")
            fields = {k: v for k, v in entry.items() if k != "name"}
            try:
                limits = TenantLimits.from_json(json.dumps(fields))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            keys[TENANTS + name] = limits.to_json()
        return keys

    def to_entries(stored: dict[str, bytes]) -> list[dict[str, Any]]:
        entries = []
        for key in sorted(stored):
            try:
                limits = TenantLimits.from_json(stored[key])
            except ValueError:
                continue  # a value that does not parse is not exported (the router skips it too)
            entries.append({"name": key[len(TENANTS) :], **asdict(limits)})
        return entries

    return Section(TENANTS, to_keys, to_entries)


@dataclass(frozen=True)
class Change:
    action: Literal["add", "change", "remove"]
    what: Literal["model", "pipeline", "route", "tenant"]
    name: str  # name@version, or the model name of a route rule
    detail: str  # what the line shows after the name
    key: str  # the store key
    before: bytes | None
    after: bytes | None

    def line(self) -> str:
        sign = {"add": "+", "change": "~", "remove": "-"}[self.action]
        return f"{sign} {self.what} {self.name}{self.detail}"


_ORDER = {"model": 0, "pipeline": 1, "route": 2, "tenant": 3}


@dataclass
class FleetPlan:
    changes: list[Change] = field(default_factory=list)
    unchanged: int = 0
    kept: list[str] = field(default_factory=list)  # in the store, not in the file, left as they are
    marker: bytes | None = None  # the value of APPLIED the plan was made at
    revision: int = 0

    def count(self, action: str) -> int:
        return sum(1 for c in self.changes if c.action == action)

    def ordered(self) -> list[Change]:
        """Writes in dependency order: what others name is added first and removed last."""
        adds = [c for c in self.changes if c.action != "remove"]
        removes = [c for c in self.changes if c.action == "remove"]
        return [
            *sorted(adds, key=lambda c: _ORDER[c.what]),
            *sorted(removes, key=lambda c: -_ORDER[c.what]),
        ]

    def summary(self, done: bool) -> str:
        if not self.changes:
            return f"no changes ({self.unchanged} unchanged)"
        verbs = ("added", "changed", "removed") if done else ("to add", "to change", "to remove")
        counts = ", ".join(
            f"{self.count(a)} {v}" for a, v in zip(("add", "change", "remove"), verbs, strict=True)
        )
        return f"{counts}, {self.unchanged} unchanged"


def _describe(model: ModelVersion) -> str:
    tenants = ",".join(model.tenants) or "public"
    copies = f"replicas {model.replicas}" + (f", max {model.max_replicas}" if model.max_replicas else "")
    return f" ({model.backend}, {model.kind}, {format_bytes(model.memory_bytes)}, {copies}, {tenants})"


def _describe_rule(rule: RouteRule) -> str:
    parts = []
    if rule.default_version:
        parts.append(f"default {rule.default_version}")
    if rule.tenant_versions:
        parts.append("pins " + ",".join(f"{t}={v}" for t, v in rule.tenant_versions))
    if rule.weights:
        parts.append("split " + ",".join(f"{v}={w}" for v, w in rule.weights))
    return ", ".join(parts) or "highest version"


def _wanted_model(
    entry: ModelEntry,
    existing: ModelVersion | None,
    model_store: ModelStore,
    *,
    store_artifact: bool,
    max_archive_bytes: int,
) -> ModelVersion:
    """The registration `entry` means (blocking: reads and maybe stores its archive). ArchiveError or
    RegistrationError, prefixed with the entry's path, when it cannot be registered."""
    try:
        if entry.archive is not None:
            with checked(
                entry.archive,
                entry.sha256 or None,
                max_bytes=max_archive_bytes,
                backend=entry.backend or None,
            ) as artifact:
                check_name(entry.name, entry.version, artifact.manifest.backend)
                uri = existing.artifact_uri if existing and existing.sha256 == artifact.sha256 else ""
                if not uri and store_artifact:
                    uri = model_store.put(artifact)
                return ModelVersion(
                    name=entry.name,
                    version=entry.version,
                    backend=artifact.manifest.backend,  # type: ignore[arg-type]  # checked by read_manifest
                    kind=entry.kind,  # type: ignore[arg-type]  # checked by the schema
                    memory_bytes=entry.memory_bytes or artifact.memory_bytes,
                    replicas=entry.replicas,
                    max_replicas=entry.max_replicas,
                    artifact_uri=uri,
                    sha256=artifact.sha256,
                    tenants=entry.tenants,
                    signature=artifact_signature(artifact.root),
                )
        if existing is not None and existing.sha256 == entry.sha256:
            backend, memory, signature = existing.backend, existing.memory_bytes, existing.signature
        else:
            if not model_store.has(entry.sha256):
                raise ArchiveError(f"no artifact with sha256 {entry.sha256[:12]}… in the model store")
            stored = _stored_uri(model_store, entry.sha256)
            if stored is not None and entry.artifact != stored:
                # The registration must point at the files whose hash was checked, not elsewhere.
                raise ArchiveError(f"artifact: the model store holds sha256 {entry.sha256[:12]}… at {stored}")
            root = model_store.local_path(entry.artifact)
            manifest = read_manifest(root)
            backend, signature = manifest.backend, artifact_signature(root)  # type: ignore[assignment]
            memory = entry.memory_bytes or manifest.memory_bytes or 0
            if not memory:  # estimated from its files, as `models add` does (the copy's hash is not used)
                with checked(root, max_bytes=max_archive_bytes) as artifact:
                    memory = artifact.memory_bytes
        if entry.backend and entry.backend != backend:
            raise ArchiveError(f"the artifact is for backend {backend!r}, not {entry.backend!r}")
        check_name(entry.name, entry.version, backend)
        return ModelVersion(
            name=entry.name,
            version=entry.version,
            backend=backend,
            kind=entry.kind,  # type: ignore[arg-type]
            memory_bytes=entry.memory_bytes or memory,
            replicas=entry.replicas,
            max_replicas=entry.max_replicas,
            artifact_uri=entry.artifact,
            sha256=entry.sha256,
            tenants=entry.tenants,
            signature=signature,
        )
    except (ArchiveError, RegistrationError, OSError) as exc:
        text = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
        raise FleetApplyError(f"{entry.where}: {text or exc}") from None


def _stored_uri(model_store: ModelStore, sha256: str) -> str | None:
    """The URI under which `model_store` keeps the artifact `sha256` (None: a store that does not say)."""
    if isinstance(model_store, LocalModelStore):
        return (model_store.root / sha256).resolve().as_uri()
    artifact_uri = getattr(model_store, "artifact_uri", None)  # the S3 store
    return str(artifact_uri(sha256)) if callable(artifact_uri) else None


def _model_change(entry: ModelEntry, wanted: ModelVersion, existing: ModelVersion | None) -> Change | None:
    key = registry.MODELS + wanted.key
    if existing is None:
        return Change("add", "model", wanted.key, _describe(wanted), key, None, wanted.to_json())
    settled = dataclasses.replace(wanted, replicas=existing.replicas, max_replicas=existing.max_replicas)
    if not same_registration(existing, settled):
        if existing.sha256 != wanted.sha256:
            why = f"another artifact ({existing.sha256[:12]} registered, {wanted.sha256[:12]} in the file)"
        else:
            why = "other settings (" + ", ".join(
                f"{name} {getattr(existing, name)!r} registered, {getattr(wanted, name)!r} in the file"
                for name in ("backend", "kind", "memory_bytes", "tenants")
                if getattr(existing, name) != getattr(wanted, name)
            )
            why += ")"
        raise FleetConflict(
            f"{entry.where}: {wanted.key} is registered with {why}; versions are immutable: "
            "give it a new version (only replicas and max_replicas may change)"
        )
    if (existing.replicas, existing.max_replicas) == (wanted.replicas, wanted.max_replicas):
        return None
    updated = dataclasses.replace(existing, replicas=wanted.replicas, max_replicas=wanted.max_replicas)
    detail = f": replicas {existing.replicas} -> {wanted.replicas}"
    if existing.max_replicas != wanted.max_replicas:
        detail += f", max replicas {existing.max_replicas} -> {wanted.max_replicas}"
    return Change("change", "model", wanted.key, detail, key, existing.to_json(), updated.to_json())


def _signatures(
    where: str, pipeline: Pipeline, models: dict[str, dict[str, ModelVersion]], model_store: ModelStore
) -> dict[str, ModelSignature]:
    out: dict[str, ModelSignature] = {}
    for step in pipeline.steps:
        versions = models.get(step.model_name)
        if not versions:
            raise FleetApplyError(
                f"{where}: step '{step.name}': model '{step.model_name}' is not in the fleet"
            )
        version = step.model_version or max(versions, key=version_order)
        model = versions.get(version)
        if model is None:
            raise FleetApplyError(
                f"{where}: step '{step.name}': model '{step.model_name}' has no version '{version}' "
                f"(the fleet has: {', '.join(sorted(versions, key=version_order))})"
            )
        try:
            out[step.name] = read_signature(model, model_store)
        except (ArchiveError, OSError) as exc:
            raise FleetApplyError(
                f"{where}: step '{step.name}': cannot read the signature of {model.key}: {exc}"
            ) from None
    return out


async def plan(
    store: Store,
    spec: FleetSpec,
    model_store: ModelStore,
    *,
    prune: bool = False,
    store_artifacts: bool = True,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
) -> FleetPlan:
    """The changes that make `spec` true, checked in full (FleetApplyError, FleetConflict; nothing is
    written to the store). With `store_artifacts`, archives of new versions are stored in the model store."""
    section = tenant_limits_section()
    if spec.tenants and section is None:
        raise FleetApplyError(f"tenants: {TENANT_LIMITS_UNSUPPORTED}")
    items, revision = await store.get_prefix(registry.ROOT)
    fleet = registry.Fleet.from_items(items, revision)
    marker = next((item.value for item in items if item.key == APPLIED), None)
    result = FleetPlan(marker=marker, revision=revision)

    # Models: the registration each entry means, then how it differs from the registered one.
    after: dict[str, ModelVersion] = {} if prune else dict(fleet.models)
    for entry in spec.models:
        existing = fleet.models.get(entry.key)
        if existing is None and registry.MODELS + entry.key in fleet.unparsable:
            raise FleetConflict(
                f"{entry.where}: {entry.key} is registered, but its registration does not parse; "
                f"remove it first (modelyard models remove {entry.key})"
            )
        wanted = await asyncio.to_thread(
            _wanted_model,
            entry,
            existing,
            model_store,
            store_artifact=store_artifacts,
            max_archive_bytes=max_archive_bytes,
        )
        change = _model_change(entry, wanted, existing)
        if change is None:
            result.unchanged += 1
        else:
            result.changes.append(change)
        after[wanted.key] = existing if change is None and existing else wanted
    listed = {e.key for e in spec.models}
    _removals(result, "model", registry.MODELS, fleet.models, listed, prune)
    by_name: dict[str, dict[str, ModelVersion]] = {}
    for model in after.values():
        by_name.setdefault(model.name, {})[model.version] = model

    # Pipelines: checked against the models the fleet will have; immutable like model versions.
    pipelines_after: dict[str, Pipeline] = {} if prune else dict(fleet.pipelines)
    for where, pipeline in spec.pipelines:
        if pipeline.name in by_name:
            raise FleetApplyError(
                f"{where}: a model is named '{pipeline.name}': a pipeline cannot take its name"
            )
        try:
            checked_pipeline = check_signatures(
                pipeline, await asyncio.to_thread(_signatures, where, pipeline, by_name, model_store)
            )
        except PipelineError as exc:
            raise FleetApplyError(f"{where}: {exc}") from None
        existing_pipeline = fleet.pipelines.get(pipeline.key)
        key = registry.PIPELINES + pipeline.key
        if existing_pipeline is None:
            steps = f" ({len(pipeline.steps)} steps, {','.join(pipeline.tenants) or 'public'})"
            result.changes.append(
                Change("add", "pipeline", pipeline.key, steps, key, None, checked_pipeline.to_json())
            )
        elif existing_pipeline == checked_pipeline:
            result.unchanged += 1
        else:
            raise FleetConflict(
                f"{where}: pipeline {pipeline.key} is registered with another spec; versions are "
                "immutable: give it a new version"
            )
        pipelines_after[pipeline.key] = checked_pipeline
    _removals(
        result, "pipeline", registry.PIPELINES, fleet.pipelines, {p.key for _, p in spec.pipelines}, prune
    )
    for pkey, pipeline in pipelines_after.items():
        if pipeline.name in by_name:
            raise FleetApplyError(f"pipeline {pkey} would share its name with a model in the fleet")
        for step in pipeline.steps:
            versions = by_name.get(step.model_name, {})
            if not versions or (step.model_version and step.model_version not in versions):
                raise FleetApplyError(
                    f"pipeline {pkey} (registered, not in the file) needs model {step.model}, which the "
                    "fleet would no longer have"
                )

    # Route rules: every version they name must be one the fleet will have.
    versions_after: dict[str, set[str]] = {name: set(v) for name, v in by_name.items()}
    for pipeline in pipelines_after.values():
        versions_after.setdefault(pipeline.name, set()).add(pipeline.version)
    rules_after: dict[str, RouteRule] = {} if prune else dict(fleet.routes)
    for where, rule in spec.routes:
        known = versions_after.get(rule.model)
        if not known:
            raise FleetApplyError(f"{where}: model '{rule.model}' is not in the fleet")
        named = (
            {rule.default_version} - {""}
            | {v for _, v in rule.tenant_versions}
            | {v for v, _ in rule.weights}
        )
        if unknown := sorted(named - known):
            raise FleetApplyError(
                f"{where}: model '{rule.model}' has no version {', '.join(unknown)} "
                f"(the fleet has: {', '.join(sorted(known, key=version_order))})"
            )
        existing_rule = fleet.routes.get(rule.model)
        key = registry.ROUTES + rule.model
        if existing_rule is None:
            result.changes.append(
                Change("add", "route", rule.model, f": {_describe_rule(rule)}", key, None, rule.to_json())
            )
        elif normalized_rule(existing_rule) == rule:
            result.unchanged += 1
        else:
            detail = f": {_describe_rule(normalized_rule(existing_rule))} -> {_describe_rule(rule)}"
            result.changes.append(
                Change("change", "route", rule.model, detail, key, existing_rule.to_json(), rule.to_json())
            )
        rules_after[rule.model] = rule
    _removals(result, "route", registry.ROUTES, fleet.routes, {r.model for _, r in spec.routes}, prune)
    for name, rule in rules_after.items():
        named = (
            {rule.default_version} - {""}
            | {v for _, v in rule.tenant_versions}
            | {v for v, _ in rule.weights}
        )
        if named - versions_after.get(name, set()):
            raise FleetApplyError(
                f"the route rule of {name} (registered, not in the file) names versions the fleet would no "
                "longer have; list it in the file or leave out --prune"
            )

    if section is not None:
        _plan_section(result, section, spec, items, prune)
    return result


def _removals(
    result: FleetPlan, what: Any, prefix: str, registered: dict[str, Any], listed: set[str], prune: bool
) -> None:
    for name, value in sorted(registered.items()):
        if name in listed:
            continue
        if prune:
            result.changes.append(Change("remove", what, name, "", prefix + name, value.to_json(), None))
        else:
            result.kept.append(f"{what} {name}")


def _plan_section(
    result: FleetPlan, section: Section, spec: FleetSpec, items: list[Any], prune: bool
) -> None:
    try:
        wanted = section.to_keys(list(spec.tenants))
    except ValueError as exc:
        raise FleetApplyError(f"tenants: {exc}") from None
    stored = {item.key: item.value for item in items if item.key.startswith(section.prefix)}
    for key, value in sorted(wanted.items()):
        name = key[len(section.prefix) :]
        if key not in stored:
            result.changes.append(Change("add", "tenant", name, "", key, None, value))
        elif stored[key] != value:
            result.changes.append(Change("change", "tenant", name, "", key, stored[key], value))
        else:
            result.unchanged += 1
    for key, value in sorted(stored.items()):
        if key not in wanted:
            name = key[len(section.prefix) :]
            if prune:
                result.changes.append(Change("remove", "tenant", name, "", key, value, None))
            else:
                result.kept.append(f"tenant {name}")


def _batch(changes: list[Change], undo: bool = False) -> tuple[dict[str, bytes], list[str]]:
    puts: dict[str, bytes] = {}
    deletes: list[str] = []
    for c in changes:
        value = c.before if undo else c.after
        if value is None:
            deletes.append(c.key)
        else:
            puts[c.key] = value
    return puts, deletes


class _Moved(Exception):
    """The marker is not what this apply expects: another apply wrote meanwhile."""


async def write(store: Store, fleet_plan: FleetPlan) -> None:
    """Writes the plan all or none (see the module docstring). FleetWriteError on failure, saying what state
    the store was left in."""
    changes = fleet_plan.ordered()
    if not changes:
        return
    token = secrets.token_hex(8)
    done = f"{fleet_plan.revision}:{token}".encode()
    moved = FleetWriteError(
        "the fleet changed while apply was planning (another apply wrote first); nothing was written: "
        "run apply again"
    )
    if len(changes) < MAX_TXN_OPS:
        puts, deletes = _batch(changes)
        if not await store.apply({**puts, APPLIED: done}, deletes, if_equal=(APPLIED, fleet_plan.marker)):
            raise moved
        return
    staging = f"{STAGING}{token}".encode()
    if not await store.apply({APPLIED: staging}, if_equal=(APPLIED, fleet_plan.marker)):
        raise moved
    batches = [changes[i : i + MAX_TXN_OPS - 1] for i in range(0, len(changes), MAX_TXN_OPS - 1)]
    written: list[list[Change]] = []
    try:
        for batch in batches:
            puts, deletes = _batch(batch)
            if not await store.apply(puts, deletes, if_equal=(APPLIED, staging)):
                raise _Moved()
            written.append(batch)
        if not await store.apply({APPLIED: done}, if_equal=(APPLIED, staging)):
            raise _Moved()
    except (StoreError, _Moved) as exc:
        why = "another apply took over" if isinstance(exc, _Moved) else str(exc)
        count = sum(len(b) for b in written)
        if isinstance(exc, _Moved):
            raise FleetWriteError(
                f"apply stopped after {count} of {len(changes)} changes: {why}; run apply again"
            ) from None
        try:
            for batch in reversed(written):
                puts, deletes = _batch(batch, undo=True)
                if not await store.apply(puts, deletes, if_equal=(APPLIED, staging)):
                    raise _Moved()
            restored = fleet_plan.marker
            if restored is None:
                await store.apply({}, [APPLIED], if_equal=(APPLIED, staging))
            else:
                await store.apply({APPLIED: restored}, if_equal=(APPLIED, staging))
        except (StoreError, _Moved):
            raise FleetWriteError(
                f"apply failed after {count} of {len(changes)} changes ({why}) and could not undo them; "
                "run apply again: it finishes what this one started"
            ) from None
        raise FleetWriteError(f"apply failed ({why}); the {count} changes written were undone") from None


async def export(store: Store) -> tuple[dict[str, Any], int]:
    """The fleet as a fleet file (fleet.py) and how many store values did not parse (left out)."""
    items, revision = await store.get_prefix(registry.ROOT)
    fleet = registry.Fleet.from_items(items, revision)
    tenants = None
    section = tenant_limits_section()
    if section is not None:
        tenants = section.to_entries({i.key: i.value for i in items if i.key.startswith(section.prefix)})
    skipped = sum(
        1
        for key in fleet.unparsable
        if key.startswith((registry.MODELS, registry.PIPELINES, registry.ROUTES))
    )
    document = fleet_document(
        list(fleet.models.values()), list(fleet.pipelines.values()), list(fleet.routes.values()), tenants
    )
    return document, skipped


def staging_note(fleet_plan: FleetPlan) -> str | None:
    """A line for the user when an earlier apply was interrupted part-way, else None."""
    if fleet_plan.marker is not None and fleet_plan.marker.startswith(STAGING.encode()):
        return "an earlier apply was interrupted part-way; this one makes the whole file true"
    return None
