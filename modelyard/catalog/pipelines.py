"""Registering pipelines: check the spec, check every step against its model's signature, then create one
registry key (`/modelyard/pipelines/NAME@VERSION`) with a compare-and-swap.

Each model version's registration holds its signature (stored at upload, read from its `manifest.json`
or a Triton model's `config.pbtxt`); only versions registered before that was stored have their artifact
read, from the model store, as `models upload` does. A step without a version (`model: scale`) is
checked against the highest version registered now; one with a version (`scale@2`) against that version.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from modelyard.catalog.modelstore import ArchiveError, ModelStore, artifact_signature, file_path
from modelyard.catalog.registration import AlreadyRegistered, RegistrationError
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion, parse_signature, version_order
from modelyard.placement.pipeline import ModelSignature, Pipeline, PipelineError, check_signatures
from modelyard.placement.store import Store


def _artifact_dir(model: ModelVersion, model_store: ModelStore | None) -> Path:
    if model_store is not None:
        return model_store.local_path(model.artifact_uri)
    path = file_path(model.artifact_uri)
    if path is None:
        raise ArchiveError(f"unsupported artifact URI {model.artifact_uri!r}")
    return path


def read_signature(model: ModelVersion, model_store: ModelStore | None = None) -> ModelSignature:
    """The version's signature: the one its registration stores, else (a version registered before
    signatures were stored) the one its artifact declares, read from disk (blocking file I/O)."""
    if model.signature:
        text = model.signature
    else:
        text = artifact_signature(_artifact_dir(model, model_store))
    try:
        inputs, outputs, decoupled = parse_signature(text)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from exc
    return ModelSignature(
        model.key,
        {name: (datatype, shape) for name, datatype, shape in inputs},
        {name: (datatype, shape) for name, datatype, shape in outputs},
        decoupled,
    )


async def _versions(store: Store, name: str) -> dict[str, ModelVersion]:
    items, _ = await store.get_prefix(f"{registry.MODELS}{name}@")
    versions: dict[str, ModelVersion] = {}
    for item in items:
        try:
            model = ModelVersion.from_json(item.value)
        except (ValueError, TypeError, AttributeError):
            continue  # unreadable: as if absent, like every reader of the registry
        versions[model.version] = model
    return versions


async def check(store: Store, pipeline: Pipeline, model_store: ModelStore | None = None) -> Pipeline:
    """`pipeline` with every step checked against its model's signature (raises PipelineError), and the
    name checked against registered models (a pipeline may not shadow one)."""
    if await _versions(store, pipeline.name):
        raise PipelineError(f"a model named '{pipeline.name}' is registered: a pipeline cannot take its name")
    signatures: dict[str, ModelSignature] = {}
    for step in pipeline.steps:
        versions = await _versions(store, step.model_name)
        first_output = step.outputs[0][1]
        if not versions:
            raise PipelineError(
                f"step '{step.name}' (tensor '{first_output}'): model '{step.model_name}' is not registered"
            )
        version = step.model_version or max(versions, key=version_order)
        model = versions.get(version)
        if model is None:
            raise PipelineError(
                f"step '{step.name}' (tensor '{first_output}'): model '{step.model_name}' has no version "
                f"'{version}' (registered: {', '.join(sorted(versions, key=version_order))})"
            )
        try:
            signatures[step.name] = await asyncio.to_thread(read_signature, model, model_store)
        except (ArchiveError, OSError) as exc:
            raise PipelineError(
                f"step '{step.name}': cannot read the signature of model {model.key}: {exc}"
            ) from exc
    return check_signatures(pipeline, signatures)


async def register(
    store: Store, pipeline: Pipeline, model_store: ModelStore | None = None
) -> tuple[Pipeline, bool]:
    """Checks and registers `pipeline`: (as registered, False when the identical one was there already).

    NAME@VERSION is immutable like a model version: another spec under it is AlreadyRegistered."""
    checked = await check(store, pipeline, model_store)
    key = registry.PIPELINES + checked.key
    if await store.apply({key: checked.to_json()}, if_equal=(key, None)):
        return checked, True
    current = await store.get(key)
    if current is not None:
        try:
            if Pipeline.from_json(current.value) == checked:
                return checked, False
        except PipelineError:
            pass
    raise AlreadyRegistered(
        f"pipeline {checked.key} already exists with another spec; versions are immutable: remove it "
        "first or register a new version"
    )


async def remove(store: Store, key: str) -> None:
    if not await store.delete(registry.PIPELINES + key):
        raise RegistrationError(f"pipeline {key} is not registered")


async def load_pipelines(store: Store) -> list[Pipeline]:
    """Every registered pipeline that parses, by key."""
    items, _ = await store.get_prefix(registry.PIPELINES)
    pipelines = []
    for item in items:
        try:
            pipelines.append(Pipeline.from_json(item.value))
        except PipelineError:
            continue
    return sorted(pipelines, key=lambda p: (p.name, version_order(p.version)))
