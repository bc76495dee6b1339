"""Our own container's archives (`weights.npz` and an op): the check registered with the catalog by
containers/archives.py, and the example model `modelyard up` places."""

from __future__ import annotations

import tempfile
from pathlib import Path

from modelyard.catalog.examples import store_example
from modelyard.catalog.modelstore import ArchiveError, Manifest
from modelyard.placement.model import ModelVersion

CUSTOM_EXAMPLE_NAMES = ("linear",)


def check_archive(root: Path, manifest: Manifest) -> int:
    """Raises ArchiveError (one line) unless the weights fit the op and the signature; returns the model's
    memory in bytes."""
    from modelyard.numpy_container.numpy_model import ModelFormatError, load_model_dir  # numpy: ~0.1 s

    try:
        model = load_model_dir(root)
    except ModelFormatError as exc:
        raise ArchiveError(str(exc)) from exc
    return int(model.memory_bytes)


def install_custom_example(
    name: str, artifacts: Path, *, version: str = "1", replicas: int = 1
) -> ModelVersion:
    """A numpy model for our own container: `linear` computes OUTPUT = INPUT @ W + b (4 -> 2)."""
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
