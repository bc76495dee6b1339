"""`modelyard models import`: many model versions from one JSONL file, in batched conditional writes.

One JSON object per line: `name`, `version`, `archive` (a path, relative to the file's folder), optional
`tenants` (list), `memory_bytes`, `replicas`, `max_replicas`, `kind`. Each line is registered whole or not
at all, exactly like `models upload` (same checks, same compare-and-swap), but

- each archive is checked and stored once however many lines name it (cached by its name for the length
  of the import; identical archives under other paths land once too, by sha256),
- registry keys are created in batches with the store's `put_absent` (one transaction per batch),
- a bad line is reported with its number and the others go on; a line whose version is already
  registered with the same content is skipped, so running the same file again changes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard.catalog.modelstore import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    ArchiveError,
    ModelStore,
    artifact_signature,
    checked,
)
from modelyard.catalog.registration import (
    RegistrationError,
    check_name,
    check_settings,
    conflict,
    parse_registered,
    same_registration,
)
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import KeyValue, Store

# Lines prepared before their keys are written: big enough for full store batches, small enough that
# progress moves and memory stays flat for any file size.
CHUNK_LINES = 2_000
_FIELDS = {"name", "version", "archive", "tenants", "memory_bytes", "replicas", "max_replicas", "kind"}


@dataclass(frozen=True)
class StoredArchive:
    """What registration needs from a checked and stored archive."""

    sha256: str
    backend: str
    memory_bytes: int
    uri: str
    signature: str  # placement.model.signature_json


@dataclass
class ImportReport:
    imported: int = 0
    skipped: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line number, one-line reason)
    seconds: float = 0.0
    pipelines: int = 0  # Triton ensembles registered as pipelines

    def summary(self) -> str:
        pipelines = f", {self.pipelines} ensembles as pipelines" if self.pipelines else ""
        return (
            f"imported {self.imported}{pipelines}, skipped {self.skipped}, failed {len(self.failed)} "
            f"in {self.seconds:.1f} s"
        )


class ArchiveCache:
    """Checks and stores each archive once per import; a refused archive is refused once, too.

    Keyed by the archive as the lines name it (relative to the import's folder): the first line naming it
    checks and stores it, later lines reuse that result without touching the file again, so an archive
    replaced while the import runs is registered as it was first read. The same file under two spellings
    is checked twice and stored once (the model store keys archives by sha256).
    """

    def __init__(self, model_store: ModelStore, max_archive_bytes: int) -> None:
        self._model_store = model_store
        self._max_archive_bytes = max_archive_bytes
        self._results: dict[tuple[Path, str], StoredArchive | ArchiveError] = {}

    def stored(self, folder: Path, archive: str) -> StoredArchive:
        result = self._results.get((folder, archive))
        if result is None:
            result = self._check_and_store(folder / archive)
            self._results[(folder, archive)] = result
        if isinstance(result, ArchiveError):
            raise result
        return result

    def _check_and_store(self, path: Path) -> StoredArchive | ArchiveError:
        try:
            path.stat()
        except OSError as exc:
            return ArchiveError(f"{path}: {exc.strerror or exc}")
        try:
            with checked(path, max_bytes=self._max_archive_bytes) as artifact:
                signature = artifact_signature(artifact.root)
                uri = self._model_store.put(artifact)
                return StoredArchive(
                    artifact.sha256, artifact.manifest.backend, artifact.memory_bytes, uri, signature
                )
        except ArchiveError as exc:
            return exc
        except OSError as exc:  # the model store's disk, not the archive: still one line for this line
            return ArchiveError(f"cannot store {path}: {exc.strerror or exc}")


def _field(entry: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = entry.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RegistrationError(f"{name} must be {expected}, got {value!r}")
    return value


def model_for_line(text: str, folder: Path, archives: ArchiveCache) -> ModelVersion:
    """The registration one line asks for; raises RegistrationError or ArchiveError with one line."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistrationError(f"not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(entry, dict):
        raise RegistrationError("each line must be a JSON object")
    missing = [name for name in ("name", "version", "archive") if name not in entry]
    if missing:
        raise RegistrationError(f"missing {', '.join(missing)}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise RegistrationError(f"unknown field {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    name = _field(entry, "name", str)
    version = str(_field(entry, "version", (str, int)))
    archive = _field(entry, "archive", str)
    tenants = _field(entry, "tenants", list, ())
    if not all(isinstance(t, str) and t for t in tenants):
        raise RegistrationError(f"tenants must be a list of non-empty strings, got {tenants!r}")
    memory_bytes = _field(entry, "memory_bytes", int)
    replicas = _field(entry, "replicas", int, 1)
    max_replicas = _field(entry, "max_replicas", int, 0)
    kind = _field(entry, "kind", str, "cpu")
    check_settings(kind, replicas, memory_bytes, max_replicas)
    stored = archives.stored(folder, archive)
    check_name(name, version, stored.backend)
    return ModelVersion(
        name=name,
        version=version,
        backend=stored.backend,  # type: ignore[arg-type]  # one of BACKENDS (read_manifest)
        kind=kind,
        memory_bytes=memory_bytes or stored.memory_bytes,
        replicas=replicas,
        max_replicas=max_replicas,
        artifact_uri=stored.uri,
        sha256=stored.sha256,
        tenants=tuple(sorted(set(tenants))),
        signature=stored.signature,
    )


def _chunks(path: Path) -> Iterator[list[tuple[int, str]]]:
    """Non-blank lines with their 1-based numbers, CHUNK_LINES at a time."""
    chunk: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                chunk.append((number, line))
                if len(chunk) >= CHUNK_LINES:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for line in file if line.strip())


async def import_models(
    store: Store,
    model_store: ModelStore,
    path: Path,
    *,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    on_line: Callable[[int, str | None], None] = lambda number, error: None,
) -> ImportReport:
    """Registers every good line of `path`; `on_line(number, error or None)` as each line is settled.

    Raises OSError when the file cannot be read and StoreError when the store fails (the lines written
    so far stay registered; running the import again skips them).
    """
    return await import_lines(
        store, model_store, _chunks(path), path.parent, max_archive_bytes=max_archive_bytes, on_line=on_line
    )


async def import_lines(
    store: Store,
    model_store: ModelStore,
    chunks: Iterable[list[tuple[int, str]]],
    folder: Path,
    *,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    on_line: Callable[[int, str | None], None] = lambda number, error: None,
) -> ImportReport:
    """`import_models` over lines already read: (number, JSON text) in chunks, archives relative to
    `folder`. The one bulk path, for a JSONL file and a Triton repository alike."""
    started = time.perf_counter()
    archives = ArchiveCache(model_store, max_archive_bytes)
    report = ImportReport()
    # What the store holds for each key this import has met (None: a value that does not parse), so a
    # key repeated further down the file is judged without another store round trip.
    registered: dict[str, ModelVersion | None] = {}

    def settle(number: int, model: ModelVersion, existing: ModelVersion | None, *, created: bool) -> None:
        if created:
            report.imported += 1
            on_line(number, None)
        elif existing is not None and same_registration(existing, model):
            report.skipped += 1
            on_line(number, None)
        else:
            fail(number, str(conflict(existing, model)))

    def fail(number: int, error: str) -> None:
        report.failed.append((number, error))
        on_line(number, error)

    for chunk in chunks:
        wanted: dict[str, tuple[int, ModelVersion]] = {}
        repeats: list[tuple[int, ModelVersion]] = []
        for number, text in chunk:
            try:
                model = model_for_line(text, folder, archives)
            except (RegistrationError, ArchiveError) as exc:
                fail(number, str(exc))
                continue
            key = model.key
            if key in wanted or key in registered:
                repeats.append((number, model))
            else:
                wanted[key] = (number, model)
        present = await registry.create_models(store, [model for _, model in wanted.values()])
        for key, (number, model) in wanted.items():
            if key in present:
                registered[key] = parse_registered(KeyValue(registry.MODELS + key, present[key], 0))
                settle(number, model, registered[key], created=False)
            else:
                registered[key] = model
                settle(number, model, None, created=True)
        for number, model in repeats:
            settle(number, model, registered[model.key], created=False)
    report.failed.sort()
    report.seconds = time.perf_counter() - started
    return report
