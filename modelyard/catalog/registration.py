"""Registering model versions: check the archive, store it by hash, then create one registry key.

`name@version` is immutable. The registry key is created with a compare-and-swap ("only if absent"), so
of two concurrent registrations of one version exactly one wins and the other is refused with
AlreadyRegistered; registering the same artifact with the same settings again changes nothing.

Nothing is half-registered: the archive is checked in full first, the artifact lands by rename, and the
registration is one conditional write. An artifact stored for a registration that then loses the race
stays in the model store: another registration may share it (artifacts are content-addressed), and an
unreferenced artifact is harmless.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from modelyard.catalog.modelstore import DEFAULT_MAX_ARCHIVE_BYTES, ModelStore, artifact_signature, checked
from modelyard.placement import registry
from modelyard.placement.model import MODEL_KINDS, ModelVersion, model_key
from modelyard.placement.store import KeyValue, Store

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class RegistrationError(ValueError):
    """A registration is refused; the message is one line."""


class AlreadyRegistered(RegistrationError):
    """`name@version` already holds another artifact or other settings: versions are immutable."""


@dataclass(frozen=True)
class Registration:
    model: ModelVersion  # as registered in the store
    created: bool  # False: the identical registration was already there


def check_name(name: str, version: str, backend: str) -> None:
    if not _NAME.fullmatch(name):
        raise RegistrationError(f"bad model name {name!r}: letters, digits, '_', '.', '-' (at most 128)")
    if backend == "triton" and not (version.isdigit() and int(version) > 0):
        raise RegistrationError(f"bad version {version!r}: Triton versions are positive integers")
    if not _NAME.fullmatch(version):
        raise RegistrationError(f"bad version {version!r}: letters, digits, '_', '.', '-'")


def check_settings(kind: str, replicas: int, memory_bytes: int | None, max_replicas: int = 0) -> None:
    if kind not in MODEL_KINDS:
        raise RegistrationError(f"unknown kind {kind!r} (expected one of {', '.join(MODEL_KINDS)})")
    check_copies(replicas, max_replicas)
    if memory_bytes is not None and memory_bytes <= 0:
        raise RegistrationError(f"memory bytes must be positive, got {memory_bytes}")


def check_copies(replicas: int, max_replicas: int) -> None:
    """`replicas` 0 is load on demand; `max_replicas` 0 means as many as `replicas`."""
    if replicas < 0:
        raise RegistrationError(f"replicas must be >= 0 (0: load on demand), got {replicas}")
    if max_replicas < 0:
        raise RegistrationError(f"max replicas must be >= 0, got {max_replicas}")
    if max_replicas and max_replicas < replicas:
        raise RegistrationError(f"max replicas ({max_replicas}) must not be below replicas ({replicas})")


def same_registration(a: ModelVersion, b: ModelVersion) -> bool:
    """Same artifact and settings. The artifact URI may differ: one artifact, two model-store paths. The
    signature is not compared: it is read from the artifact, so the same sha256 means the same signature,
    and a version registered before signatures were stored (none) is the same as its upload now."""
    return dataclasses.replace(a, artifact_uri="", signature="") == dataclasses.replace(
        b, artifact_uri="", signature=""
    )


def parse_registered(item: KeyValue) -> ModelVersion | None:
    """The registration a registry key holds, or None when its value does not parse."""
    try:
        return ModelVersion.from_json(item.value)
    except (ValueError, TypeError, AttributeError):  # JSONDecodeError is a ValueError
        return None


def conflict(existing: ModelVersion | None, wanted: ModelVersion) -> AlreadyRegistered:
    """The refusal for registering `wanted` over a different registration of its version."""
    if existing is None:
        return AlreadyRegistered(f"{wanted.key} already exists (its registration does not parse)")
    if existing.sha256 != wanted.sha256:
        return AlreadyRegistered(
            f"{wanted.key} already exists with another artifact ({existing.sha256[:12]}); "
            "versions are immutable: remove it first or upload a new version"
        )
    differences = ", ".join(
        f"{field} {getattr(existing, field)!r}"
        for field in ("backend", "kind", "memory_bytes", "replicas", "max_replicas", "tenants")
        if getattr(existing, field) != getattr(wanted, field)
    )
    return AlreadyRegistered(
        f"{wanted.key} already exists with this artifact but other settings ({differences}); "
        "versions are immutable: remove it first or upload a new version"
    )


async def register(store: Store, model: ModelVersion) -> Registration:
    """Creates `model`'s registry key if absent (compare-and-swap); an identical registration is a no-op."""
    for _ in range(3):
        if await registry.create_model(store, model):
            return Registration(model, created=True)
        current = await registry.read_model(store, model.key)
        if current is None:
            continue  # removed between our write and our read: try to create it again
        existing = parse_registered(current)
        if existing is not None and same_registration(existing, model):
            return Registration(existing, created=False)
        raise conflict(existing, model)
    raise AlreadyRegistered(f"{model.key} is being registered and removed concurrently; try again")


