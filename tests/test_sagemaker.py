"""SageMaker multi-model containers (issue 17): AWS's multi-model-server with sagemaker-inference, real.

One real MMS process is shared by the module's container tests; the fleet tests start their own fleet
(Triton, our container and SageMaker containers, agents, controller, router) once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.examples import EXAMPLES_DIR
from backends.sagemaker import container_model_name, parse_container_name
from placement.controller import incremental_changes
from placement.model import Container, CopyState, ModelVersion
from placement.registry import Fleet

_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True)

# -- pure: names, placement -----------------------------------------------------------------------------


@given(_NAMES, _NAMES)
def test_container_names_read_back_and_never_collide(name: str, version: str) -> None:
    spelled = container_model_name(name, version)
    assert parse_container_name(spelled) == (name, version)
    assert "@" not in spelled and all(c.isalnum() or c in "_.-" for c in spelled)


def test_container_names_of_different_versions_differ() -> None:
    # The pairs a naive `name_version` join would confuse.
    pairs = [("a_b", "1"), ("a", "b_1"), ("a_", "1"), ("a", "_1")]
    spelled = {container_model_name(n, v) for n, v in pairs}
    assert len(spelled) == len(pairs)


@pytest.mark.parametrize("foreign", ["model", "x_", "_v1", "a_b"])
def test_names_not_ours_are_not_read_as_versions(foreign: str) -> None:
    assert parse_container_name(foreign) is None


def _sagemaker_fleet(states: dict[tuple[str, str], CopyState]) -> Fleet:
    gib = 1024**3
    containers = [
        Container(f"sm-{i}", f"127.0.0.1:{20000 + i}", memory_bytes=4 * gib, backend="sagemaker")
        for i in range(2)
    ]
    models = [
        ModelVersion("big", "1", backend="sagemaker", memory_bytes=gib),
        ModelVersion("small", "1", backend="sagemaker", memory_bytes=gib),
        ModelVersion("new", "1", backend="sagemaker", memory_bytes=gib),
    ]
    return Fleet.of(
        models=models,
        containers=containers,
        assignments={"big@1": ["sm-0"], "small@1": ["sm-0"]},
        states=states,
    )


def test_a_copy_refused_for_memory_moves_and_its_container_counts_as_full() -> None:
    refused = CopyState("failed", message="HTTP 507", container_full=True)
    fleet = _sagemaker_fleet({("sm-0", "big@1"): refused, ("sm-0", "small@1"): CopyState("ready")})
    assert fleet.full_containers() == {"sm-0"}
    changes, unplaced = incremental_changes(fleet, ["big@1", "small@1", "new@1"])
    assert changes["big@1"] == ("sm-1",)  # moved off the container that said 507
    assert "small@1" not in changes  # its ready copy on the full container stays
    assert changes["new@1"] == ("sm-1",)  # sm-0 has 2 GiB "free" by the books, but said it is full
    assert not unplaced


def test_a_plain_failed_load_does_not_make_a_container_full() -> None:
    failed = CopyState("failed", message="HTTP 500: model_fn raised")
    fleet = _sagemaker_fleet({("sm-0", "big@1"): failed})
    assert fleet.full_containers() == set()
    changes, _ = incremental_changes(fleet, ["big@1", "new@1"])
    assert "big@1" not in changes  # stays, and its agent retries with backoff


def test_full_marks_go_when_the_failed_state_goes() -> None:
    refused = CopyState("failed", message="HTTP 507", container_full=True)
    fleet = _sagemaker_fleet({("sm-0", "big@1"): refused})
    fleet.apply(_delete_state("sm-0", "big@1"))
    assert fleet.full_containers() == set() and not fleet.full_copies


def _delete_state(cid: str, key: str):  # type: ignore[no-untyped-def]
    from placement.registry import state_key
    from placement.store.base import Event

    return Event("delete", state_key(cid, key), b"", 10_000)


# -- upload ----------------------------------------------------------------------------------------------


def _sagemaker_tarball(tmp_path: Path, *, inference: str | None = None, manifest: bool = False) -> Path:
    """SageMaker's model.tar.gz layout from the example: factor.txt and code/inference.py at the top."""
    source = tmp_path / "sm-src"
    shutil.copytree(EXAMPLES_DIR / "sagemaker_scale", source, ignore=shutil.ignore_patterns("__pycache__"))
    if not manifest:
        (source / "manifest.json").unlink()
    if inference is not None:
        (source / "code" / "inference.py").write_text(inference)
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
    return archive


def _upload(tmp_path: Path, archive: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "modelyard",
            "models",
            "upload",
            str(archive),
            "--name",
            "scaler",
            "--version",
            "1",
            "--backend",
            "sagemaker",
            "--store",
            str(tmp_path / "store"),
            "--model-store",
            str(tmp_path / "artifacts"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _manifest_file(tmp_path: Path, **changes: object) -> Path:
    manifest = json.loads((EXAMPLES_DIR / "sagemaker_scale" / "manifest.json").read_text())
    manifest.pop("backend")  # --backend names it
    manifest.update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_upload_takes_a_sagemaker_model_tar_gz_with_a_manifest_given_apart(tmp_path: Path) -> None:
    archive = _sagemaker_tarball(tmp_path)
    result = _upload(tmp_path, archive, "--manifest", str(_manifest_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "registered scaler@1 (sagemaker" in result.stdout
    stored = list((tmp_path / "artifacts").iterdir())
    assert len(stored) == 1
    assert (stored[0] / "code" / "inference.py").is_file() and (stored[0] / "factor.txt").is_file()
    assert json.loads((stored[0] / "manifest.json").read_text())["backend"] == "sagemaker"


def test_upload_takes_a_sagemaker_archive_holding_its_manifest(tmp_path: Path) -> None:
    result = _upload(tmp_path, _sagemaker_tarball(tmp_path, manifest=True))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("inference", "manifest_changes", "refusal"),
    [
        (None, None, "needs our manifest.json"),
        ("def predict_fn(data, model):\n    return data\n", {}, "defines no model_fn"),
        ("def model_fn(model_dir)\n    return 1\n", {}, "code/inference.py line 1"),
        (
            None,
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [1]}] * 2},
            "exactly one of inputs",
        ),
        (
            None,
            {"outputs": [{"name": "OUTPUT", "datatype": "BYTES", "shape": [1]}]},
            "cannot travel as .npy",
        ),
    ],
)
def test_upload_refuses_a_bad_sagemaker_archive_in_one_line(
    tmp_path: Path, inference: str | None, manifest_changes: dict[str, object] | None, refusal: str
) -> None:
    archive = _sagemaker_tarball(tmp_path, inference=inference)
    extra = (
        () if manifest_changes is None else ("--manifest", str(_manifest_file(tmp_path, **manifest_changes)))
    )
    result = _upload(tmp_path, archive, *extra)
    assert result.returncode != 0
    assert refusal in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").iterdir())


def test_upload_refuses_an_archive_without_code_inference_py(tmp_path: Path) -> None:
    archive = _sagemaker_tarball(tmp_path)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if not m.name.startswith("code")]
        stripped = tmp_path / "stripped.tar.gz"
        with tarfile.open(stripped, "w:gz") as out:
            for member in members:
                out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    result = _upload(tmp_path, stripped, "--manifest", str(_manifest_file(tmp_path)))
    assert result.returncode != 0 and "needs code/inference.py" in result.stderr
