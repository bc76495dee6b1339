"""Triton model directories and repositories as Triton users keep them: `models upload DIR` and
`models import --triton-repo REPO`, through the real command line against a real embedded store."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from modelyard.catalog.examples import EXAMPLES_DIR
from modelyard.catalog.pipelines import load_pipelines
from modelyard.placement import registry
from modelyard.placement.model import parse_signature
from modelyard.placement.store import open_store

SCALE_CONFIG = (EXAMPLES_DIR / "scale" / "config.pbtxt").read_text()
SCALE_CODE = (EXAMPLES_DIR / "scale" / "version" / "model.py").read_text()
ENSEMBLE_CONFIG = """
name: "double_twice"
platform: "ensemble"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
ensemble_scheduling {
  step [
    { model_name: "scale" model_version: -1
      input_map { key: "INPUT" value: "X" } output_map { key: "OUTPUT" value: "twice" } },
    { model_name: "scale" model_version: 1
      input_map { key: "INPUT" value: "twice" } output_map { key: "OUTPUT" value: "Y" } }
  ]
}
"""


def triton_model(repo: Path, name: str, versions: tuple[str, ...] = ("1",), config: str = "") -> Path:
    """A Triton model directory: config.pbtxt and a model.py in each numeric version folder."""
    model_dir = repo / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config or SCALE_CONFIG.replace('"scale"', f'"{name}"'))
    for version in versions:
        (model_dir / version).mkdir()
        (model_dir / version / "model.py").write_text(SCALE_CODE + f"\n# version {version}\n")
    return model_dir


def modelyard(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args,
         "--store", str(tmp_path / "store"), "--model-store", str(tmp_path / "artifacts")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def registered(tmp_path: Path) -> dict[str, dict]:
    async def main() -> dict[str, dict]:
        async with open_store(str(tmp_path / "store")) as store:
            items, _ = await store.get_prefix(registry.MODELS)
            return {item.key.removeprefix(registry.MODELS): json.loads(item.value) for item in items}

    return asyncio.run(main())


def test_each_version_folder_registers_as_that_version_with_its_config_signature(tmp_path: Path) -> None:
    model_dir = triton_model(tmp_path / "repo", "scale", ("1", "2", "10"))
    done = modelyard("models", "upload", str(model_dir), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines()] == ["scale@1", "scale@2", "scale@10"]
    models = registered(tmp_path)
    assert sorted(models) == ["scale@1", "scale@10", "scale@2"]
    assert len({m["sha256"] for m in models.values()}) == 3  # each version its own files
    inputs, outputs, decoupled = parse_signature(models["scale@2"]["signature"])
    assert inputs == (("INPUT", "FP32", (-1,)),) and outputs == (("OUTPUT", "FP32", (-1,)),)
    assert not decoupled


def test_version_flag_registers_only_that_folder_and_an_absent_one_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    model_dir = triton_model(tmp_path / "repo", "scale", ("1", "2"))
    done = modelyard("models", "upload", str(model_dir), "--version", "2", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(registered(tmp_path)) == ["scale@2"]
    refused = modelyard("models", "upload", str(model_dir), "--version", "3", tmp_path=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: model 'scale' has no version folder 3/ (version folders: 1, 2)"


def test_a_tar_gz_of_a_model_directory_registers_like_the_folder(tmp_path: Path) -> None:
    model_dir = triton_model(tmp_path / "repo", "scale", ("1", "2"))
    archive = tmp_path / "scale.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname="scale")
    done = modelyard("models", "upload", str(archive), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(registered(tmp_path)) == ["scale@1", "scale@2"]
    # Same files as the folder: uploading the folder now changes nothing.
    again = modelyard("models", "upload", str(model_dir), tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already registered, unchanged:") == 2


@pytest.mark.parametrize("example", ["add_sub", "scale", "identity", "stream", "accumulate"])
def test_every_example_uploads_as_documented(example: str, tmp_path: Path) -> None:
    done = modelyard("models", "upload", str(EXAMPLES_DIR / example), "--version", "1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"registered {example}@1 (triton, cpu, ")
    assert registered(tmp_path)[f"{example}@1"]["backend"] == "triton"


def test_a_config_that_does_not_parse_is_refused_with_one_line(tmp_path: Path) -> None:
    model_dir = triton_model(tmp_path / "repo", "broken", config='name: "broken"\ninput [ { nme: "X" } ]\n')
    done = modelyard("models", "upload", str(model_dir), tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "config.pbtxt" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_import_registers_every_model_and_version_of_a_repository_for_the_tenants(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    triton_model(repo, "scale", ("1", "2"))
    triton_model(repo, "other", ("3",))
    done = modelyard(
        "models", "import", "--triton-repo", str(repo), "--tenants", "acme,zed", tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 3, skipped 0, failed 0")
    models = registered(tmp_path)
    assert sorted(models) == ["other@3", "scale@1", "scale@2"]
    assert all(m["tenants"] == ["acme", "zed"] for m in models.values())
    again = modelyard(
        "models", "import", "--triton-repo", str(repo), "--tenants", "acme,zed", tmp_path=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("imported 0, skipped 3, failed 0")


def test_a_bad_model_in_a_repository_fails_alone_naming_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    triton_model(repo, "scale")
    triton_model(repo, "broken", config='name: "broken"\nplatform: 7\n')
    triton_model(repo, "misnamed", config='name: "elsewhere"\nbackend: "python"\n')
    done = modelyard("models", "import", "--triton-repo", str(repo), tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stdout.startswith("imported 1, skipped 0, failed 2")
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2
    assert any(line.startswith(f"{repo}: broken: ") and "config.pbtxt" in line for line in errors)
    assert any("model 'misnamed': config.pbtxt names it 'elsewhere'" in line for line in errors)
    assert sorted(registered(tmp_path)) == ["scale@1"]


def test_an_ensemble_becomes_a_pipeline_over_its_step_models(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    triton_model(repo, "scale", ("1",))
    (repo / "double_twice" / "1").mkdir(parents=True)
    (repo / "double_twice" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    done = modelyard("models", "import", "--triton-repo", str(repo), "--tenants", "acme", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 1, 1 ensembles as pipelines, skipped 0, failed 0")

    async def main() -> list:
        async with open_store(str(tmp_path / "store")) as store:
            return await load_pipelines(store)

    [pipeline] = asyncio.run(main())
    assert (pipeline.name, pipeline.version, pipeline.tenants) == ("double_twice", "1", ("acme",))
    assert [step.model for step in pipeline.steps] == ["scale", "scale@1"]
    assert [t.name for t in pipeline.inputs] == ["X"] and [t.name for t in pipeline.outputs] == ["Y"]


def test_an_ensemble_over_a_missing_model_is_refused_with_one_line_naming_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "double_twice" / "1").mkdir(parents=True)
    (repo / "double_twice" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    triton_model(repo, "unrelated")
    done = modelyard("models", "import", "--triton-repo", str(repo), tmp_path=tmp_path)
    assert done.returncode == 2
    [error] = done.stderr.strip().splitlines()
    assert error.startswith(f"{repo}: double_twice@1: ensemble 'double_twice': ")
    assert "model 'scale' is not registered" in error
    single = modelyard("models", "upload", str(repo / "double_twice"), tmp_path=tmp_path)
    assert single.returncode == 2
    assert single.stderr.startswith("error: model 'double_twice' is an ensemble")


def test_a_repository_tar_gz_imports_like_the_folder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    triton_model(repo, "scale", ("1", "2"))
    archive = tmp_path / "repo.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(repo, arcname="repo")
    shutil.rmtree(repo)
    done = modelyard("models", "import", "--triton-repo", str(archive), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(registered(tmp_path)) == ["scale@1", "scale@2"]
