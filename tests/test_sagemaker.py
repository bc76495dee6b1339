"""SageMaker multi-model containers (issue 17): AWS's multi-model-server with sagemaker-inference, real.

One real MMS process is shared by the module's container tests; the fleet tests start their own fleet
(Triton, our container and SageMaker containers, agents, controller, router) once per module.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import sagemaker as sagemaker_module
from backends.adapter import ContainerFull, LoadError
from backends.examples import EXAMPLES_DIR
from backends.sagemaker import SageMakerAdapter, container_model_name, parse_container_name
from backends.sagemaker_process import SageMakerNotInstalled, SageMakerProcess, java_binary, mms_home
from placement.controller import incremental_changes
from placement.model import Container, CopyState, ModelVersion
from placement.registry import Fleet
from tests.conftest import missing

T = TypeVar("T")

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


# -- a real multi-model-server ---------------------------------------------------------------------------

_SCALE = (EXAMPLES_DIR / "sagemaker_scale" / "code" / "inference.py").read_text()
# model_fn asks for 1 PiB: numpy's allocation fails with a real MemoryError, which MMS answers 507.
_HOG = "import numpy as np\n\ndef model_fn(model_dir):\n    return np.ones(1 << 50, dtype=np.uint8)\n"
_BROKEN = "def model_fn(model_dir):\n    raise ValueError('weights file missing')\n"
_RAISER = """
import numpy as np
from sagemaker_inference import errors


def model_fn(model_dir):
    return None


def predict_fn(data, model):
    if (np.asarray(data) < 0).any():
        raise errors.GenericInferenceToolkitError(400, "inputs must be non-negative")
    raise RuntimeError("the model blew up")
