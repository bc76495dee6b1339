"""Model archives and the content-addressed model store.

An archive (`.tar.gz`, `.tgz`, `.tar` or a directory) holds a model version's files and `manifest.json`:

    {"backend": "triton" | "custom", "framework": "python" | "numpy",
     "memory_bytes": 123,                       # optional declared footprint
     "inputs":  [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
     "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
     ...backend-specific keys (custom: "op")}

- triton: `config.pbtxt` and `version/` (the files of one Triton version folder, e.g. `model.py`); the
  manifest's signature must match config.pbtxt's inputs and outputs.
- custom: `weights.npz` for our own container (numpy_container/numpy_model checks weights against the op and
  the signature).
- sagemaker: SageMaker's model.tar.gz layout (the model's files, `code/inference.py`), with manifest.json
  inside or given apart (`--manifest`); containers/sagemaker/archive.py checks it.
- mlserver: `model-settings.json` and the model file it names (scikit-learn, XGBoost), for MLServer
  (containers/mlserver/adapter.py checks them).

The catalog imports no backend: each backend's check is registered here (`register_archive_check`, done
for all of them by containers/archives.py), and an archive of a backend with no registered check is
refused with `NoArchiveCheck`, never let through unchecked.

Archives are checked completely before anything is written, then stored under their sha256 (the bytes of
an archive file, or a hash of a directory's files): copied into a staging folder, every file and folder
fsynced, then renamed into place (and the parent fsynced), so a store never holds half an artifact, not
even after a power cut. Archives larger than a limit (packed or unpacked) are refused before unpacking.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from modelyard.catalog.triton_repo import (
    TRITON_TYPES,
    TritonRepoError,
    manifest_from_config,
    read_config,
)
from modelyard.placement.units import format_bytes

BACKENDS = ("triton", "custom", "mlserver", "sagemaker")
# Archives (packed, and their unpacked files) above this are refused: a typo'd path to a dataset, or a
# decompression bomb, must not fill the artifact store's disk.
DEFAULT_MAX_ARCHIVE_BYTES = 2 * 1024**3
MAX_ARCHIVE_BYTES_ENV = "MODELYARD_MAX_ARCHIVE_BYTES"


class ArchiveError(ValueError):
    """An archive is refused; the message is one line naming what is wrong."""


class NoArchiveCheck(RuntimeError):
    """An archive's backend has no registered check: the program forgot to register the backends (a bug,
    not a bad archive), so the archive is refused rather than stored unchecked."""


@dataclass(frozen=True)
class Manifest:
    backend: str
    framework: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    memory_bytes: int | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class CheckedArchive:
    """An archive that passed every check, unpacked in a temporary directory."""

    root: Path
    sha256: str
    manifest: Manifest
    memory_bytes: int  # declared, else estimated from the files


ArchiveCheck = Callable[[Path, Manifest], int]
"""A backend's check of an unpacked archive: raises ArchiveError (one line) or returns the estimated
memory_bytes of the model."""
_ARCHIVE_CHECKS: dict[str, ArchiveCheck] = {}


def register_archive_check(backend: str, check: ArchiveCheck) -> None:
    """Makes `check` the one that archives of `backend` must pass (registering again replaces it)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    _ARCHIVE_CHECKS[backend] = check


def archive_check(backend: str) -> ArchiveCheck:
    """The registered check of `backend`'s archives; NoArchiveCheck when none is."""
    try:
        return _ARCHIVE_CHECKS[backend]
    except KeyError:
        raise NoArchiveCheck(
            f"no archive check registered for backend {backend!r}: the program must call "
            "modelyard.containers.archives.register_archive_checks() before it checks archives"
        ) from None


def registered_archive_checks() -> frozenset[str]:
    """The backends whose archives can be checked now."""
    return frozenset(_ARCHIVE_CHECKS)


