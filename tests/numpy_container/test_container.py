"""The custom KServe v2 container, called with the real tritonclient.

Most tests run a CustomContainer on a background event loop thread (so they can read its counters); the
bad-tensor, slow-model and 1,000-model tests run `run_container` as a real subprocess, stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from modelyard.numpy_container.container import CustomContainer
from modelyard.numpy_container.hosting import ModelHost, Unavailable
from modelyard.numpy_container.numpy_model import NumpyModel, TensorSpec, load_model_dir, write_model_dir
from tests.conftest import stop_process

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
MiB = 1 << 20


# --- servers ---------------------------------------------------------------------------------------------


class ContainerThread:
    """A CustomContainer on its own event loop thread, for sync tests with the blocking tritonclient."""

    def __init__(self, memory_bytes: int, **options: Any) -> None:
        self.container = CustomContainer(memory_bytes, **options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="container", daemon=True)
        self._thread.start()
        self.call(self.container.start())

    @property
    def address(self) -> str:
        return self.container.address

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        try:
            self.call(self.container.stop(grace_s=1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class ContainerProcess:
    """`run_container` in a subprocess; its address comes from the `container listening on` line."""

    def __init__(self, workdir: Path, memory_bytes: int, env: dict[str, str] | None = None) -> None:
        """`env`: variables added to the process's environment."""
        self.log = workdir / "container.log"
        self.memory_bytes = memory_bytes
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout_s: float = 30.0) -> None:
        code = (
            "import asyncio; from modelyard.numpy_container.container import run_container; "
            f"asyncio.run(run_container('127.0.0.1', 0, {self.memory_bytes}))"
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r"container listening on (\S+)", self.log.read_text())
            if found:
                self.address = found.group(1)
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"container exited with {self.process.returncode}: {self.log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"container did not listen within {timeout_s} s: {self.log.read_text()}")

    def rss_bytes(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found, status
        return int(found.group(1)) * 1024

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=10)
            self.process = None


