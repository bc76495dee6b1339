"""MLServer containers against the real things: one MLServer 1.7 process for the module (it starts in
seconds), its agent loading from an S3 model store (moto_server as its own process), the placement
controller placing on demand, and the router forwarding KServe v2 gRPC to it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.catalog.modelstore import ArchiveError, checked
from modelyard.containers.mlserver.adapter import (
    SETTINGS_FILE,
    install_mlserver_example,
    mlserver_pids,
    write_iris_model,
)
from modelyard.local import LocalFleet
from modelyard.placement import registry
from tests.fleet import FleetThread
from tests.s3 import MotoServer, aws_environment

STORE = "s3://fleet/models"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)  # a setosa, a virginica


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    server.client().create_bucket(Bucket="fleet")
    try:
        with aws_environment(server):
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """One MLServer with its agent, a lazy controller (places a model when a call wants it) and the router;
    `iris` registered from the S3 store and not placed."""
    workdir = tmp_path_factory.mktemp("mlserver-fleet")
    thread = FleetThread(workdir, str(workdir / "store"), containers=0)
    thread.fleet.mlserver_containers = 1
    thread.fleet.artifact_store = STORE
    thread.fleet.lease_ttl_s = 4.0  # a killed MLServer is noticed within seconds

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        iris = await fleet.store_artifact(install_mlserver_example("iris", workdir / "artifacts"))
        await registry.register_model(fleet.store, iris)
        await fleet.start_containers()
        fleet.supervise_containers()
        await fleet.wait_registered(120)
        fleet.start_controller(eager=False)
        await fleet.start_router()
        assert fleet.router is not None
        table = fleet.router.router.table
        async with asyncio.timeout(60):  # a cold call needs a leading controller in the router's view
            while not table.fleet.leader:
                await table.wait_changed(registry.LEADER, 1.0)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def infer(address: str, model: str, version: str = "", timeout_s: float = 60.0) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer(model, [tensor], model_version=version, client_timeout=timeout_s)
    assert result.get_response().model_name == model  # the public name, not MLServer's `name@version`
    answer = result.as_numpy("predict")
    assert answer is not None and answer.dtype == np.int64
    return answer.ravel()  # MLServer's numpy codec answers 1-d outputs as [N, 1]


def test_a_cold_iris_call_loads_it_from_s3_into_mlserver_and_answers_0_and_2(fleet: FleetThread) -> None:
    table = fleet.fleet.router.router.table  # type: ignore[union-attr]
    assert table.fleet.assignments.get("iris@1") is None  # nothing placed before the call
    np.testing.assert_array_equal(infer(fleet.address, "iris"), [0, 2])
    assert list(table.fleet.assignments["iris@1"]) == ["mlserver-0"]  # placed on the call's demand
    state = table.fleet.states[("mlserver-0", "iris@1")]
    assert state.phase == "ready"
    assert state.measured_bytes > 0  # MLServer's resident growth across the load, at least the file
    model = table.fleet.models["iris@1"]
    assert model.artifact_uri.startswith(f"{STORE}/")
    with grpcclient.InferenceServerClient(fleet.address) as client:  # the archive's signature, public name
        metadata = client.get_model_metadata("iris", "1")
        assert client.is_model_ready("iris", "1")
    assert metadata.name == "iris"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("predict", "INT64", [-1])]
    cached = (
        fleet.fleet.workdir / "artifact-cache" / model.artifact_uri.rsplit("/", 1)[1].removesuffix(".tar")
    )
    assert (cached / "model.joblib").is_file()


def write_flipped_iris(folder: Path) -> Path:
    """An iris archive whose classifier answers 2 - class (so its answers tell it from version 1)."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    write_iris_model(folder)
    features, labels = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(features, 2 - labels), folder / "model.joblib")
    return folder