def tree_sha256(root: Path) -> str:
    """A content hash of a directory: relative paths and bytes of every file, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _signature(items: Any, where: str) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    if not isinstance(items, list) or not items:
        raise ArchiveError(f"manifest.json: {where} must be a non-empty list")
    out = []
    for item in items:
        try:
            name, datatype, shape = item["name"], item["datatype"], item["shape"]
        except (TypeError, KeyError) as exc:
            raise ArchiveError(f"manifest.json: each of {where} needs name, datatype and shape") from exc
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise ArchiveError(f"manifest.json: {where} entry {item!r} has the wrong types")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise ArchiveError(f"manifest.json: {where} {name}: shape must be integers >= -1")
        out.append((name, datatype, tuple(shape)))
    return tuple(out)


def read_manifest(root: Path) -> Manifest:
    """manifest.json; without one, a Triton model's config.pbtxt says the same (Triton users bring no
    manifest: `config.pbtxt` + `version/`, the layout Triton model directories are staged into)."""
    path = root / "manifest.json"
    if not path.is_file():
        if (root / "config.pbtxt").is_file() and (root / "version").is_dir():
            try:
                raw = manifest_from_config(read_config(root))
            except TritonRepoError as exc:
                raise ArchiveError(str(exc).replace(str(root) + "/", "")) from exc
        else:
            raise ArchiveError(
                "archive has neither manifest.json nor a Triton model's config.pbtxt at its top level"
            )
    else:
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArchiveError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArchiveError("manifest.json must be a JSON object")
    backend = raw.get("backend")
    if backend not in BACKENDS:
        raise ArchiveError(
            f"manifest.json: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})"
        )
    memory = raw.get("memory_bytes")
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0):
        raise ArchiveError(f"manifest.json: memory_bytes must be a positive integer, got {memory!r}")
    return Manifest(
        backend=backend,
        framework=str(raw.get("framework", "")),
        inputs=_signature(raw.get("inputs"), "inputs"),
        outputs=_signature(raw.get("outputs"), "outputs"),
        memory_bytes=memory,
        raw=raw,
    )


def artifact_signature(root: Path) -> str:
    """The signature an artifact folder declares, as ModelVersion.signature stores it (`signature_json`):
    manifest.json's inputs and outputs (else config.pbtxt's, a batch dimension shown as -1); decoupled
    when config.pbtxt says so or the manifest's op is `stream`. Blocking file I/O."""
    from modelyard.placement.model import Tensors, signature_json

    manifest_path, config_path = root / "manifest.json", root / "config.pbtxt"
    if not manifest_path.is_file() and not config_path.is_file():
        raise ArchiveError(f"its artifact {root} has neither manifest.json nor config.pbtxt")
    decoupled = False
    signature: dict[str, Tensors] = {}
    if config_path.is_file():
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        try:
            config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        except (text_format.ParseError, UnicodeDecodeError, OSError) as exc:
            raise ArchiveError(f"its config.pbtxt does not parse: {' '.join(str(exc).split())}") from exc
        batch = (-1,) if config.max_batch_size > 0 else ()
        decoupled = config.model_transaction_policy.decoupled
        for what, tensors in (("inputs", config.input), ("outputs", config.output)):
            signature[what] = tuple(
                (
                    t.name,
                    TRITON_TYPES.get(model_config_pb2.DataType.Name(t.data_type), "?"),
                    batch + tuple(t.dims),
                )
                for t in tensors
            )
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            for what in ("inputs", "outputs"):
                signature[what] = tuple((t["name"], t["datatype"], tuple(t["shape"])) for t in manifest[what])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArchiveError(f"its manifest.json has no readable signature ({exc})") from exc
        decoupled = decoupled or manifest.get("op") == "stream"
    return signature_json(signature["inputs"], signature["outputs"], decoupled)


def _too_big(archive: Path, size: int, limit: int, what: str) -> ArchiveError:
    return ArchiveError(
        f"{archive}: {what} {format_bytes(size)}, over the {format_bytes(limit)} archive limit "
        f"(--max-archive-bytes or ${MAX_ARCHIVE_BYTES_ENV})"
    )


@contextmanager
def unpacked(archive: Path, max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> Iterator[tuple[Path, str]]:
    """The archive's files in a temporary directory, and the archive's sha256.

    Refuses an archive whose file, or whose unpacked files together, exceed `max_bytes`.
    """
    if archive.is_dir():
        size = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
        if size > max_bytes:
            raise _too_big(archive, size, max_bytes, "its files hold")
        with tempfile.TemporaryDirectory(prefix="modelyard-archive-") as tmp:
            root = Path(tmp) / "model"
            shutil.copytree(archive, root, ignore=shutil.ignore_patterns("__pycache__"))
            yield root, tree_sha256(root)
        return
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such file or directory")
    packed = archive.stat().st_size
    if packed > max_bytes:
        raise _too_big(archive, packed, max_bytes, "the archive is")
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a tar archive ({exc})") from exc
    with tar, tempfile.TemporaryDirectory(prefix="modelyard-archive-") as tmp:
        root = Path(tmp) / "model"
        root.mkdir()
        try:
            # The members' declared sizes, read before anything is written (a gzip bomb stops here).
            unpacked_bytes = sum(member.size for member in tar.getmembers() if member.isfile())
            if unpacked_bytes > max_bytes:
                raise _too_big(archive, unpacked_bytes, max_bytes, "its files unpack to")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, filter="data")  # refuses absolute paths, links out of the tree, devices
            else:  # Pythons before 3.11.4 without the backport: plain files and folders inside the tree only
                members = tar.getmembers()
                for member in members:
                    if (
                        not (member.isfile() or member.isdir())
                        or member.name.startswith("/")
                        or (".." in Path(member.name).parts)
                    ):
                        raise ArchiveError(f"{archive}: refusing archive member {member.name!r}")
                tar.extractall(root, members=members)
        except (tarfile.TarError, OSError) as exc:
            raise ArchiveError(f"{archive}: cannot unpack: {exc}") from exc
        entries = list(root.iterdir())
        lone = entries[0] if len(entries) == 1 and entries[0].is_dir() else None
        # An archive of one top-level folder; a SageMaker archive's lone code/ folder is content.
        if lone is not None and lone.name != "code" and not (root / "manifest.json").exists():
            root = lone
        yield root, digest.hexdigest()