async def upload(
    store: Store,
    model_store: ModelStore,
    archive: Path,
    *,
    name: str,
    version: str,
    tenants: tuple[str, ...] = (),
    memory_bytes: int | None = None,
    replicas: int = 1,
    kind: str = "cpu",
    expected_sha256: str | None = None,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    max_replicas: int = 0,
    backend: str | None = None,
    manifest_file: Path | None = None,
) -> Registration:
    """Checks, stores and registers one model version (`backend`, `manifest_file`: see `checked`)."""
    check_settings(kind, replicas, memory_bytes, max_replicas)
    with checked(
        archive, expected_sha256, max_bytes=max_archive_bytes, backend=backend, manifest_file=manifest_file
    ) as artifact:
        check_name(name, version, artifact.manifest.backend)
        wanted = ModelVersion(
            name=name,
            version=version,
            backend=artifact.manifest.backend,  # type: ignore[arg-type]  # one of BACKENDS (read_manifest)
            kind=kind,  # type: ignore[arg-type]
            memory_bytes=memory_bytes or artifact.memory_bytes,
            replicas=replicas,
            max_replicas=max_replicas,
            sha256=artifact.sha256,
            tenants=tuple(sorted(set(tenants))),
            signature=artifact_signature(artifact.root),
        )
        # Refuse early, before storing anything, when the version is visibly taken; the conditional
        # write in `register` is what decides a race.
        current = await registry.read_model(store, wanted.key)
        if current is not None:
            existing = parse_registered(current)
            if existing is not None and same_registration(existing, wanted):
                return Registration(existing, created=False)
            raise conflict(existing, wanted)
        import asyncio  # here: `models --help` must not pay for importing it

        uri = await asyncio.to_thread(model_store.put, artifact)  # S3: blocking uploads, off the loop
        return await register(store, dataclasses.replace(wanted, artifact_uri=uri))


async def remove(store: Store, name: str, version: str) -> ModelVersion:
    """Unregisters a version with one conditional delete of its registry key. The artifact stays stored.

    The shard map is the placement controller's: it drops the assignments of unregistered models and the
    agents unload them, so nothing here writes under /modelyard/map/.
    """
    key = model_key(name, version)
    existing = await registry.read_model(store, key)
    if existing is None:
        raise RegistrationError(f"{key} is not registered")
    if not await registry.delete_model_if(store, existing):
        if await registry.read_model(store, key) is None:
            raise RegistrationError(f"{key} is not registered (it was removed concurrently)")
        raise RegistrationError(f"{key} changed while it was being removed; nothing was removed")
    return parse_registered(existing) or ModelVersion(name=name, version=version)


async def set_copies(
    store: Store, key: str, *, replicas: int | None, max_replicas: int | None
) -> ModelVersion:
    """Changes how many copies a registered version keeps (`replicas`) and may have under load
    (`max_replicas`): a compare-and-swap on its registry key, so a concurrent change is never lost."""
    for _ in range(5):
        current = await registry.read_model(store, key)
        if current is None:
            raise RegistrationError(f"{key} is not registered")
        model = parse_registered(current)
        if model is None:
            raise RegistrationError(f"{key}: its registration does not parse; upload it again")
        new_replicas = model.replicas if replicas is None else replicas
        new_max = model.max_replicas if max_replicas is None else max_replicas
        if max_replicas is None and new_max and new_max < new_replicas:
            new_max = new_replicas  # raising replicas alone lifts a lower ceiling with it
        check_copies(new_replicas, new_max)
        updated = dataclasses.replace(model, replicas=new_replicas, max_replicas=new_max)
        if updated == model or await registry.replace_model(store, current, updated):
            return updated
    raise RegistrationError(f"{key} keeps changing concurrently; try again")