class Repository:
    """The repository calls tritonclient cannot make: its load_model sends no version or artifact_uri."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def load(self, name: str, artifact: Path | str, version: str | None = None) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=name)
        uri = artifact.resolve().as_uri() if isinstance(artifact, Path) else artifact
        if uri:
            request.parameters["artifact_uri"].string_param = uri
        if version is not None:
            request.parameters["version"].string_param = version
        self.stub.RepositoryModelLoad(request, timeout=30)

    def unload(self, name: str, version: str | None = None) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name=name)
        if version is not None:
            request.parameters["version"].string_param = version
        self.stub.RepositoryModelUnload(request, timeout=60)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def start_container() -> Iterator[Callable[..., ContainerThread]]:
    """Starts containers with the given budget and options; stops all of them after the test."""
    started: list[ContainerThread] = []

    def start(memory_bytes: int = 16 * MiB, **options: Any) -> ContainerThread:
        started.append(ContainerThread(memory_bytes, **options))
        return started[-1]

    try:
        yield start
    finally:
        for thread in started:
            thread.stop()


@pytest.fixture
def container(start_container: Callable[..., ContainerThread]) -> ContainerThread:
    return start_container()


@pytest.fixture
def client(container: ContainerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(container.address) as c:
        yield c


@pytest.fixture
def repo(container: ContainerThread) -> Iterator[Repository]:
    r = Repository(container.address)
    try:
        yield r
    finally:
        r.close()


# --- models ----------------------------------------------------------------------------------------------


def linear_model(
    path: Path, n_in: int = 4, n_out: int = 2, seed: int = 0
) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    write_model_dir(
        path,
        "linear",
        {"W": W, "b": b},
        [TensorSpec("INPUT", "FP32", (-1, n_in))],
        [TensorSpec("OUTPUT", "FP32", (-1, n_out))],
    )
    return path, W, b


def scale_model(path: Path, factor: float) -> Path:
    return write_model_dir(
        path,
        "scale",
        {"factor": np.float32(factor)},
        [TensorSpec("INPUT", "FP32", (-1,))],
        [TensorSpec("OUTPUT", "FP32", (-1,))],
    )


def stream_model(path: Path) -> Path:
    return write_model_dir(
        path, "stream", None, [TensorSpec("INPUT", "FP32", (-1,))], [TensorSpec("OUTPUT", "FP32", (1,))]
    )


def identity_model(path: Path) -> Path:
    return write_model_dir(
        path,
        "identity",
        None,
        [TensorSpec("A", "INT32", (-1,)), TensorSpec("B", "FP32", (2, 2))],
        [TensorSpec("A_OUT", "INT32", (-1,)), TensorSpec("B_OUT", "FP32", (2, 2))],
    )


def tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    datatype = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32"}[array.dtype.type]
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    """The (code, message) a tritonclient or raw-stub call fails with."""
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode."), str(exc.message())
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    raise AssertionError("the call succeeded")


RNG = np.random.default_rng(11)


# --- load and infer --------------------------------------------------------------------------------------


def test_linear_model_answers_input_times_w_plus_b(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    path, W, b = linear_model(tmp_path / "lin", n_in=4, n_out=3)
    repo.load("lin", path)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    result = client.infer("lin", [tensor("INPUT", x)])
    out = result.as_numpy("OUTPUT")
    assert out.shape == (5, 3)
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-6)
    assert result.get_response().model_version == "1"


def test_scale_model_multiplies_by_its_factor(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("scale", scale_model(tmp_path / "scale", 2.5))
    x = RNG.standard_normal(9).astype(np.float32)
    np.testing.assert_array_equal(
        client.infer("scale", [tensor("INPUT", x)]).as_numpy("OUTPUT"), x * np.float32(2.5)
    )


def test_identity_model_returns_every_input_and_only_the_requested_outputs(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("id", identity_model(tmp_path / "id"))
    a, b = np.arange(6, dtype=np.int32), RNG.standard_normal((2, 2)).astype(np.float32)
    both = client.infer("id", [tensor("A", a), tensor("B", b)])
    np.testing.assert_array_equal(both.as_numpy("A_OUT"), a)
    np.testing.assert_array_equal(both.as_numpy("B_OUT"), b)
    only_b = client.infer(
        "id", [tensor("A", a), tensor("B", b)], outputs=[grpcclient.InferRequestedOutput("B_OUT")]
    )
    assert [o.name for o in only_b.get_response().outputs] == ["B_OUT"]
    np.testing.assert_array_equal(only_b.as_numpy("B_OUT"), b)
    code, message = status_of(
        lambda: client.infer(
            "id", [tensor("A", a), tensor("B", b)], outputs=[grpcclient.InferRequestedOutput("C")]
        )
    )
    assert code == "INVALID_ARGUMENT" and "unknown output 'C'" in message


def test_typed_contents_give_the_same_answer_as_raw_bytes(
    tmp_path: Path, container: ContainerThread, repo: Repository
) -> None:
    path, W, b = linear_model(tmp_path / "lin")
    repo.load("lin", path)
    repo.load("id", identity_model(tmp_path / "id"))
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="lin")
    t = request.inputs.add(name="INPUT", datatype="FP32", shape=[2, 4])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    response = repo.stub.ModelInfer(request)
    out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(
        list(response.outputs[0].shape)
    )
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-6)

    ints = pb.ModelInferRequest(model_name="id")
    ints.inputs.add(name="A", datatype="INT32", shape=[3]).contents.int_contents.extend([7, -1, 3])
    ints.inputs.add(name="B", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend([1, 2, 3, 4])
    echoed = repo.stub.ModelInfer(ints)
    assert np.frombuffer(echoed.raw_output_contents[0], dtype=np.int32).tolist() == [7, -1, 3]


def test_versions_answer_by_name_and_the_highest_numeric_one_by_default(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    for version in ("1", "2", "10"):
        repo.load("s", scale_model(tmp_path / version, float(version)), version=version)
    x = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    default = client.infer("s", [tensor("INPUT", x)])
    assert default.get_response().model_version == "10"
    np.testing.assert_array_equal(default.as_numpy("OUTPUT"), x * 10)
    pinned = client.infer("s", [tensor("INPUT", x)], model_version="2")
    np.testing.assert_array_equal(pinned.as_numpy("OUTPUT"), x * 2)
    assert sorted(client.get_model_metadata("s").versions, key=int) == ["1", "2", "10"]
    assert client.is_model_ready("s", "1") and not client.is_model_ready("s", "3")


def test_reloading_the_same_artifact_is_a_no_op_and_a_new_artifact_replaces_the_version(
    tmp_path: Path, container: ContainerThread, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("s", scale_model(tmp_path / "a", 2.0))
    repo.load("s", tmp_path / "a")
    assert container.container.load_count == 1
    repo.load("s", scale_model(tmp_path / "b", 3.0))
    assert container.container.load_count == 2
    assert container.container.used_bytes == 4
    x = np.array([1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(client.infer("s", [tensor("INPUT", x)]).as_numpy("OUTPUT"), x * 3)


# --- errors ----------------------------------------------------------------------------------------------


def test_load_past_the_budget_is_resource_exhausted_and_changes_nothing(
    tmp_path: Path, start_container: Callable[..., ContainerThread]
) -> None:
    thread = start_container(memory_bytes=1000)
    repo = Repository(thread.address)
    client = grpcclient.InferenceServerClient(thread.address)
    try:
        first, W, b = linear_model(tmp_path / "a", n_in=16, n_out=8)  # (16 * 8 + 8) * 4 = 544 bytes
        second, _, _ = linear_model(tmp_path / "b", n_in=16, n_out=8, seed=1)
        repo.load("a", first)
        index_before = client.get_model_repository_index()
        code, message = status_of(lambda: repo.load("b", second))
        assert code == "RESOURCE_EXHAUSTED"
        assert "needs 544 bytes" in message and "544 of 1000 bytes" in message
        assert thread.container.used_bytes == 544
        assert client.get_model_repository_index() == index_before
        assert (
            status_of(lambda: client.infer("b", [tensor("INPUT", np.ones((1, 16), np.float32))]))[0]
            == "NOT_FOUND"
        )
        x = RNG.standard_normal((1, 16)).astype(np.float32)
        np.testing.assert_allclose(
            client.infer("a", [tensor("INPUT", x)]).as_numpy("OUTPUT"), x @ W + b, rtol=1e-6
        )
    finally:
        repo.close()
        client.close()


def _no_manifest(path: Path) -> None:
    linear_model(path)
    (path / "manifest.json").unlink()


def _unknown_op(path: Path) -> None:
    write_model_dir(
        path, "softmax", None, [TensorSpec("INPUT", "FP32", (-1,))], [TensorSpec("OUTPUT", "FP32", (-1,))]
    )


def _weights_off_signature(path: Path) -> None:
    write_model_dir(
        path,
        "linear",
        {"W": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)},
        [TensorSpec("INPUT", "FP32", (-1, 4))],
        [TensorSpec("OUTPUT", "FP32", (-1, 2))],
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_no_manifest, "no manifest.json"),
        (_unknown_op, "unknown op 'softmax'"),
        (_weights_off_signature, "must end in 3"),
    ],
    ids=["no-manifest", "unknown-op", "weights-off-signature"],
)
def test_bad_artifact_is_invalid_argument_with_the_format_error_and_loads_nothing(
    tmp_path: Path,
    container: ContainerThread,
    client: grpcclient.InferenceServerClient,
    repo: Repository,
    make: Callable[[Path], None],
    reason: str,
) -> None:
    make(tmp_path / "bad")
    code, message = status_of(lambda: repo.load("bad", tmp_path / "bad"))
    assert code == "INVALID_ARGUMENT"
    assert reason in message and str(tmp_path / "bad") in message
    assert container.container.used_bytes == 0
    assert not client.is_model_ready("bad")
    assert list(client.get_model_repository_index().models) == []


@pytest.mark.parametrize(
    ("artifact_uri", "reason"),
    [("", "needs the parameter artifact_uri"), ("s3://bucket/model", "must be a file:// directory")],
    ids=["missing", "not-file"],
)
def test_load_without_a_file_artifact_uri_is_invalid_argument(
    repo: Repository, artifact_uri: str, reason: str
) -> None:
    code, message = status_of(lambda: repo.load("m", artifact_uri))
    assert code == "INVALID_ARGUMENT" and reason in message


def test_unknown_model_or_version_is_not_found_naming_it(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    x = tensor("INPUT", np.ones(2, np.float32))
    code, message = status_of(lambda: client.infer("nope", [x]))
    assert code == "NOT_FOUND" and "'nope'" in message
    repo.load("s", scale_model(tmp_path / "s", 2.0))
    code, message = status_of(lambda: client.infer("s", [x], model_version="7"))
    assert code == "NOT_FOUND" and "'s' version '7'" in message
    assert status_of(lambda: client.get_model_metadata("nope"))[0] == "NOT_FOUND"
    assert not client.is_model_ready("nope")


@pytest.fixture(scope="module")
def container_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerProcess]:
    workdir = tmp_path_factory.mktemp("container")
    process = ContainerProcess(workdir, memory_bytes=16 * MiB)
    try:
        process.start()
        repo = Repository(process.address)
        linear_model(workdir / "lin", seed=3)
        repo.load("lin", workdir / "lin")
        repo.load("id", identity_model(workdir / "id"))
        repo.close()
        yield process
    finally:
        process.stop()


def _raw_request(**overrides: Any) -> Any:
    request = pb.ModelInferRequest(model_name="lin")
    request.inputs.add(
        name="INPUT", datatype=overrides.get("datatype", "FP32"), shape=overrides.get("shape", [1, 4])
    )
    request.raw_input_contents.append(overrides.get("raw", np.ones(4, np.float32).tobytes()))
    return request


BAD_TENSORS: dict[str, tuple[Any, str]] = {
    "wrong-datatype": (
        lambda c, s: c.infer("lin", [tensor("INPUT", np.ones((1, 4)))]),
        "is FP64, the model takes FP32",
    ),
    "wrong-shape": (
        lambda c, s: c.infer("lin", [tensor("INPUT", np.ones((1, 3), np.float32))]),
        "shape [1, 3], the model takes [-1, 4]",
    ),
    "wrong-byte-size": (lambda c, s: s.ModelInfer(_raw_request(raw=b"\0" * 12)), "has 12 bytes"),
    "missing-input": (
        lambda c, s: c.infer("id", [tensor("A", np.ones(2, np.int32))]),
        "missing input 'B'",
    ),
    "unexpected-input": (
        lambda c, s: c.infer("lin", [tensor("X", np.ones((1, 4), np.float32))]),
        "unexpected input 'X'",
    ),
    "typed-count-mismatch": (
        lambda c, s: s.ModelInfer(
            pb.ModelInferRequest(
                model_name="lin",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="INPUT",
                        datatype="FP32",
                        shape=[1, 4],
                        contents=pb.InferTensorContents(fp32_contents=[1]),
                    )
                ],
            )
        ),
        "has 1 values in fp32_contents",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS), ids=list(BAD_TENSORS))
def test_bad_tensor_is_invalid_argument_and_the_container_keeps_serving(
    tmp_path: Path, container_process: ContainerProcess, case: str
) -> None:
    send, reason = BAD_TENSORS[case]
    repo = Repository(container_process.address)
    with grpcclient.InferenceServerClient(container_process.address) as client:
        code, message = status_of(lambda: send(client, repo.stub))
        assert code == "INVALID_ARGUMENT"
        assert reason in message
        _, W, b = linear_model(tmp_path / "same", seed=3)  # the weights the served "lin" was written with
        x = RNG.standard_normal((2, 4)).astype(np.float32)
        np.testing.assert_allclose(
            client.infer("lin", [tensor("INPUT", x)]).as_numpy("OUTPUT"), x @ W + b, rtol=1e-6
        )
    repo.close()
    assert container_process.process is not None and container_process.process.poll() is None


# --- unload ----------------------------------------------------------------------------------------------


def test_unload_frees_the_memory_and_a_later_infer_is_not_found(
    tmp_path: Path, container: ContainerThread, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    path, _, _ = linear_model(tmp_path / "lin")
    repo.load("lin", path, version="1")
    repo.load("lin", path, version="2")
    assert container.container.used_bytes == 2 * 40
    repo.unload("lin", version="2")
    assert container.container.used_bytes == 40
    assert (
        client.infer("lin", [tensor("INPUT", np.ones((1, 4), np.float32))]).get_response().model_version
        == "1"
    )
    client.unload_model("lin")  # no version: every version of the model
    assert container.container.used_bytes == 0
    code, message = status_of(lambda: client.infer("lin", [tensor("INPUT", np.ones((1, 4), np.float32))]))
    assert code == "NOT_FOUND" and "'lin'" in message
    assert not client.is_model_ready("lin")


def _host_with_model(tmp_path: Path, **options: Any) -> tuple[ModelHost, str]:
    return ModelHost(MiB, **options), scale_model(tmp_path / "s", 2.0).resolve().as_uri()


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Yields to the event loop until `condition()` holds: the tasks under test run meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        await asyncio.sleep(0)


def _callers_of(host: ModelHost, name: str, version: str) -> int:
    """Loads and unloads of one version holding or waiting for its lock."""
    entry = host._locks.get((name, version))
    return entry.users if entry is not None else 0


def test_unload_waits_for_in_flight_requests_and_new_ones_get_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        host, uri = _host_with_model(tmp_path)
        await host.load("s", "1", uri)
        with host.serving("s", "1"):  # a request still running
            unload = asyncio.create_task(host.unload("s", "1"))
            # Marked unloading, and from then on waiting for the request to end.
            await _until(lambda: host.index() == [("s", "1", "UNLOADING")], "the unload beginning")
            assert not unload.done()
            with pytest.raises(Unavailable, match="being unloaded"), host.serving("s", ""):
                pass
        assert await asyncio.wait_for(unload, 1.0) == ["1"]
        assert host.used_bytes == 0 and host.index() == []

    asyncio.run(scenario())


def test_load_during_an_unload_waits_for_it_and_then_loads_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        host, uri = _host_with_model(tmp_path)
        await host.load("s", "1", uri)
        with host.serving("s", "1"):
            unload = asyncio.create_task(host.unload("s", "1"))
            await _until(lambda: host.index() == [("s", "1", "UNLOADING")], "the unload beginning")
            load = asyncio.create_task(host.load("s", "1", uri))
            await _until(lambda: _callers_of(host, "s", "1") == 2, "the load waiting behind the unload")
            assert not load.done()
        await asyncio.wait_for(asyncio.gather(unload, load), 5.0)
        assert host.load_count == 2
        assert host.index() == [("s", "1", "READY")] and host.used_bytes == 4

    asyncio.run(scenario())


def test_unload_gives_up_waiting_for_a_stuck_request_after_the_drain_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        host, uri = _host_with_model(tmp_path, drain_timeout_s=0.2)
        await host.load("s", "1", uri)
        with host.serving("s", "1"):
            started = time.monotonic()
            assert await host.unload("s", "1") == ["1"]
            assert 0.15 < time.monotonic() - started < 2.0
        assert host.used_bytes == 0

    asyncio.run(scenario())


# --- concurrency -----------------------------------------------------------------------------------------


def test_fifty_concurrent_loads_of_one_model_share_one_load(
    tmp_path: Path, start_container: Callable[..., ContainerThread]
) -> None:
    reads: list[Path] = []

    def held_loader(path: Path) -> NumpyModel:
        """The first read is held until all 50 load calls have reached the container (each one holding or
        waiting for the model's lock): every one of them arrives while a load runs."""
        reads.append(path)
        deadline = time.monotonic() + 30
        while sum(entry.users for entry in list(host._locks.values())) < 50:
            assert time.monotonic() < deadline, "fewer than 50 load calls reached the container in 30 s"
            time.sleep(0.01)
        return load_model_dir(path)

    thread = start_container(loader=held_loader)
    host = thread.container.models
    path, _, _ = linear_model(tmp_path / "lin")
    repos = [Repository(thread.address) for _ in range(5)]
    try:
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda i: repos[i % 5].load("lin", path), range(50)))
    finally:
        for r in repos:
            r.close()
    assert results == [None] * 50
    assert len(reads) == 1 and thread.container.load_count == 1
    assert thread.container.used_bytes == 40


