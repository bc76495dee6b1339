"""Checking Triton model archives on upload: `config.pbtxt` and `version/`, their signature against the
manifest's (registered with the catalog by containers/archives.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelyard.catalog.modelstore import ArchiveError, Manifest
from modelyard.catalog.triton_repo import TRITON_TYPES

# A python-backend model runs in its own stub process (~20 MiB) whatever its files weigh.
TRITON_PYTHON_MIN_BYTES = 32 * 1024 * 1024


def check_archive(root: Path, manifest: Manifest) -> int:
    """Raises ArchiveError (one line) unless `root` is a Triton model folder matching the manifest;
    returns its estimated footprint in bytes."""
    # Imported here: protobuf and tritonclient cost ~0.2 s, and only Triton archives need them.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config_path = root / "config.pbtxt"
    if not config_path.is_file() or not (root / "version").is_dir():
        raise ArchiveError("a triton archive needs config.pbtxt and a version/ folder")
    try:
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"config.pbtxt does not parse: {exc}") from exc

    def declared(tensors: Any) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple(
            (t.name, TRITON_TYPES.get(model_config_pb2.DataType.Name(t.data_type), "?"), tuple(t.dims))
            for t in tensors
        )

    for what, ours, theirs in (
        ("inputs", manifest.inputs, declared(config.input)),
        ("outputs", manifest.outputs, declared(config.output)),
    ):
        if sorted(ours) != sorted(theirs):
            raise ArchiveError(f"manifest {what} {list(ours)} do not match config.pbtxt's {list(theirs)}")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return max(size, TRITON_PYTHON_MIN_BYTES) if config.backend == "python" else size
