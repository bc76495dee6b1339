"""The README's "upload and call a model" steps: pack an archive, `modelyard models upload`, call it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.placement import registry
from modelyard.placement.store import open_store
from tests.fleet import FleetThread, start_custom_fleet

PACK = """
import json, numpy as np
np.savez("weights.npz", factor=np.array([2.0], dtype=np.float32))
json.dump({"backend": "custom", "framework": "numpy", "format": 1, "op": "scale",
           "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
           "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}]}, open("manifest.json", "w"))
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    thread = start_custom_fleet(tmp_path / "fleet", [])
    yield thread
    thread.stop()


def test_an_uploaded_archive_is_placed_and_answers_through_the_router(
    fleet: FleetThread, tmp_path: Path
) -> None:
    source = tmp_path / "double"
    source.mkdir()
    subprocess.run([sys.executable, "-c", PACK], cwd=source, check=True, timeout=60)
    subprocess.run(["tar", "czf", str(tmp_path / "double.tgz"), "."], cwd=source, check=True, timeout=60)
    upload = subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "upload", str(tmp_path / "double.tgz"),
         "--name", "double", "--version", "1",
         "--store", fleet.fleet.store_url, "--model-store", str(fleet.fleet.workdir / "artifacts")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    assert upload.stdout.startswith("registered double@1 (custom, cpu, ")

    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        deadline = time.monotonic() + 20  # the controller places it; the agent loads it
        while not client.is_model_ready("double"):
            assert time.monotonic() < deadline, "uploaded model never became ready"
            time.sleep(0.05)
        np.testing.assert_allclose(client.infer("double", [tensor]).as_numpy("OUTPUT"), x * 2)

    shown = subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "show", "double", "--store", fleet.fleet.store_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "memory declared 4 B, measured 4 B" in shown.stdout  # one float32 of weights, both ways
    assert "copy on custom-0: ready" in shown.stdout
    assert "inputs: INPUT FP32 [-1]" in shown.stdout and "outputs: OUTPUT FP32 [-1]" in shown.stdout

    removed = subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "remove", "double@1", "--store", fleet.fleet.store_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    with grpcclient.InferenceServerClient(fleet.address) as client:
        deadline = time.monotonic() + 5
        while True:
            try:
                client.infer("double", [tensor])
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.NOT_FOUND"
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _modelyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args], capture_output=True, text=True, timeout=60
    )


def test_upload_and_import_store_the_signature_and_an_older_registration_reuploads_unchanged(
    tmp_path: Path,
) -> None:
    """`models upload` and `models import` put the signature in the registry (`models show` prints it); a
    version registered before signatures were stored (its value rewritten without one) uploads again as
    the same registration: exit 0, unchanged, not exit 3 'already exists'."""
    source = tmp_path / "double"
    source.mkdir()
    subprocess.run([sys.executable, "-c", PACK], cwd=source, check=True, timeout=60)
    store = ["--store", str(tmp_path / "store"), "--model-store", str(tmp_path / "artifacts")]
    uploaded = _modelyard("models", "upload", str(source), "--name", "double", "--version", "1", *store)
    assert uploaded.returncode == 0, uploaded.stderr
    (tmp_path / "models.jsonl").write_text('{"name": "double", "version": "2", "archive": "double"}\n')
    imported = _modelyard("models", "import", str(tmp_path / "models.jsonl"), *store)
    assert imported.returncode == 0, imported.stderr
    for version in ("1", "2"):
        shown = _modelyard("models", "show", f"double@{version}", *store[:2])
        assert shown.returncode == 0, shown.stderr
        assert "inputs: INPUT FP32 [-1]" in shown.stdout and "outputs: OUTPUT FP32 [-1]" in shown.stdout

    async def strip_signature() -> None:
        async with open_store(str(tmp_path / "store")) as opened:
            current = await registry.read_model(opened, "double@1")
            assert current is not None
            old = json.loads(current.value)
            assert old.pop("signature")
            await opened.put(registry.MODELS + "double@1", json.dumps(old).encode())

    asyncio.run(strip_signature())
    shown = _modelyard("models", "show", "double@1", *store[:2])
    assert "signature not stored" in shown.stdout, shown.stdout
    again = _modelyard("models", "upload", str(source), "--name", "double", "--version", "1", *store)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already registered, unchanged: double@1")
    imported = _modelyard("models", "import", str(tmp_path / "models.jsonl"), *store)
    assert imported.returncode == 0 and "skipped 1" in imported.stdout, imported.stdout + imported.stderr