def test_loads_read_files_off_the_event_loop(
    tmp_path: Path, start_container: Callable[..., ContainerThread]
) -> None:
    reading = threading.Condition()
    readers = 0
    release = threading.Event()

    def held_loader(path: Path) -> NumpyModel:
        """A read that lasts until the test releases it (a slow disk), counted while it runs."""
        nonlocal readers
        with reading:
            readers += 1
            reading.notify_all()
        assert release.wait(30), "the test never released the reads"
        return load_model_dir(path)

    thread = start_container(loader=held_loader)
    paths = [scale_model(tmp_path / str(i), 1.0) for i in range(4)]
    repo = Repository(thread.address)
    try:
        with ThreadPoolExecutor(5) as pool, grpcclient.InferenceServerClient(thread.address) as client:
            loads = [pool.submit(repo.load, f"m{i}", path) for i, path in enumerate(paths)]
            try:
                with reading:  # different models load in parallel: all four reads run at once
                    assert reading.wait_for(lambda: readers == 4, 30), f"{readers} of 4 reads running at once"
                live_started = time.monotonic()
                assert client.is_server_live(client_timeout=5)
                live_s = time.monotonic() - live_started
                states = {m.name: m.state for m in client.get_model_repository_index().models}
            finally:
                release.set()
            for load in loads:
                load.result()
    finally:
        repo.close()
    assert live_s < 0.3  # the loop answered while four reads were held in threads
    assert states == {f"m{i}": "LOADING" for i in range(4)}  # loads in progress are announced


