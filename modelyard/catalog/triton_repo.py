"""Triton model repositories as Triton users keep them: `REPO/<model>/config.pbtxt` + numeric version folders.

`config.pbtxt` is parsed with protobuf's `text_format` against Triton's own `ModelConfig` message (the
`model_config_pb2` that tritonclient ships), so every field Triton accepts parses here too. Each version
folder becomes one artifact in the layout our Triton adapter loads (`config.pbtxt` + `version/`, the
version folder's files); the signature comes from config.pbtxt, so no manifest.json is needed. An ensemble
(`platform: "ensemble"`) becomes a pipeline spec (placement/pipeline.py: the same step semantics) or is
refused with one line naming the model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRITON_TYPES = {
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16",
}  # fmt: skip
CONFIG = "config.pbtxt"
VERSION_FILES = "version"  # our artifact layout's one version folder
Tensors = tuple[tuple[str, str, tuple[int, ...]], ...]


class TritonRepoError(ValueError):
    """A model directory or repository is refused; the message is one line naming the model."""


def read_config(model_dir: Path) -> Any:
    """`model_dir/config.pbtxt` as Triton's ModelConfig; raises TritonRepoError on a file that does not
    parse. Blocking file I/O."""
    # Imported here: protobuf and tritonclient cost ~0.2 s, and only Triton models need them.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = model_dir / CONFIG
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise TritonRepoError(f"{path}: does not parse: {' '.join(str(exc).split())}") from exc
    except OSError as exc:
        raise TritonRepoError(f"{path}: {exc.strerror or exc}") from exc


def declared_tensors(config: Any) -> tuple[Tensors, Tensors]:
    """The inputs and outputs config.pbtxt declares, as (name, KServe datatype, dims without batch)."""
    from tritonclient.grpc import model_config_pb2

    def tensors(items: Any) -> Tensors:
        return tuple(
            (t.name, TRITON_TYPES.get(model_config_pb2.DataType.Name(t.data_type), "?"), tuple(t.dims))
            for t in items
        )

    return tensors(config.input), tensors(config.output)


def manifest_from_config(config: Any) -> dict[str, Any]:
    """What our manifest.json would say for this config (backend, framework, signature)."""
    inputs, outputs = declared_tensors(config)

    def listed(items: Tensors) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in items]

    return {
        "backend": "triton",
        "framework": config.backend or config.platform,
        "inputs": listed(inputs),
        "outputs": listed(outputs),
    }


def is_ensemble(config: Any) -> bool:
    return bool(config.platform == "ensemble")


def version_folders(model_dir: Path) -> list[str]:
    """The numeric version folders of a Triton model directory, in numeric order ('0' is no version)."""
    return sorted(
        (p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0),
        key=int,
    )


def is_model_dir(path: Path) -> bool:
    """A Triton model directory as Triton keeps it: config.pbtxt and numeric version folders (not our
    artifact layout's `version/`, nor an archive with our manifest.json)."""
    return (
        (path / CONFIG).is_file()
        and not (path / VERSION_FILES).is_dir()
        and not (path / "manifest.json").exists()
        and bool(version_folders(path))
    )


def repository_models(repo: Path) -> list[Path]:
    """The model directories of a repository (folders holding config.pbtxt), by name."""
    if not repo.is_dir():
        raise TritonRepoError(f"{repo}: not a directory")
    models = sorted(p for p in repo.iterdir() if p.is_dir() and (p / CONFIG).is_file())
    if not models:
        raise TritonRepoError(f"{repo}: no model directories (folders with {CONFIG}) in it")
    return models


def model_name(model_dir: Path, config: Any) -> str:
    """Triton's rule: the directory's name is the model's; a config naming another is refused there."""
    if config.name and config.name != model_dir.name:
        raise TritonRepoError(
            f"model '{model_dir.name}': config.pbtxt names it '{config.name}' "
            "(Triton requires the folder's name)"
        )
    return model_dir.name


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows one (staging reads the files once more, never writes
    them), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage_version(model_dir: Path, version: str, into: Path) -> Path:
    """One version of a Triton model directory in our artifact layout, under `into` (a new folder):
    config.pbtxt as it is and `version/` holding the version folder's files. Blocking file I/O."""
    source = model_dir / version
    if not source.is_dir():
        raise TritonRepoError(f"model '{model_dir.name}' has no version folder {version}/")
    target = into / f"{model_dir.name}@{version}"
    target.mkdir(parents=True)
    _link_or_copy(str(model_dir / CONFIG), str(target / CONFIG))
    shutil.copytree(
        source,
        target / VERSION_FILES,
        ignore=shutil.ignore_patterns("__pycache__"),
        copy_function=_link_or_copy,
    )
    return target


def ensemble_pipeline(name: str, version: str, config: Any, tenants: tuple[str, ...]) -> dict[str, Any]:
    """An ensemble's config as a pipeline spec (placement.pipeline.parse_pipeline's input): the same step
    semantics (input_map/output_map between model and ensemble tensors, one producer per tensor). Refuses
    with one line what a pipeline cannot express."""
    steps = config.ensemble_scheduling.step
    if not steps:
        raise TritonRepoError(f"ensemble '{name}': no ensemble_scheduling steps")
    if config.max_batch_size > 0:
        raise TritonRepoError(
            f"ensemble '{name}': max_batch_size {config.max_batch_size} (batched ensembles are not "
            "supported; use max_batch_size 0 and full shapes)"
        )
    inputs, outputs = declared_tensors(config)
    spec_steps = []
    for i, step in enumerate(steps):
        if step.model_version > 0:
            model = f"{step.model_name}@{step.model_version}"
        else:
            model = step.model_name
        spec_steps.append(
            {
                "name": f"{i}-{step.model_name}",
                "model": model,
                "inputs": dict(step.input_map),
                "outputs": dict(step.output_map),
            }
        )
    spec: dict[str, Any] = {
        "name": name,
        "version": version,
        "inputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in outputs],
        "steps": spec_steps,
    }
    if tenants:
        spec["tenants"] = list(tenants)
    return spec


def versions_of(model_dir: Path, only: str | None = None, name: str = "") -> Iterator[str]:
    """The versions to register: every numeric folder, or `only` (which must be one of them); `name`: the
    model's, for messages (an unpacked archive's folder has another)."""
    found = version_folders(model_dir)
    if only is None:
        yield from found
        return
    if only not in found:
        listed = ", ".join(found) or "none"
        raise TritonRepoError(
            f"model '{name or model_dir.name}' has no version folder {only}/ (version folders: {listed})"
        )
    yield only
