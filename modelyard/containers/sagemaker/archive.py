"""Checking SageMaker model archives on upload (`modelyard models upload --backend sagemaker`).

The layout is SageMaker's own `model.tar.gz`: the model's files at the top and `code/inference.py` with
the toolkit's handler functions (`model_fn` required; `input_fn`, `predict_fn`, `output_fn` or
`transform_fn` optional, the toolkit's defaults otherwise), plus our `manifest.json` with the signature
(in the archive, or given with `--manifest`; SageMaker ignores it, so one archive serves both).

The router sends these models one tensor as `application/x-npy` and reads one back
(router/sagemaker_forward.py), so the signature must have exactly one input and one output of a numeric
or boolean datatype. `inference.py` is parsed, never run: an upload must not execute a model's code.
"""

from __future__ import annotations

import ast
from pathlib import Path

from modelyard.catalog.modelstore import ArchiveError, Manifest
from modelyard.placement.model import ModelVersion

# One MMS worker per model: a Python process with numpy and the toolkit imported (measured RSS ~70 MiB
# on this machine); a model smaller than that still costs it.
WORKER_MIN_BYTES = 96 * 1024 * 1024
NPY_DATATYPES = (
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
)
HANDLER_FUNCTIONS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")


def check_archive(root: Path, manifest: Manifest) -> int:
    """Raises ArchiveError (one line) unless `root` is a servable SageMaker model; returns its estimated
    footprint in bytes."""
    code = root / "code" / "inference.py"
    if not code.is_file():
        raise ArchiveError(
            "a sagemaker archive needs code/inference.py (SageMaker's model.tar.gz layout: the model's "
            "files at the top, its handler in code/)"
        )
    try:
        tree = ast.parse(code.read_bytes(), filename="code/inference.py")
    except SyntaxError as exc:
        raise ArchiveError(f"code/inference.py line {exc.lineno}: {exc.msg}") from exc
    defined = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in HANDLER_FUNCTIONS
    }
    if "model_fn" not in defined:
        raise ArchiveError("code/inference.py defines no model_fn (the toolkit has no default for it)")
    if "transform_fn" in defined and defined & {"input_fn", "predict_fn", "output_fn"}:
        raise ArchiveError(
            "code/inference.py defines transform_fn and input_fn/predict_fn/output_fn: the toolkit "
            "refuses that mix"
        )
    for what, tensors in (("inputs", manifest.inputs), ("outputs", manifest.outputs)):
        if len(tensors) != 1:
            raise ArchiveError(
                f"manifest.json: a sagemaker model has exactly one of {what} (it travels as one .npy "
                f"tensor), got {len(tensors)}"
            )
        name, datatype, _ = tensors[0]
        if datatype not in NPY_DATATYPES:
            raise ArchiveError(
                f"manifest.json: {what} {name}: datatype {datatype!r} cannot travel as .npy "
                f"(one of {', '.join(NPY_DATATYPES)})"
            )
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return max(size, WORKER_MIN_BYTES)


SAGEMAKER_EXAMPLE_NAMES = ("sagemaker_scale",)


def install_sagemaker_example(
    name: str, artifacts: Path, *, version: str = "1", replicas: int = 1
) -> ModelVersion:
    """Copies the SageMaker example into `artifacts/<sha256>/` and returns its registration."""
    from modelyard.catalog.examples import EXAMPLES_DIR, store_example

    if name not in SAGEMAKER_EXAMPLE_NAMES:
        raise ValueError(
            f"no sagemaker example model named {name!r}; examples: {', '.join(SAGEMAKER_EXAMPLE_NAMES)}"
        )
    return store_example(
        EXAMPLES_DIR / name, artifacts, name=name, version=version, replicas=replicas, backend="sagemaker",
        memory_bytes=WORKER_MIN_BYTES,
    )  # fmt: skip