def infer_request(model: str, x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return bytes(request.SerializeToString())


@pytest.fixture
def single_thread_container(tmp_path: Path) -> Iterator[ContainerProcess]:
    """Our container in its own process, its numpy math on one thread (a core stays free for its loop)."""
    one_thread = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    process = ContainerProcess(tmp_path, memory_bytes=80 * MiB, env=one_thread)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def test_a_slow_model_does_not_stall_calls_to_another_model(
    tmp_path: Path, single_thread_container: ContainerProcess
) -> None:
    """Model math runs on the compute pool, off the container's event loop: while one call multiplies a
    1024 x 4096 input by 4096 x 4096 weights (34 GFLOP: about a second on one core), a small model called
    again and again answers each call within 0.45 s and within half the slow call's time. With the
    math on the loop, the fast call made during the product would wait for all of it.

    The container is its own process and requests are serialized beforehand, so neither the test's GIL
    nor its protobuf work is timed. Measured on two shared cores: slow call 0.76-0.96 s, fast calls median
    ~1 ms, max 74-131 ms (when the 16 MiB request and product cross the container's loop, not during the
    math); with the math on the loop, max 580-620 ms."""
    rows, n = 1024, 4096
    address = single_thread_container.address
    slow_path, W, b = linear_model(tmp_path / "slow", n_in=n, n_out=n)
    repo = Repository(address)
    try:
        repo.load("slow", slow_path)
        repo.load("fast", scale_model(tmp_path / "fast", 2.0))
    finally:
        repo.close()
    x = RNG.standard_normal((rows, n)).astype(np.float32)
    slow_request = infer_request("slow", x)
    fast_request = infer_request("fast", np.arange(4, dtype=np.float32))
    big = (("grpc.max_receive_message_length", 64 * MiB),)  # the product is 16 MiB
    infer = "/inference.GRPCInferenceService/ModelInfer"

    def slow_call(channel: grpc.Channel) -> tuple[float, float, bytes]:
        started = time.monotonic()
        response = channel.unary_unary(infer)(slow_request, timeout=120)
        return started, time.monotonic(), response

    fast_calls: list[tuple[float, float]] = []  # (start, end)
    with (
        grpc.insecure_channel(address, options=big) as slow_channel,
        grpc.insecure_channel(address) as fast_channel,
        ThreadPoolExecutor(1) as pool,
    ):
        fast = fast_channel.unary_unary(infer)  # bytes in, bytes out
        fast_answer = fast(fast_request, timeout=10)  # connected before timing
        slow = pool.submit(slow_call, slow_channel)
        while not slow.done():
            started = time.monotonic()
            answer = fast(fast_request, timeout=120)
            fast_calls.append((started, time.monotonic()))
            assert answer == fast_answer
        slow_started, slow_ended, slow_response = slow.result()
    out = pb.ModelInferResponse.FromString(slow_response).raw_output_contents[0]
    np.testing.assert_allclose(
        np.frombuffer(out, np.float32).reshape(rows, n)[:8], x[:8] @ W + b, rtol=1e-3, atol=1e-3
    )
    assert np.frombuffer(
        pb.ModelInferResponse.FromString(fast_answer).raw_output_contents[0], np.float32
    ).tolist() == [0, 2, 4, 6]
    slow_s = slow_ended - slow_started
    during = [end - start for start, end in fast_calls if end <= slow_ended]
    latencies_s = [end - start for start, end in fast_calls]
    print(
        f"slow call {slow_s:.3f} s; {len(during)} fast calls during it, "
        f"median {statistics.median(latencies_s) * 1000:.1f} ms, max {max(latencies_s) * 1000:.1f} ms"
    )
    assert len(during) >= 10, f"only {len(during)} fast calls answered during a {slow_s:.2f} s slow call"
    assert max(latencies_s) < min(0.45, slow_s / 2), (max(latencies_s), slow_s)


# --- streaming -------------------------------------------------------------------------------------------


def test_stream_op_sends_every_element_in_order_and_marks_the_last_final(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("tokens", stream_model(tmp_path / "tokens"))
    path, W, b = linear_model(tmp_path / "lin")
    repo.load("lin", path)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        x = RNG.standard_normal(7).astype(np.float32)
        client.async_stream_infer("tokens", [tensor("INPUT", x)], request_id="r1")
        client.async_stream_infer("missing", [tensor("INPUT", x)], request_id="r2")
        row = RNG.standard_normal((1, 4)).astype(np.float32)
        client.async_stream_infer("lin", [tensor("INPUT", row)], request_id="r3")
        received = [responses.get(timeout=10) for _ in range(len(x) + 2)]
    finally:
        client.stop_stream()
    streamed = received[: len(x)]
    assert all(error is None for _, error in streamed)
    assert [r.get_response().id for r, _ in streamed] == ["r1"] * len(x)
    values = np.concatenate([r.as_numpy("OUTPUT") for r, _ in streamed])
    np.testing.assert_array_equal(values, x)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in streamed]
    assert finals == [False] * (len(x) - 1) + [True]
    result, error = received[len(x)]
    assert result is None and "'missing'" in str(error)  # the error travels in the stream, which goes on
    result, error = received[len(x) + 1]
    assert error is None and result.get_response().parameters["triton_final_response"].bool_param
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), row @ W + b, rtol=1e-6)
    assert responses.empty()


