"""The example models shipped for `modelyard up` and the tests, placed in a local artifact directory.

The Triton examples are plain folders here; the examples each backend builds (our container's `linear`,
MLServer's `iris`, SageMaker's `sagemaker_scale`) live with their backend and store through
`store_example`."""

from __future__ import annotations

import shutil
from pathlib import Path

from modelyard.catalog.modelstore import artifact_signature, tree_sha256
from modelyard.placement.model import Backend, ModelVersion

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# A python-backend model costs ~20 MiB (one stub process each); declare a little more.
EXAMPLE_MEMORY_BYTES = 32 * 1024 * 1024
EXAMPLE_NAMES = ("add_sub", "scale", "identity", "stream")


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
        signature=artifact_signature(target),
    )
