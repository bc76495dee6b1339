"""The catalog checks archives only through the checks the backends register: an archive of a backend with
no registered check is refused, never stored unchecked, and `modelyard models` registers every backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelyard.catalog import modelstore
from modelyard.catalog.modelstore import BACKENDS, NoArchiveCheck, checked

SIGNATURE = {
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
}


def sagemaker_archive(folder: Path) -> Path:
    (folder / "code").mkdir(parents=True)
    (folder / "code" / "inference.py").write_text("def model_fn(model_dir):\n    return None\n")
    (folder / "manifest.json").write_text(json.dumps({"backend": "sagemaker", **SIGNATURE}))
    return folder


def test_an_archive_passes_the_check_its_backend_registered(tmp_path: Path) -> None:
    with checked(sagemaker_archive(tmp_path / "model")) as artifact:  # conftest registered every backend
        assert artifact.manifest.backend == "sagemaker"


def test_an_archive_of_a_backend_with_no_registered_check_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(modelstore._ARCHIVE_CHECKS, "sagemaker")
    with pytest.raises(NoArchiveCheck, match="no archive check registered for backend 'sagemaker'"):
        with checked(sagemaker_archive(tmp_path / "model")):
            pytest.fail("an archive with no check was let through")


def test_the_models_commands_register_every_backends_archive_check() -> None:
    # A fresh interpreter: only what importing the `modelyard models` group registers counts.
    script = (
        "import modelyard.commands.models\n"
        "from modelyard.catalog.modelstore import registered_archive_checks\n"
        "print(','.join(sorted(registered_archive_checks())))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip().split(",") == sorted(BACKENDS)


def test_the_catalog_alone_registers_no_check() -> None:
    script = (
        "import modelyard.catalog.registration, modelyard.catalog.bulk_import\n"
        "from modelyard.catalog.modelstore import registered_archive_checks\n"
        "print(sorted(registered_archive_checks()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