def test_stream_of_no_elements_sends_one_empty_final_response(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("tokens", stream_model(tmp_path / "tokens"))
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tokens", [tensor("INPUT", np.zeros(0, np.float32))])
        result, error = responses.get(timeout=10)
    finally:
        client.stop_stream()
    assert error is None
    response = result.get_response()
    assert list(response.outputs) == [] and response.parameters["triton_final_response"].bool_param


def test_unary_infer_on_a_decoupled_model_is_invalid_argument(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("tokens", stream_model(tmp_path / "tokens"))
    code, message = status_of(lambda: client.infer("tokens", [tensor("INPUT", np.ones(3, np.float32))]))
    assert code == "INVALID_ARGUMENT" and "ModelStreamInfer" in message
    assert client.get_model_config("tokens").config.model_transaction_policy.decoupled


# --- metadata, statistics, index -------------------------------------------------------------------------


def test_metadata_config_and_server_calls_describe_the_loaded_model(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    path, _, _ = linear_model(tmp_path / "lin", n_in=4, n_out=3)
    repo.load("lin", path, version="5")
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "modelyard-container"
    metadata = client.get_model_metadata("lin")
    assert (metadata.versions, metadata.inputs[0].name, list(metadata.inputs[0].shape)) == (
        ["5"],
        "INPUT",
        [-1, 4],
    )
    assert (metadata.outputs[0].datatype, list(metadata.outputs[0].shape)) == ("FP32", [-1, 3])
    config = client.get_model_config("lin").config
    assert (config.name, config.max_batch_size, list(config.output[0].dims)) == ("lin", 0, [-1, 3])
    assert config.parameters["op"].string_value == "linear"


def test_statistics_count_successful_inferences_per_version(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("s", scale_model(tmp_path / "a", 1.0), version="1")
    repo.load("s", scale_model(tmp_path / "b", 2.0), version="2")
    x = tensor("INPUT", np.ones(3, np.float32))
    for _ in range(3):
        client.infer("s", [x], model_version="1")
    client.infer("s", [x])
    status_of(lambda: client.infer("s", [tensor("INPUT", np.ones(3))], model_version="1"))  # FP64: fails
    stats = {s.version: s for s in client.get_inference_statistics("s").model_stats}
    assert (stats["1"].inference_count, stats["1"].execution_count) == (3, 3)
    assert stats["1"].inference_stats.fail.count == 1
    assert (stats["2"].inference_count, stats["2"].inference_stats.success.count) == (1, 1)
    assert status_of(lambda: client.get_inference_statistics("nope"))[0] == "NOT_FOUND"


def test_repository_index_lists_every_loaded_version_as_ready(
    tmp_path: Path, client: grpcclient.InferenceServerClient, repo: Repository
) -> None:
    repo.load("b", scale_model(tmp_path / "b", 1.0), version="2")
    repo.load("a", scale_model(tmp_path / "a", 1.0))
    repo.load("b", tmp_path / "b", version="1")
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("a", "1", "READY"),
        ("b", "1", "READY"),
        ("b", "2", "READY"),
    ]


# --- scale -----------------------------------------------------------------------------------------------


def test_a_thousand_models_load_into_one_container_process_and_all_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    count, n_in, n_out = 1000, 16, 8
    started = time.monotonic()
    weights = []
    for i in range(count):
        path, W, b = linear_model(tmp_path / f"m{i:04d}", n_in, n_out, seed=i)
        weights.append((path, W, b))
    declared_bytes = sum(W.nbytes + b.nbytes for _, W, b in weights)
    process = ContainerProcess(tmp_path, memory_bytes=64 * MiB)
    try:
        process.start()
        repo = Repository(process.address)
        rss_before = process.rss_bytes()
        load_s = []
        for i, (path, _, _) in enumerate(weights):
            load_started = time.perf_counter()
            repo.load(f"m{i:04d}", path)
            load_s.append(time.perf_counter() - load_started)
        rss_after = process.rss_bytes()
        repo.close()
        x = RNG.standard_normal((2, n_in)).astype(np.float32)
        with grpcclient.InferenceServerClient(process.address) as client:
            index = client.get_model_repository_index().models
            assert len(index) == count and {m.state for m in index} == {"READY"}
            for i, (_, W, b) in enumerate(weights):
                out = client.infer(f"m{i:04d}", [tensor("INPUT", x)]).as_numpy("OUTPUT")
                np.testing.assert_allclose(out, x @ W + b, rtol=1e-5, atol=1e-6)
        assert process.process is not None and process.process.poll() is None
    finally:
        process.stop()
    total_s = time.monotonic() - started
    load_ms = sorted(s * 1e3 for s in load_s)
    growth = rss_after - rss_before
    with capsys.disabled():
        print(
            f"\n{count} models: load p50 {statistics.median(load_ms):.2f} ms, "
            f"p95 {load_ms[int(0.95 * count)]:.2f} ms; RSS +{growth / MiB:.1f} MiB for "
            f"{declared_bytes / 1024:.0f} KiB of weights "
            f"({(growth - declared_bytes) / count / 1024:.1f} KiB/model beyond weights); "
            f"whole test {total_s:.1f} s"
        )