"""


def _artifact(
    root: Path,
    name: str,
    version: str = "1",
    *,
    inference: str = _SCALE,
    factor: str = "2",
    tenants: tuple[str, ...] = (),
    memory_bytes: int = 96 * 1024**2,
) -> ModelVersion:
    """A stored SageMaker artifact (files + code/inference.py + our manifest) and its registration."""
    folder = root / f"{name}-{version}"
    (folder / "code").mkdir(parents=True)
    (folder / "code" / "inference.py").write_text(inference)
    (folder / "factor.txt").write_text(factor)
    shutil.copy(EXAMPLES_DIR / "sagemaker_scale" / "manifest.json", folder / "manifest.json")
    return ModelVersion(
        name,
        version,
        backend="sagemaker",
        memory_bytes=memory_bytes,
        artifact_uri=folder.resolve().as_uri(),
        sha256=f"{name}{version}".ljust(64, "0"),
        tenants=tenants,
    )


def _npy(values: list[float]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array(values, dtype=np.float32))
    return buffer.getvalue()


def _http(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"} if body else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _invoke(mms: SageMakerProcess, model: ModelVersion, values: list[float]) -> tuple[int, bytes]:
    name = container_model_name(model.name, model.version)
    return _http(f"{mms.url}/models/{name}/invoke", "POST", _npy(values))


@pytest.fixture(scope="module")
def mms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SageMakerProcess]:
    try:
        java_binary()
        mms_home()
    except SageMakerNotInstalled as exc:
        missing("multi-model-server / Java", str(exc))
    process = SageMakerProcess(tmp_path_factory.mktemp("mms"))
    try:
        process.start(timeout_s=120)
        yield process
    finally:
        process.stop()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _with_adapter(mms: SageMakerProcess, use: Callable[[SageMakerAdapter], Awaitable[T]]) -> T:
    adapter = SageMakerAdapter(mms.address, mms.model_store)
    try:
        return await use(adapter)
    finally:
        await adapter.close()


def test_load_invoke_unload_on_a_real_container(mms: SageMakerProcess, tmp_path: Path) -> None:
    model = _artifact(tmp_path, "scale_one")
    _run(_with_adapter(mms, lambda a: a.load(model)))
    assert model.key in _run(_with_adapter(mms, lambda a: a.ready_versions()))
    status, body = _invoke(mms, model, [1, 2, 3])
    assert status == 200
    assert np.load(io.BytesIO(body)).tolist() == [2.0, 4.0, 6.0]
    _run(_with_adapter(mms, lambda a: a.unload(model)))
    assert model.key not in _run(_with_adapter(mms, lambda a: a.ready_versions()))
    assert _invoke(mms, model, [1])[0] == 404  # the contract's answer for a model not loaded


def test_two_versions_of_one_model_share_a_container(mms: SageMakerProcess, tmp_path: Path) -> None:
    v1, v2 = _artifact(tmp_path, "shared", "1", factor="2"), _artifact(tmp_path, "shared", "2", factor="3")

    async def both(adapter: SageMakerAdapter) -> set[str]:
        await adapter.load(v1)
        await adapter.load(v2)
        return await adapter.ready_versions()

    assert {v1.key, v2.key} <= _run(_with_adapter(mms, both))
    assert np.load(io.BytesIO(_invoke(mms, v1, [1])[1])).tolist() == [2.0]
    assert np.load(io.BytesIO(_invoke(mms, v2, [1])[1])).tolist() == [3.0]
    _run(_with_adapter(mms, lambda a: a.unload(v1)))
    assert _invoke(mms, v2, [2])[0] == 200  # unloading one version leaves the other


def test_a_second_load_is_409_and_counts_as_loaded(mms: SageMakerProcess, tmp_path: Path) -> None:
    model = _artifact(tmp_path, "twice")
    _run(_with_adapter(mms, lambda a: a.load(model)))
    name = container_model_name(model.name, model.version)
    body = json.dumps({"model_name": name, "url": name}).encode()
    request = urllib.request.Request(
        f"{mms.url}/models", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as conflict:
        urllib.request.urlopen(request, timeout=30)
    assert conflict.value.code == 409  # the real server's answer to a second load
    _run(_with_adapter(mms, lambda a: a.load(model)))  # the adapter takes that 409 as loaded
    assert _invoke(mms, model, [5])[0] == 200


def test_out_of_memory_507_raises_container_full_and_leaves_nothing_listed(
    mms: SageMakerProcess, tmp_path: Path
) -> None:
    model = _artifact(tmp_path, "hog", inference=_HOG)
    with pytest.raises(ContainerFull, match="HTTP 507"):
        _run(_with_adapter(mms, lambda a: a.load(model)))
    assert model.key not in _run(_with_adapter(mms, lambda a: a.ready_versions()))


def test_a_model_fn_that_raises_fails_the_load_with_a_plain_load_error(
    mms: SageMakerProcess, tmp_path: Path
) -> None:
    model = _artifact(tmp_path, "broken", inference=_BROKEN)
    with pytest.raises(LoadError, match="HTTP 500") as failure:
        _run(_with_adapter(mms, lambda a: a.load(model)))
    assert not isinstance(failure.value, ContainerFull)
    assert model.key not in _run(_with_adapter(mms, lambda a: a.ready_versions()))


def test_listing_follows_next_page_tokens(
    mms: SageMakerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = [_artifact(tmp_path, f"paged{i}") for i in range(3)]

    async def load_all(adapter: SageMakerAdapter) -> None:
        for model in models:
            await adapter.load(model)

    _run(_with_adapter(mms, load_all))
    monkeypatch.setattr(sagemaker_module, "PAGE_SIZE", 1)  # one model per page: every token is followed
    status, body = _http(f"{mms.url}/models?limit=1")
    assert status == 200 and json.loads(body).get("nextPageToken")  # the server does paginate
    assert {m.key for m in models} <= _run(_with_adapter(mms, lambda a: a.ready_versions()))


def test_unloading_a_model_the_container_lacks_is_fine(mms: SageMakerProcess, tmp_path: Path) -> None:
    model = _artifact(tmp_path, "never_loaded")
    assert _http(f"{mms.url}/models/{container_model_name(model.name, model.version)}")[0] == 404
    _run(_with_adapter(mms, lambda a: a.unload(model)))
    assert _run(_with_adapter(mms, lambda a: a.describe(model))) is None
