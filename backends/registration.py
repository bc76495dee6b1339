"""Registering model versions: check the archive, store it by hash, then write one registry key.

Nothing is half-registered: the archive is checked in full first, the artifact lands by rename, and the
registration is a single put; if that put fails, an artifact this call added is removed again.
"""

from __future__ import annotations

import re
from pathlib import Path

from backends.modelstore import ModelStore, checked
from placement import registry
from placement.model import MODEL_KINDS, ModelVersion, model_key
from placement.store import Store, StoreError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class RegistrationError(ValueError):
    """A registration is refused; the message is one line."""


def check_name(name: str, version: str, backend: str) -> None:
    if not _NAME.fullmatch(name):
        raise RegistrationError(f"bad model name {name!r}: letters, digits, '_', '.', '-' (at most 128)")
    if backend == "triton" and not (version.isdigit() and int(version) > 0):
        raise RegistrationError(f"bad version {version!r}: Triton versions are positive integers")
    if not _NAME.fullmatch(version):
        raise RegistrationError(f"bad version {version!r}: letters, digits, '_', '.', '-'")


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
) -> ModelVersion:
    """Checks, stores and registers one model version; returns its registration."""
    if kind not in MODEL_KINDS:
        raise RegistrationError(f"unknown kind {kind!r} (expected one of {', '.join(MODEL_KINDS)})")
    if replicas < 1:
        raise RegistrationError(f"replicas must be >= 1, got {replicas}")
    if memory_bytes is not None and memory_bytes <= 0:
        raise RegistrationError(f"memory bytes must be positive, got {memory_bytes}")
    with checked(archive, expected_sha256) as artifact:
        check_name(name, version, artifact.manifest.backend)
        existing = await store.get(registry.MODELS + model_key(name, version))
        if existing is not None:
            current = ModelVersion.from_json(existing.value)
            if current.sha256 != artifact.sha256:
                raise RegistrationError(
                    f"{name}@{version} is already registered with another artifact ({current.sha256[:12]}); "
                    "versions are immutable: remove it first or upload a new version"
                )
        newly_stored = not model_store.has(artifact.sha256)
        uri = model_store.put(artifact)
        model = ModelVersion(
            name=name,
            version=version,
            backend="custom" if artifact.manifest.backend == "custom" else "triton",
            kind=kind,  # type: ignore[arg-type]
            memory_bytes=memory_bytes or artifact.memory_bytes,
            replicas=replicas,
            artifact_uri=uri,
            sha256=artifact.sha256,
            tenants=tuple(sorted(set(tenants))),
        )
        try:
            await registry.register_model(store, model)
        except StoreError:
            if newly_stored:
                model_store.remove(artifact.sha256)
            raise
        return model


async def remove(store: Store, name: str, version: str) -> ModelVersion:
    """Unregisters a version and drops its assignment (agents unload it). The artifact stays stored."""
    key = model_key(name, version)
    existing = await store.get(registry.MODELS + key)
    if existing is None:
        raise RegistrationError(f"{key} is not registered")
    await store.apply({}, [registry.MODELS + key, registry.ASSIGN + key])
    return ModelVersion.from_json(existing.value)
