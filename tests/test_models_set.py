"""`modelyard models upload --replicas 0 --max-replicas N` and `modelyard models set`, through the real CLI
against an embedded store: values are stored and changed by compare-and-swap, bad ones refused in one line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import open_store

PACK = """
import json, numpy as np
np.savez("weights.npz", factor=np.array([2.0], dtype=np.float32))
json.dump({"backend": "custom", "framework": "numpy", "format": 1, "op": "scale",
           "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
           "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}]}, open("manifest.json", "w"))
"""


def modelyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args], capture_output=True, text=True, timeout=60
    )


def stored(store_url: str, key: str) -> ModelVersion:
    async def read() -> ModelVersion:
        async with open_store(store_url) as store:
            item = await registry.read_model(store, key)
            assert item is not None
            return ModelVersion.from_json(item.value)

    return asyncio.run(read())


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    source = tmp_path / "double"
    source.mkdir()
    subprocess.run([sys.executable, "-c", PACK], cwd=source, check=True, timeout=60)
    subprocess.run(["tar", "czf", str(tmp_path / "double.tgz"), "."], cwd=source, check=True, timeout=60)
    return tmp_path / "double.tgz"


def test_upload_on_demand_then_set_copies_and_refuse_bad_values(archive: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    common = ("--store", store)
    upload = modelyard(
        *("models", "upload", str(archive), "--name", "double", "--version", "1"),
        *("--replicas", "0", "--max-replicas", "3", *common, "--model-store", str(tmp_path / "artifacts")),
    )
    assert upload.returncode == 0, upload.stderr
    model = stored(store, "double@1")
    assert (model.replicas, model.max_replicas, model.on_demand) == (0, 3, True)

    changed = modelyard("models", "set", "double@1", "--replicas", "2", *common)
    assert changed.returncode == 0, changed.stderr
    assert "replicas 2, max replicas 3" in changed.stdout
    model = stored(store, "double@1")
    assert (model.replicas, model.max_replicas) == (2, 3)
    # Raising replicas over the ceiling alone lifts the ceiling with it.
    assert modelyard("models", "set", "double@1", "--replicas", "4", *common).returncode == 0
    assert (stored(store, "double@1").replicas, stored(store, "double@1").max_replicas) == (4, 4)

    for args, message in (
        (("--replicas", "1", "--max-replicas", "0"), None),  # 0: as many as replicas (valid)
        (("--replicas", "3", "--max-replicas", "2"), "max replicas (2) must not be below replicas (3)"),
        (("--replicas", "-1"), "replicas must be >= 0"),
        ((), "nothing to set"),
    ):
        result = modelyard("models", "set", "double@1", *args, *common)
        if message is None:
            assert result.returncode == 0, result.stderr
            continue
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    missing = modelyard("models", "set", "nope@1", "--replicas", "1", *common)
    assert missing.returncode == 2 and "nope@1 is not registered" in missing.stderr
    assert stored(store, "double@1").replicas == 1  # the valid change above, nothing after it