def test_two_versions_uploaded_to_s3_share_one_mlserver(fleet: FleetThread, tmp_path: Path) -> None:
    source = write_flipped_iris(tmp_path / "iris2")
    subprocess.run(["tar", "czf", str(tmp_path / "iris2.tgz"), "."], cwd=source, check=True, timeout=60)
    upload = subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "upload", str(tmp_path / "iris2.tgz"),
         "--name", "iris", "--version", "2", "--store", fleet.fleet.store_url, "--model-store", STORE],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    assert upload.stdout.startswith("registered iris@2 (mlserver, cpu, ")
    np.testing.assert_array_equal(infer(fleet.address, "iris", "2"), [2, 0])
    np.testing.assert_array_equal(infer(fleet.address, "iris", "1"), [0, 2])
    mlserver_agent = fleet.fleet.agents[0]
    held = fleet.call(mlserver_agent.adapter.ready_versions())
    assert {"iris@1", "iris@2"} <= held


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no settings", f"an mlserver archive needs {SETTINGS_FILE}"),
        ("xgboost", "xgboost models need mlserver-xgboost, which is not installed here"),
        ("outside", "points outside the archive"),
        ("missing file", "no such non-empty file in the archive"),
        ("wrong implementation", "implementation must be mlserver_sklearn.SKLearnModel"),
    ],
)
def test_a_bad_mlserver_archive_is_refused_on_upload(tmp_path: Path, damage: str, message: str) -> None:
    folder = write_iris_model(tmp_path / "iris")
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "no settings":
        (folder / SETTINGS_FILE).unlink()
    elif damage == "xgboost":
        manifest["framework"] = "xgboost"
        settings["implementation"] = "mlserver_xgboost.XGBoostModel"
        settings["parameters"]["uri"] = "./model.json"
        (folder / "model.json").write_text("{}")
    elif damage == "outside":
        settings["parameters"]["uri"] = "../../etc/passwd"
    elif damage == "missing file":
        settings["parameters"]["uri"] = "./nothing.joblib"
    else:
        settings["implementation"] = "mlserver.models.SomethingElse"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if (folder / SETTINGS_FILE).exists() or damage != "no settings":
        (folder / SETTINGS_FILE).write_text(json.dumps(settings))
    with pytest.raises(ArchiveError, match=message.replace(".", r"\.")), checked(folder):
        pass


def test_a_killed_mlserver_is_restarted_and_iris_answers_again(fleet: FleetThread) -> None:
    np.testing.assert_array_equal(infer(fleet.address, "iris", "1"), [0, 2])  # loaded (again) if not
    process = fleet.fleet.mlservers[0]
    assert process.process is not None
    old_pid = process.process.pid
    process.process.kill()
    deadline = time.monotonic() + 120
    while fleet.fleet.restarts["mlserver-0"] < 1:
        assert time.monotonic() < deadline, "the supervisor never restarted MLServer"
        time.sleep(0.1)
    assert process.process is not None and process.process.pid != old_pid
    answer = None
    while answer is None:  # the agent reloads iris into the new MLServer; calls meanwhile may fail
        try:
            answer = infer(fleet.address, "iris", "1", timeout_s=max(1.0, deadline - time.monotonic()))
        except InferenceServerException:
            assert time.monotonic() < deadline, "iris never answered after the restart"
            time.sleep(0.2)
    np.testing.assert_array_equal(answer, [0, 2])
    print(f"MLServer restarted live in {process.started_in_s:.1f} s")


def test_the_agent_can_find_mlserver_by_its_command_line(fleet: FleetThread) -> None:
    """How `modelyard agent --backend mlserver` finds the process whose memory it measures (in a pod
    sharing its process namespace)."""
    process = fleet.fleet.mlservers[0]
    deadline = time.monotonic() + 120
    while process.process is None:  # between a restart's stop and start
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert process.pid in mlserver_pids()


@pytest.mark.parametrize(
    ("name", "rows", "words"),
    [
        ("INPUT", np.ones((2, 3), np.float32), "has shape [2, 3]; expected [-1, 4]"),  # MLServer: INTERNAL
        ("X", np.ones((2, 4), np.float32), "unknown input 'X'"),  # MLServer: answers anyway
        ("INPUT", np.ones((2, 4), np.float64), "is FP32, not FP64"),  # MLServer: answers anyway
    ],
)
def test_a_call_with_wrong_inputs_is_invalid_argument_naming_the_input(
    fleet: FleetThread, name: str, rows: np.ndarray, words: str
) -> None:
    """MLServer does not check inputs against the model (a wrong name or datatype is answered, a wrong
    shape fails INTERNAL with scikit-learn's words): the router checks them against the registered
    signature first (router/inputs.py)."""
    tensor = grpcclient.InferInput(name, list(rows.shape), "FP64" if rows.dtype == np.float64 else "FP32")
    tensor.set_data_from_numpy(rows)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("iris", [tensor], model_version="1", client_timeout=60)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    assert "model 'iris' version '1'" in caught.value.message() and words in caught.value.message()
