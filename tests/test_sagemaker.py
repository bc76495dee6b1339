"""SageMaker multi-model containers (issue 17): AWS's multi-model-server with sagemaker-inference, real.

One real MMS process is shared by the module's container tests; the fleet tests start their own fleet
(Triton, our container and SageMaker containers, agents, controller, router) once per module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.utils import InferenceServerException

from modelyard.catalog.examples import EXAMPLES_DIR
from modelyard.catalog.modelstore import artifact_signature
from modelyard.client import Client
from modelyard.containers.adapter import ContainerFull, LoadError
from modelyard.containers.sagemaker import adapter as sagemaker_module
from modelyard.containers.sagemaker.adapter import (
    SageMakerAdapter,
    container_model_name,
    parse_container_name,
)
from modelyard.containers.sagemaker.archive import install_sagemaker_example
from modelyard.containers.sagemaker.process import (
    SageMakerNotInstalled,
    SageMakerProcess,
    java_binary,
    mms_home,
)
from modelyard.containers.triton.server import free_port
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.controller import incremental_changes
from modelyard.placement.model import Container, CopyState, ModelVersion, RouteRule, signature_json
from modelyard.placement.rebalance import plan_rebalance, snapshot
from modelyard.placement.registry import Fleet
from modelyard.placement.store.base import Event
from modelyard.router.sagemaker_forward import SageMakerForwarder, SignatureUnavailable, status_for
from modelyard.router.server import RouterServer
from modelyard.v1 import inference_pb2, router_pb2_grpc
from tests.conftest import missing, require_triton, stop_process
from tests.fleet import FleetThread

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


def test_a_full_rebalance_sends_nothing_new_to_a_full_container() -> None:
    refused = CopyState("failed", message="HTTP 507", container_full=True)
    gib = 1024**3
    names = ["big", "hog", *(f"m{i}" for i in range(6))]
    fleet = Fleet.of(
        models=[ModelVersion(name, "1", backend="sagemaker", memory_bytes=gib) for name in names],
        containers=[
            Container(f"sm-{i}", f"127.0.0.1:{20000 + i}", memory_bytes=8 * gib, backend="sagemaker")
            for i in range(2)
        ],
        assignments={"big@1": ["sm-0"]},
        states={("sm-0", "big@1"): CopyState("ready"), ("sm-0", "hog@1"): refused},
    )
    unmarked = snapshot(fleet)
    unmarked.full_copies = {}
    # Without the mark, sm-0's 7 free GiB by the books take some of the new models (the test's premise).
    assert any("sm-0" in ids for key, ids in plan_rebalance(unmarked).after.items() if key != "big@1")
    after = plan_rebalance(snapshot(fleet)).after
    assert not any("sm-0" in ids for key, ids in after.items() if key != "big@1")  # nothing new there
    assert all(after[f"{name}@1"] == ("sm-1",) for name in names[1:])  # room elsewhere: all placed
    assert after["big@1"] == ("sm-0",)  # what it holds stays


def _delete_state(cid: str, key: str) -> Event:
    return Event("delete", registry.state_key(cid, key), b"", 10_000)


@pytest.mark.parametrize(
    ("http_status", "code"),
    [
        (404, grpc.StatusCode.NOT_FOUND),
        (507, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, grpc.StatusCode.UNAVAILABLE),
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (415, grpc.StatusCode.INVALID_ARGUMENT),
        (500, grpc.StatusCode.INTERNAL),
    ],
)
def test_http_statuses_map_to_the_grpc_codes_the_router_acts_on(
    http_status: int, code: grpc.StatusCode
) -> None:
    assert status_for(http_status) == code


def test_a_refused_connection_is_unavailable_so_the_router_fails_over() -> None:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        container = Container("sm-gone", address, backend="sagemaker")
        model = ModelVersion("m", "1", backend="sagemaker")

        async def ready() -> bytes:
            forwarder = SageMakerForwarder()
            try:
                return await forwarder.ready(model, container, 5)
            finally:
                await forwarder.close()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            asyncio.run(ready())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sm-gone unreachable" in (refused.value.details() or "")


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


# -- a fleet: Triton + our container + two SageMaker containers, lazy placement, the router --------------

MIB = 1024**2


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """One Triton, one of ours, two SageMaker containers (400 MiB each), agents, a placement controller
    that places only what a call wants (lazy load), and the router. Containers are supervised."""
    try:
        java_binary()
        mms_home()
    except SageMakerNotInstalled as exc:
        missing("multi-model-server / Java", str(exc))
    workdir = tmp_path_factory.mktemp("smfleet") / "fleet"
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)
    thread.fleet.custom_containers = 1
    thread.fleet.sagemaker_containers = 2
    thread.fleet.sagemaker_memory_bytes = 400 * MIB

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models()
        await fleet.start_containers()
        fleet.supervise_containers()
        await fleet.wait_registered(120)
        fleet.start_controller(eager=False)
        await fleet.start_router()
        assert fleet.router is not None
        table = fleet.router.router.table
        async with asyncio.timeout(60):
            while not table.fleet.leader:
                await table.wait_changed(registry.LEADER, 1.0)

    try:
        thread.start(setup)
    except BaseException:
        thread.stop()
        raise
    yield thread
    thread.stop()


def _table(fleet: FleetThread) -> Fleet:
    assert fleet.fleet.router is not None
    return fleet.fleet.router.router.table.fleet


def _infer(
    fleet: FleetThread,
    model: str,
    values: np.ndarray,
    *,
    version: str = "",
    tenant: str | None = None,
    name: str = "INPUT",
    timeout_s: float = 60,
) -> np.ndarray:
    client = grpcclient.InferenceServerClient(fleet.address)
    tensor = grpcclient.InferInput(name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32))
    headers = {"x-tenant-id": tenant} if tenant else None
    try:
        result = client.infer(
            model, [tensor], model_version=version, headers=headers, client_timeout=timeout_s
        )
        output = result.as_numpy("OUTPUT")
        assert output is not None
        return output
    finally:
        client.close()


def _register(fleet: FleetThread, *models: ModelVersion) -> None:
    async def put() -> None:
        for model in models:
            await registry.register_model(fleet.fleet.store, model)

    fleet.call(put())
    _wait_until(lambda: all(m.key in _table(fleet).models for m in models))  # the router saw them


def _wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Polls a condition on the fleet's state (set by store events) with a generous deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_lazy_load_places_each_model_on_a_container_of_its_backend(fleet: FleetThread) -> None:
    table = _table(fleet)
    assert "sagemaker_scale@1" not in table.assignments  # placed only when a call wants it
    x = np.array([1, 2, 3], dtype=np.float32)
    assert _infer(fleet, "sagemaker_scale", x).tolist() == (x * 2).tolist()  # OUTPUT = INPUT x 2
    assert _infer(fleet, "scale", x).tolist() == (x * 2).tolist()  # Triton's example, same rule
    ones = np.ones((1, 4), dtype=np.float32)
    weights = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
    expected = ones @ weights + np.array([1.0, -1.0], dtype=np.float32)
    client = grpcclient.InferenceServerClient(fleet.address)
    tensor = grpcclient.InferInput("INPUT", [1, 4], "FP32")
    tensor.set_data_from_numpy(ones)
    linear = client.infer("linear", [tensor]).as_numpy("OUTPUT")
    client.close()
    assert linear is not None and np.allclose(linear, expected)
    backends = {c.id: c.backend for c in table.containers.values()}
    assert {backends[c] for c in table.assignments["sagemaker_scale@1"]} == {"sagemaker"}
    assert {backends[c] for c in table.assignments["scale@1"]} == {"triton"}
    assert {backends[c] for c in table.assignments["linear@1"]} == {"custom"}


def test_placement_by_memory_spreads_sagemaker_models_within_budgets(
    fleet: FleetThread, tmp_path: Path
) -> None:
    # 150 MiB each on 400 MiB containers (one also holds sagemaker_scale): at most two fit on one, so
    # the four need both containers, and no container goes over its budget.
    models = [_artifact(tmp_path, f"wide{i}", memory_bytes=150 * MIB) for i in range(4)]
    _register(fleet, *models)
    x = np.array([4.0], dtype=np.float32)
    for model in models:
        assert _infer(fleet, model.name, x).tolist() == [8.0]
    table = _table(fleet)
    holders = {cid for m in models for cid in table.assignments[m.key]}
    assert holders == {"sagemaker-0", "sagemaker-1"}  # four models of 150 MiB need both containers
    for cid in holders:
        container = table.containers[cid]
        used = sum(table.budget_bytes(table.models[k]) for k in table.copies_on(cid))
        assert used <= container.memory_bytes, (cid, used)
    _unregister(fleet, *models)  # room for the next tests


def _unregister(fleet: FleetThread, *models: ModelVersion) -> None:
    """Removes the models; their copies are unassigned and unloaded (the agents then report nothing)."""

    async def delete() -> None:
        for model in models:
            await fleet.fleet.store.delete(registry.MODELS + model.key)

    fleet.call(delete())
    table = _table(fleet)
    _wait_until(lambda: not any(m.key in table.assignments for m in models))
    _wait_until(lambda: not any(k in table.states for m in models for k in _copies(table, m.key)))


def _copies(table: Fleet, key: str) -> list[tuple[str, str]]:
    return [(cid, key) for cid in table.containers]


def test_versions_and_tenants_are_decided_before_the_hop(fleet: FleetThread, tmp_path: Path) -> None:
    v2 = _artifact(tmp_path, "sagemaker_scale", "2", factor="3")
    private = _artifact(tmp_path, "private_scale", factor="5", tenants=("acme",))
    _register(fleet, v2, private)
    fleet.call(
        registry.put_route_rule(
            fleet.fleet.store, RouteRule("sagemaker_scale", tenant_versions=(("beta", "1"),))
        )
    )
    _wait_until(lambda: "sagemaker_scale" in _table(fleet).routes)
    x = np.array([1.0, 2.0], dtype=np.float32)
    assert _infer(fleet, "sagemaker_scale", x, version="1").tolist() == (x * 2).tolist()
    assert _infer(fleet, "sagemaker_scale", x, version="2").tolist() == (x * 3).tolist()
    assert _infer(fleet, "sagemaker_scale", x).tolist() == (x * 3).tolist()  # the highest by default
    assert _infer(fleet, "sagemaker_scale", x, tenant="beta").tolist() == (x * 2).tolist()  # pinned
    assert _infer(fleet, "private_scale", x, tenant="acme").tolist() == (x * 5).tolist()
    with pytest.raises(InferenceServerException) as hidden:
        _infer(fleet, "private_scale", x, tenant="other")
    assert hidden.value.status() == "StatusCode.NOT_FOUND"


def test_metadata_and_readiness_come_from_the_signature_and_the_container(fleet: FleetThread) -> None:
    _infer(fleet, "sagemaker_scale", np.array([1.0], dtype=np.float32), version="1")
    client = grpcclient.InferenceServerClient(fleet.address)
    try:
        metadata = client.get_model_metadata("sagemaker_scale", "1", as_json=True)
        assert metadata["platform"] == "sagemaker"
        assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("INPUT", "FP32")]
        assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("OUTPUT", "FP32")]
        assert client.is_model_ready("sagemaker_scale", "1")
        with pytest.raises(InferenceServerException) as config:
            client.get_model_config("sagemaker_scale", "1")
        assert config.value.status() == "StatusCode.UNIMPLEMENTED"
    finally:
        client.close()


def test_a_router_started_after_the_artifact_is_deleted_still_serves_the_model(
    fleet: FleetThread, tmp_path: Path
) -> None:
    """A version registered with its signature is loaded on its container, then its artifact folder is
    deleted, then a second router starts (nothing cached): it calls and describes the model with what the
    registry holds. Reading the artifact, it would answer 'cannot read its signature'. (Here, before the
    507 test marks the SageMaker containers full.)"""
    model = _artifact(tmp_path, "vanishing", factor="4")
    folder = tmp_path / "vanishing-1"
    model = dataclasses.replace(model, signature=artifact_signature(folder))
    _register(fleet, model)
    x = np.array([1.0, 2.0], dtype=np.float32)
    assert _infer(fleet, "vanishing", x).tolist() == (x * 4).tolist()  # loaded from the artifact
    shutil.rmtree(folder)
    local = fleet.fleet
    router = RouterServer(local.store, port=0, fleet_secret=local.fleet_secret, follower=local.follower)
    fleet.call(router.start())
    try:
        table = router.router.table
        _wait_until(lambda: bool(table.fleet.ready_on(model.key)))
        client = grpcclient.InferenceServerClient(router.address)
        try:
            tensor = grpcclient.InferInput("INPUT", [2], "FP32")
            tensor.set_data_from_numpy(x)
            output = client.infer("vanishing", [tensor], client_timeout=60).as_numpy("OUTPUT")
            metadata = client.get_model_metadata("vanishing", "1", as_json=True)
        finally:
            client.close()
    finally:
        fleet.call(router.stop())
    assert output is not None and output.tolist() == (x * 4).tolist()
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("INPUT", "FP32")]
    _unregister(fleet, model)


def test_handler_errors_and_bad_requests_get_clear_statuses(fleet: FleetThread, tmp_path: Path) -> None:
    raiser = _artifact(tmp_path, "raiser", inference=_RAISER)
    _register(fleet, raiser)
    with pytest.raises(InferenceServerException) as refused:
        _infer(fleet, "raiser", np.array([-1.0], dtype=np.float32))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"  # the handler's 400
    assert "inputs must be non-negative" in str(refused.value.message())
    with pytest.raises(InferenceServerException) as crashed:
        _infer(fleet, "raiser", np.array([1.0], dtype=np.float32))
    assert crashed.value.status() == "StatusCode.INTERNAL"  # the handler's 500
    assert "the model blew up" in str(crashed.value.message())
    with pytest.raises(InferenceServerException) as wrong:
        _infer(fleet, "sagemaker_scale", np.array([1.0], dtype=np.float32), name="X", version="1")
    assert wrong.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected input 'X'" in str(wrong.value.message())


_FLOAT64 = """
import numpy as np


