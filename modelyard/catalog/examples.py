"""The example models shipped for `modelyard up` and the tests, placed in a local artifact directory."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from modelyard.placement.model import Backend, ModelVersion

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# A python-backend model costs ~20 MiB (one stub process each); declare a little more.
EXAMPLE_MEMORY_BYTES = 32 * 1024 * 1024
EXAMPLE_NAMES = ("add_sub", "scale", "identity", "stream")


def tree_sha256(root: Path) -> str:
    """A content hash of a directory: relative paths and bytes of every file, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _signature(artifact: Path) -> str:
    from modelyard.catalog.modelstore import artifact_signature  # here: modelstore imports this module

    return artifact_signature(artifact)


def install_example(name: str, artifacts: Path, *, version: str = "1", replicas: int = 1) -> ModelVersion:
    """Copies one example model into `artifacts/<sha256>/` and returns its registration."""
    source = EXAMPLES_DIR / name
    if not (source / "config.pbtxt").is_file():
        raise ValueError(f"no example model named {name!r}; examples: {', '.join(EXAMPLE_NAMES)}")
    return install_model_dir(source, artifacts, name=name, version=version, replicas=replicas)


def install_model_dir(
    source: Path, artifacts: Path, *, name: str, version: str = "1", replicas: int = 1
) -> ModelVersion:
    """Copies a Triton model folder (`config.pbtxt` + `version/`) into `artifacts/<sha256>/` and returns
    its registration as `name@version`."""
    return store_example(
        source, artifacts, name=name, version=version, replicas=replicas, backend="triton",
        memory_bytes=EXAMPLE_MEMORY_BYTES,
    )  # fmt: skip


def store_example(
    source: Path,
    artifacts: Path,
    *,
    name: str,
    version: str,
    replicas: int,
    backend: Backend,
    memory_bytes: int,
) -> ModelVersion:
    """The one way an example model folder is stored: copied into `artifacts/<sha256>/` (through a staging
    folder renamed into place, so a half-copied artifact never has its final name) and registered as
    `name@version` with the signature its files declare."""
    sha = tree_sha256(source)
    target = artifacts / sha
    if not target.exists():
        artifacts.mkdir(parents=True, exist_ok=True)
        staging = artifacts / f".{sha}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
        staging.rename(target)
    return ModelVersion(
        name=name,
        version=version,
        backend=backend,
        kind="cpu",
        memory_bytes=memory_bytes,
        replicas=replicas,
        artifact_uri=target.resolve().as_uri(),
        sha256=sha,
        signature=_signature(target),
    )


CUSTOM_EXAMPLE_NAMES = ("linear",)


def install_custom_example(
    name: str, artifacts: Path, *, version: str = "1", replicas: int = 1
) -> ModelVersion:
    """A numpy model for our own container: `linear` computes OUTPUT = INPUT @ W + b (4 -> 2)."""
    import tempfile

    import numpy as np

    from modelyard.numpy_container.numpy_model import load_model_dir, write_model_dir

    if name != "linear":
        raise ValueError(
            f"no custom example model named {name!r}; examples: {', '.join(CUSTOM_EXAMPLE_NAMES)}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        source = write_model_dir(
            Path(tmp) / name,
            "linear",
            {
                "W": np.arange(8, dtype=np.float32).reshape(4, 2) / 10,
                "b": np.array([1.0, -1.0], dtype=np.float32),
            },
            inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1, 4]}],
            outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, 2]}],
        )
        memory = load_model_dir(source).memory_bytes
        return store_example(
            source, artifacts, name=name, version=version, replicas=replicas, backend="custom",
            memory_bytes=int(memory),
        )  # fmt: skip
