"""Registration is a compare-and-swap: racing uploads of one `name@version` leave exactly one winner.

Against both stores (the embedded one and a real etcd), with racing coroutines and racing processes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from modelyard.catalog.modelstore import LocalModelStore
from modelyard.catalog.registration import AlreadyRegistered, Registration, RegistrationError, remove, upload
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import open_store

SIGNATURE = {
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
}


def scale_archive(folder: Path, factor: float) -> Path:
    """A tiny custom-container model (OUTPUT = factor * INPUT); each factor is a different artifact."""
    source = folder / f"scale-{factor}"
    source.mkdir(parents=True)
    np.savez(source / "weights.npz", factor=np.array([factor], dtype=np.float32))
    manifest = {"backend": "custom", "framework": "numpy", "format": 1, "op": "scale", **SIGNATURE}
    (source / "manifest.json").write_text(json.dumps(manifest))
    archive = folder / f"scale-{factor}.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=".")
    return archive


async def registered_models(store_url: str) -> dict[str, ModelVersion]:
    async with open_store(store_url) as store:
        return (await registry.load_fleet(store)).models


def test_of_racing_uploads_of_one_version_with_different_archives_exactly_one_wins(
    store_url: str, tmp_path: Path
) -> None:
    archives = [scale_archive(tmp_path, float(factor)) for factor in range(2, 10)]

    async def main() -> list[Registration | BaseException]:
        async with open_store(store_url) as store:
            artifacts = LocalModelStore(tmp_path / "artifacts")
            return await asyncio.gather(
                *(upload(store, artifacts, a, name="scale", version="1") for a in archives),
                return_exceptions=True,
            )

    outcomes = asyncio.run(main())
    winners = [o for o in outcomes if isinstance(o, Registration)]
    losers = [o for o in outcomes if isinstance(o, AlreadyRegistered)]
    assert len(winners) == 1 and winners[0].created, outcomes
    assert len(losers) == len(archives) - 1, outcomes
    assert all("scale@1 already exists with another artifact" in str(o) for o in losers)
    assert asyncio.run(registered_models(store_url)) == {"scale@1": winners[0].model}


def test_racing_uploads_of_the_same_archive_all_succeed_and_register_it_once(
    store_url: str, tmp_path: Path
) -> None:
    archive = scale_archive(tmp_path, 2.0)

    async def main() -> list[Registration]:
        async with open_store(store_url) as store:
            artifacts = LocalModelStore(tmp_path / "artifacts")
            return await asyncio.gather(
                *(upload(store, artifacts, archive, name="scale", version="1") for _ in range(6))
            )

    outcomes = asyncio.run(main())
    assert sum(o.created for o in outcomes) == 1
    assert len({o.model for o in outcomes}) == 1
    assert asyncio.run(registered_models(store_url)) == {"scale@1": outcomes[0].model}


def test_of_two_racing_upload_processes_one_registers_and_the_other_exits_3_with_one_line(
    store_url: str, tmp_path: Path
) -> None:
    archives = [scale_archive(tmp_path, 2.0), scale_archive(tmp_path, 3.0)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelyard",
                "models",
                "upload",
                str(archive),
                "--name",
                "scale",
                "--version",
                "1",
                "--store",
                store_url,
                "--model-store",
                str(tmp_path / "artifacts"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for archive in archives
    ]
    results = [(p.wait(timeout=60), *p.communicate(timeout=60)) for p in processes]
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [0, 3], results
    loser_stderr = next(stderr for status, _, stderr in results if status == 3)
    assert len(loser_stderr.strip().splitlines()) == 1, loser_stderr  # one line, no traceback
    assert loser_stderr.startswith("error: scale@1 already exists with another artifact")
    winner_stdout = next(stdout for status, stdout, _ in results if status == 0)
    assert winner_stdout.startswith("registered scale@1 (custom, cpu, ")
    assert list(asyncio.run(registered_models(store_url))) == ["scale@1"]


def test_of_racing_removes_of_one_version_exactly_one_removes_it(store_url: str, tmp_path: Path) -> None:
    archive = scale_archive(tmp_path, 2.0)

    async def main() -> list[ModelVersion | BaseException]:
        async with open_store(store_url) as store:
            await upload(store, LocalModelStore(tmp_path / "artifacts"), archive, name="scale", version="1")
            return await asyncio.gather(
                *(remove(store, "scale", "1") for _ in range(5)), return_exceptions=True
            )

    outcomes = asyncio.run(main())
    removed = [o for o in outcomes if isinstance(o, ModelVersion)]
    refused = [o for o in outcomes if isinstance(o, RegistrationError)]
    assert len(removed) == 1 and removed[0].key == "scale@1"
    assert len(refused) == 4 and all("scale@1 is not registered" in str(o) for o in refused)
    assert asyncio.run(registered_models(store_url)) == {}


def test_a_version_removed_and_uploaded_again_with_another_archive_is_the_new_one(
    store_url: str, tmp_path: Path
) -> None:
    """Immutable while registered: remove frees the version for a new artifact (a deliberate act)."""
    first, second = scale_archive(tmp_path, 2.0), scale_archive(tmp_path, 3.0)

    async def main() -> ModelVersion:
        async with open_store(store_url) as store:
            artifacts = LocalModelStore(tmp_path / "artifacts")
            await upload(store, artifacts, first, name="scale", version="1")
            with pytest.raises(AlreadyRegistered):
                await upload(store, artifacts, second, name="scale", version="1")
            await remove(store, "scale", "1")
            return (await upload(store, artifacts, second, name="scale", version="1")).model

    model = asyncio.run(main())
    assert asyncio.run(registered_models(store_url)) == {"scale@1": model}