def model_fn(model_dir):
    return 2.0


def predict_fn(data, model):
    return np.asarray(data, dtype=np.float64) * model  # numpy's habit: float64 for a float32 model
"""
_JSON_OUT = (
    _FLOAT64
    + """

def output_fn(prediction, accept):
    import json

    return json.dumps(prediction.tolist()), "application/json"
"""
)


def test_answers_in_float64_or_json_reach_the_caller_as_the_signature_says(
    fleet: FleetThread, tmp_path: Path
) -> None:
    wide = _artifact(tmp_path, "float64_scale", inference=_FLOAT64)
    text = _artifact(tmp_path, "json_scale", inference=_JSON_OUT)
    _register(fleet, wide, text)
    x = np.array([0.5, 1.5], dtype=np.float32)
    for model in (wide, text):
        y = _infer(fleet, model.name, x)
        assert y.dtype == np.float32 and y.tolist() == (x * 2).tolist()
    _unregister(fleet, wide, text)


def test_streams_to_a_sagemaker_model_answer_unimplemented(fleet: FleetThread) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(fleet.address)
    tensor = grpcclient.InferInput("INPUT", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    try:
        client.start_stream(lambda result, error: answers.put(error or result))
        client.async_stream_infer("sagemaker_scale", [tensor], model_version="1")
        answer = answers.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert isinstance(answer, InferenceServerException)
    assert "has no streaming" in str(answer.message())


def test_our_infer_answers_and_our_infer_stream_is_unimplemented(fleet: FleetThread) -> None:
    request = inference_pb2.InferRequest(model_name="sagemaker_scale", model_version="1", id="r1")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[2])
    request.raw_input_contents.append(np.array([1.5, 2.5], dtype=np.float32).tobytes())
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        answer = stub.Infer(request, timeout=60)
        assert answer.id == "r1" and answer.model_name == "sagemaker_scale"
        assert np.frombuffer(answer.raw_output_contents[0], dtype=np.float32).tolist() == [3.0, 5.0]
        with pytest.raises(grpc.RpcError) as stream:
            list(stub.InferStream(request, timeout=60))
    assert stream.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "has no streaming" in (stream.value.details() or "")


PIPELINE = """
name: quadruple
version: "1"
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: Y, datatype: FP32, shape: [-1]}]
steps:
  - {name: first,  model: sagemaker_scale@1, inputs: {INPUT: X}, outputs: {OUTPUT: A}}
  - {name: second, model: scale,             inputs: {INPUT: A}, outputs: {OUTPUT: Y}}
