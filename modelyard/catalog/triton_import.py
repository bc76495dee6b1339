"""Registering Triton model directories and whole repositories as Triton users keep them.

- `upload_model_dir`: one model directory (or a `.tar.gz` of one): every numeric version folder, or the
  one asked for, registers as that version, exactly as `models upload` registers an archive (each version
  staged in our artifact layout, then checked, stored by sha256 and registered with a compare-and-swap).
- `import_repository`: every model and version of a repository (a folder or a `.tar.gz` of one) on the
  bulk import path (`bulk_import.import_lines`: archives stored once, keys created in batched
  transactions); ensembles then become pipelines (their step models registered first), or are refused
  with one line naming the ensemble.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

from modelyard.catalog import pipelines
from modelyard.catalog.bulk_import import CHUNK_LINES, ImportReport, import_lines
from modelyard.catalog.modelstore import DEFAULT_MAX_ARCHIVE_BYTES, ArchiveError, ModelStore, unpacked
from modelyard.catalog.registration import Registration, RegistrationError, upload
from modelyard.catalog.triton_repo import (
    CONFIG,
    VERSION_FILES,
    TritonRepoError,
    ensemble_pipeline,
    is_ensemble,
    is_model_dir,
    model_name,
    read_config,
    repository_models,
    stage_version,
    version_folders,
    versions_of,
)
from modelyard.placement.pipeline import PipelineError, parse_pipeline
from modelyard.placement.store import Store


def is_triton_model(archive: Path) -> bool:
    """A Triton model directory as Triton keeps it (config.pbtxt + numeric version folders), or a tar
    archive of one (read from its member list, nothing unpacked)."""
    if archive.is_dir():
        return is_model_dir(archive)
    if not archive.is_file():
        return False
    try:
        with tarfile.open(archive) as tar:
            names = [PurePosixPath(m.name) for m in tar.getmembers()]
    except (tarfile.TarError, OSError):
        return False  # the archive path reports it
    parts = [n.parts[1:] if n.parts[:1] == (".",) else n.parts for n in names]
    tops = {p[0] for p in parts if p}
    if len(tops) == 1 and not any(p == (CONFIG,) for p in parts):  # one top-level folder: its contents
        parts = [p[1:] for p in parts if len(p) > 1]
    top = {p[0] for p in parts if p}
    return (
        CONFIG in top
        and "manifest.json" not in top
        and VERSION_FILES not in top
        and any(t.isdigit() and int(t) > 0 for t in top)
    )


async def upload_model_dir(
    store: Store,
    model_store: ModelStore,
    archive: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    tenants: tuple[str, ...] = (),
    memory_bytes: int | None = None,
    replicas: int = 1,
    max_replicas: int = 0,
    kind: str = "cpu",
    expected_sha256: str | None = None,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
) -> list[Registration]:
    """Registers the version folders of one Triton model directory (`version`: only that one). An ensemble
    registers as a pipeline per version instead (returned as no Registration: see the log line).
    Raises TritonRepoError, ArchiveError or RegistrationError with one line."""
    is_dir = await asyncio.to_thread(archive.is_dir)
    with ExitStack() as stack:
        root, sha = stack.enter_context(unpacked(archive, max_archive_bytes))
        if expected_sha256 is not None and expected_sha256.lower() != sha:
            raise ArchiveError(f"sha256 mismatch: expected {expected_sha256}, archive is {sha}")
        config = await asyncio.to_thread(read_config, root)
        if name is None:
            name = config.name or (archive.name if is_dir else "")
            if not name:
                raise RegistrationError(f"{archive}: config.pbtxt names no model: give --name")
        if is_ensemble(config):
            raise TritonRepoError(
                f"model '{name}' is an ensemble: register it with `models import --triton-repo` together "
                "with its step models, or as a pipeline (`pipelines`)"
            )
        staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modelyard-triton-")))
        registrations = []
        for number in versions_of(root, version, name):
            staged = await asyncio.to_thread(stage_version, root, number, staging)
            registrations.append(
                await upload(
                    store,
                    model_store,
                    staged,
                    name=name,
                    version=number,
                    tenants=tenants,
                    memory_bytes=memory_bytes,
                    replicas=replicas,
                    max_replicas=max_replicas,
                    kind=kind,
                    max_archive_bytes=max_archive_bytes,
                    backend="triton",
                )
            )
        return registrations


def _staged_lines(
    models: list[Path], staging: Path, tenants: tuple[str, ...], labels: list[str], report: ImportReport
) -> Iterator[list[tuple[int, str]]]:
    """JSONL import lines for every version of the non-ensemble models, staged on the way, CHUNK_LINES at
    a time; `labels[number]` names each line's model@version. Refusals before a line exists (a config that
    does not parse, no version folder) go straight into `report`."""
    chunk: list[tuple[int, str]] = []
    for model_dir in models:
        try:
            config = read_config(model_dir)
            if is_ensemble(config):
                continue
            name = model_name(model_dir, config)
            versions = version_folders(model_dir)
            if not versions:
                raise TritonRepoError(f"model '{name}' has no numeric version folder")
        except TritonRepoError as exc:
            labels.append(model_dir.name)
            report.failed.append((len(labels) - 1, str(exc)))
            continue
        for version in versions:
            staged = stage_version(model_dir, version, staging)
            labels.append(f"{name}@{version}")
            line = {"name": name, "version": version, "archive": str(staged), "tenants": list(tenants)}
            chunk.append((len(labels) - 1, json.dumps(line)))
            if len(chunk) >= CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


async def import_repository(
    store: Store,
    model_store: ModelStore,
    repo: Path,
    *,
    tenants: tuple[str, ...] = (),
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    on_entry: Callable[[str, str | None], None] = lambda label, error: None,
) -> ImportReport:
    """Registers every model version of a Triton repository, then its ensembles as pipelines.

    `on_entry(model@version, error or None)` as each is settled. Like `import_models`, a version already
    registered with the same content is skipped, so importing the same repository again changes nothing.
    Raises TritonRepoError or ArchiveError when the repository itself cannot be read.
    """
    started = time.perf_counter()
    labels: list[str] = []
    with ExitStack() as stack:
        root = repo
        if not await asyncio.to_thread(repo.is_dir):
            root, _ = stack.enter_context(unpacked(repo, max_archive_bytes))
            if (root / CONFIG).is_file():  # a repository of one model: unpacked took its lone folder
                root = root.parent
        models = repository_models(root)
        staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modelyard-triton-repo-")))
        early = ImportReport()
        # Staging reads and copies files: a blocking generator drained chunk by chunk off the loop.
        lines = _staged_lines(models, staging, tenants, labels, early)
        chunks = await asyncio.to_thread(list, lines)
        report = await import_lines(
            store,
            model_store,
            chunks,
            staging,
            max_archive_bytes=max_archive_bytes,
            on_line=lambda number, error: on_entry(labels[number], error),
        )
        for number, error in early.failed:
            on_entry(labels[number], error)
        report.failed.extend(early.failed)
        for model_dir in models:
            await _register_ensemble(store, model_store, model_dir, tenants, report, labels, on_entry)
    report.seconds = time.perf_counter() - started
    return report


async def _register_ensemble(
    store: Store,
    model_store: ModelStore,
    model_dir: Path,
    tenants: tuple[str, ...],
    report: ImportReport,
    labels: list[str],
    on_entry: Callable[[str, str | None], None],
) -> None:
    try:
        config = await asyncio.to_thread(read_config, model_dir)
    except TritonRepoError:
        return  # reported with the models
    if not is_ensemble(config):
        return
    name = model_dir.name
    versions = version_folders(model_dir) or ["1"]
    for version in versions:
        labels.append(f"{name}@{version}")
        try:
            pipeline = parse_pipeline(ensemble_pipeline(name, version, config, tenants))
            _, created = await pipelines.register(store, pipeline, model_store)
        except (TritonRepoError, PipelineError, RegistrationError, ArchiveError) as exc:
            error = str(exc) if str(exc).startswith("ensemble") else f"ensemble '{name}': {exc}"
            report.failed.append((len(labels) - 1, error))
            on_entry(labels[-1], error)
            continue
        if created:
            report.pipelines += 1
        else:
            report.skipped += 1
        on_entry(labels[-1], None)