def _add_manifest(root: Path, manifest_file: Path, backend: str | None) -> str:
    """Puts a manifest given apart from the archive into it (with `backend` when it names none); returns
    the artifact's new sha256 (a hash of its files, the manifest included)."""
    if (root / "manifest.json").exists():
        raise ArchiveError("the archive has its own manifest.json; leave out --manifest or that file")
    try:
        raw = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{manifest_file}: not a readable JSON manifest ({exc})") from exc
    if isinstance(raw, dict) and backend is not None:
        raw.setdefault("backend", backend)
    (root / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n")
    return tree_sha256(root)


@contextmanager
def checked(
    archive: Path,
    expected_sha256: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    backend: str | None = None,
    manifest_file: Path | None = None,
) -> Iterator[CheckedArchive]:
    """`backend`: the archive must be of this backend; `manifest_file`: our manifest, given apart from an
    archive that has none (a SageMaker model.tar.gz as it is)."""
    with unpacked(archive, max_bytes) as (root, sha):
        if expected_sha256 is not None and expected_sha256.lower() != sha:
            raise ArchiveError(f"sha256 mismatch: expected {expected_sha256}, archive is {sha}")
        if manifest_file is not None:
            sha = _add_manifest(root, manifest_file, backend)
        elif backend == "sagemaker" and not (root / "manifest.json").exists():
            raise ArchiveError(
                "a sagemaker archive needs our manifest.json (its signature): put it in the archive or "
                "pass --manifest FILE"
            )
        manifest = read_manifest(root)
        if backend is not None and manifest.backend != backend:
            raise ArchiveError(f"manifest.json says backend {manifest.backend!r}, not {backend!r}")
        estimate = archive_check(manifest.backend)(root, manifest)
        yield CheckedArchive(root, sha, manifest, manifest.memory_bytes or estimate)


class ModelStore(abc.ABC):
    """Where artifacts live, by sha256. Local directories now; the interface leaves room for S3."""

    @abc.abstractmethod
    def put(self, archive: CheckedArchive) -> str:
        """Stores the unpacked archive (idempotent) and returns its artifact URI."""

    @abc.abstractmethod
    def has(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def remove(self, sha256: str) -> None: ...

    @abc.abstractmethod
    def local_path(self, uri: str) -> Path:
        """A local directory with the artifact's files (a download cache for remote stores)."""

    def check(self) -> None:
        """Raises ArchiveError (one line) when the store cannot be used (a remote store's bucket or
        credentials); a local directory is created on first use."""
        return None


def file_path(uri: str) -> Path | None:
    """The local path a `file://` URI (or a bare path) names; None for any other scheme. The one parser of
    artifact and model-store locations (model store, Triton adapter, our container)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)) if parsed.path else None
    return Path(uri) if not parsed.scheme and uri else None


def _fsync_path(path: Path, *, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root` (and `root`) on disk, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder, name), directory=False)
        _fsync_path(Path(folder), directory=True)


class LocalModelStore(ModelStore):
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, archive: CheckedArchive) -> str:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            _fsync_path(self.root.parent, directory=True)
        target = self.root / archive.sha256
        if not target.exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{archive.sha256}.", dir=self.root))
            try:
                shutil.copytree(archive.root, staging, dirs_exist_ok=True)
                staging.chmod(0o755)  # mkdtemp makes it owner-only; containers may run as other users
                # Contents durable before the name: after a crash the artifact is whole or absent.
                _fsync_tree(staging)
                staging.rename(target)
                _fsync_path(self.root, directory=True)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not target.exists():
                    raise
        return target.resolve().as_uri()

    def has(self, sha256: str) -> bool:
        return (self.root / sha256).is_dir()

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.root / sha256, ignore_errors=True)

    def local_path(self, uri: str) -> Path:
        path = file_path(uri)
        if path is None:
            raise ArchiveError(f"unsupported artifact URI {uri!r}")
        return path