"""


def test_a_pipeline_runs_a_sagemaker_step_then_a_triton_step(fleet: FleetThread, tmp_path: Path) -> None:
    spec = tmp_path / "quadruple.yaml"
    spec.write_text(PIPELINE)
    store = str(fleet.fleet.workdir / "store")
    done = subprocess.run(
        [sys.executable, "-m", "modelyard", "pipelines", "register", str(spec), "--store", store],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    _wait_until(lambda: "quadruple" in _table(fleet).pipelines_by_name)
    client = grpcclient.InferenceServerClient(fleet.address)
    tensor = grpcclient.InferInput("X", [3], "FP32")
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    tensor.set_data_from_numpy(x)
    try:
        y = client.infer("quadruple", [tensor]).as_numpy("Y")
    finally:
        client.close()
    assert y is not None and y.tolist() == (x * 2 * 2).tolist()  # x2 on SageMaker, then x2 on Triton


def test_the_zero_hop_client_calls_sagemaker_models_through_the_router(fleet: FleetThread) -> None:
    x = np.array([1.0, 2.0], dtype=np.float32)
    with Client(fleet.address, fleet_secret=fleet.fleet.fleet_secret) as client:
        assert client.wait_synced(30)
        _wait_until(lambda: client.cache.pick("scale", "", None, "") is not None)  # routes with addresses
        assert client.cache.pick("sagemaker_scale", "1", None, "") is None  # none for an HTTP container
        tensor = grpcclient.InferInput("INPUT", [2], "FP32")
        tensor.set_data_from_numpy(x)
        direct = client.infer("scale", [tensor]).as_numpy("OUTPUT")  # Triton: straight to the container
        assert direct is not None and direct.tolist() == (x * 2).tolist()
        assert client.direct_calls == 1
        routed = client.infer("sagemaker_scale", [tensor], model_version="1").as_numpy("OUTPUT")
        assert routed is not None and routed.tolist() == (x * 2).tolist()
        assert (client.direct_calls, client.router_calls) == (1, 1)  # its container speaks HTTP


def test_a_killed_container_is_restarted_and_calls_go_on(fleet: FleetThread) -> None:
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert _infer(fleet, "sagemaker_scale", x, version="1").tolist() == (x * 2).tolist()
    holder = _table(fleet).assignments["sagemaker_scale@1"][0]
    index = int(holder.rsplit("-", 1)[1])
    process = fleet.fleet.sagemakers[index]
    assert process.process is not None
    old_pid = process.process.pid
    restarts = fleet.fleet.restarts[holder]
    os.kill(old_pid, signal.SIGKILL)
    # The call waits within its deadline for the copy to come back (restarted container) or move.
    assert _infer(fleet, "sagemaker_scale", x, version="1", timeout_s=90).tolist() == (x * 2).tolist()
    _wait_until(lambda: fleet.fleet.restarts[holder] > restarts, timeout_s=90)
    assert process.process is not None and process.process.pid != old_pid
    _wait_until(lambda: process.ping(), timeout_s=90)


def test_a_507_moves_the_copy_and_marks_both_containers_full(fleet: FleetThread, tmp_path: Path) -> None:
    """Last in the module: both SageMaker containers stay marked full until they unload or restart."""
    hog = _artifact(tmp_path, "hog", inference=_HOG, memory_bytes=10 * MIB)
    _register(fleet, hog)
    with pytest.raises(InferenceServerException) as failed:
        _infer(fleet, "hog", np.array([1.0], dtype=np.float32), timeout_s=60)
    assert failed.value.status() != "StatusCode.UNKNOWN"
    assert "507" in str(failed.value.message()) or "memory" in str(failed.value.message())
    table = _table(fleet)
    # Each container refused it once; the model then has nowhere to go, and stays there (no ping-pong).
    _wait_until(lambda: table.full_copies.get(hog.key) == {"sagemaker-0", "sagemaker-1"})
    _wait_until(lambda: not table.assignments.get(hog.key))
    assert fleet.fleet.agents and all(
        a.load_calls < 10 for a in fleet.fleet.agents if a.container.backend == "sagemaker"
    )


# -- modelyard up, as a new user runs it -----------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running, and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_lines(stream: Any, sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)
    sink.put("")


def test_up_with_a_sagemaker_container_serves_sagemaker_scale(tmp_path: Path) -> None:
    require_triton()
    try:
        java_binary()
    except SageMakerNotInstalled as exc:
        missing("Java", str(exc))
    command = [sys.executable, "-m", "modelyard", "up", "--sagemaker-containers", "1", "--containers", "1"]
    command += ["--custom-containers", "0", "--port", str(free_port()), "--http-port", "0"]
    command += ["--workdir", str(tmp_path / "wd")]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []

    def read_until(text: str, timeout_s: float = 180) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline, f"no {text!r} from modelyard up:\n" + "".join(output)
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, "modelyard up exited early:\n" + "".join(output)
            output.append(line)
            if text in line:
                return line

    try:
        row = read_until("sagemaker-0 ")
        _, address, pid, models = row.split(maxsplit=3)
        assert "sagemaker_scale@1" in models
        example = read_until('c.infer("sagemaker_scale"').strip()
        read_until("press Ctrl-C")
        status, body = _http(f"http://{address}/ping")
        assert status == 200 and json.loads(body)["status"] == "Healthy"
        status, body = _http(f"http://{address}/models")
        assert status == 200
        assert [m["modelName"] for m in json.loads(body)["models"]] == ["sagemaker__scale_v1"]
        called = subprocess.run(example, shell=True, capture_output=True, text=True, timeout=60)
        assert called.returncode == 0, called.stderr
        assert called.stdout.strip() == "[2. 4. 6.]"
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == 0
        _wait_until(lambda: not _alive(int(pid)), timeout_s=30)  # the JVM went with it
    finally:
        if process.poll() is None:
            stop_process(process)  # type: ignore[arg-type]


# -- signatures from the registry ---------------------------------------------------------------------


def test_the_router_describes_a_version_from_its_stored_signature_without_its_artifact() -> None:
    """The forwarder answers ModelMetadata from the registration's signature: the artifact is in S3,
    which the router cannot read. A version registered before signatures were stored needs its artifact
    and, here, gets the clear refusal that every S3-stored SageMaker model got before."""
    signature = signature_json((("INPUT", "FP32", (-1,)),), (("OUTPUT", "FP32", (-1, 2)),), False)
    stored = ModelVersion(
        "m", "1", backend="sagemaker", artifact_uri="s3://nowhere/artifacts/" + "0" * 64, signature=signature
    )

    async def describe(model: ModelVersion) -> bytes:
        forwarder = SageMakerForwarder()
        try:
            return await forwarder.metadata(model)
        finally:
            await forwarder.close()

    answer = kserve_pb.ModelMetadataResponse.FromString(asyncio.run(describe(stored)))
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.inputs] == [("INPUT", "FP32", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.outputs] == [("OUTPUT", "FP32", [-1, 2])]
    with pytest.raises(SignatureUnavailable, match="cannot read its signature"):
        asyncio.run(describe(dataclasses.replace(stored, signature="")))


def test_the_sagemaker_example_is_registered_with_its_manifest_s_signature(tmp_path: Path) -> None:
    model = install_sagemaker_example("sagemaker_scale", tmp_path)
    manifest = json.loads((EXAMPLES_DIR / "sagemaker_scale" / "manifest.json").read_text())
    assert json.loads(model.signature) == {
        "inputs": manifest["inputs"],
        "outputs": manifest["outputs"],
        "decoupled": False,
    }
