"""The S3 model store against a real S3 endpoint (moto_server as its own process): upload and import by
hash, one-line errors, verified and bounded agent caches, an endpoint that dies mid-download, and agents
loading from S3 into Triton and into our container."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from modelyard.catalog.modelstore import checked
from modelyard.catalog.s3store import ArtifactCache, S3ModelStore, S3StoreError, pack, s3_client
from modelyard.local import LocalFleet
from modelyard.numpy_container.numpy_model import write_model_dir
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from tests.conftest import require_triton
from tests.fleet import FleetThread, start_custom_fleet
from tests.s3 import MotoServer, PausingProxy, aws_environment

BUCKET = "fleet"
STORE = f"s3://{BUCKET}/models"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto: MotoServer) -> Iterator[MotoServer]:
    """The endpoint with an empty `fleet` bucket, and boto3 in this process pointed at it."""
    client = moto.client()
    for bucket in client.list_buckets().get("Buckets", []):
        for item in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            client.delete_object(Bucket=bucket["Name"], Key=item["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    client.create_bucket(Bucket=BUCKET)
    with aws_environment(moto):
        yield moto


def numpy_model(folder: Path, factor: float, padding_bytes: int = 0) -> Path:
    """One of our container's models (OUTPUT = INPUT * factor), optionally with a big extra file."""
    model = write_model_dir(
        folder,
        "scale",
        {"factor": np.array([factor], dtype=np.float32)},
        inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
        outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
    )
    if padding_bytes:  # incompressible, so that sizes on the wire are what the test says
        (model / "padding.bin").write_bytes(np.random.default_rng(int(factor)).bytes(padding_bytes))
    return model


def tgz(source: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=".")
    return archive


def keys(server: MotoServer) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return sorted(item["Key"] for item in listed)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env if env is not None else dict(os.environ),
    )


def test_upload_stores_the_artifact_once_by_hash_and_registers_its_s3_uri(
    s3: MotoServer, tmp_path: Path
) -> None:
    archive = tgz(numpy_model(tmp_path / "double", 2.0), tmp_path / "double.tgz")
    store = str(tmp_path / "store")
    first = cli("models", "upload", str(archive), "--name", "double", "--version", "1",
                "--store", store, "--model-store", STORE)  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = cli("models", "upload", str(archive), "--name", "double", "--version", "2",
                 "--store", store, "--model-store", STORE)  # fmt: skip
    assert second.returncode == 0, second.stderr
    stored = keys(s3)
    assert len(stored) == 1  # one artifact for two versions: written once, named by its content
    listed = json.loads(cli("models", "list", "--store", store, "--json").stdout)
    shown = next(m for m in listed if m["name"] == "double" and m["version"] == "2")
    assert shown["artifact_uri"] == f"s3://{BUCKET}/{stored[0]}"
    with checked(tmp_path / "double") as artifact:
        assert stored[0] == f"models/{artifact.sha256}.tar"  # a folder's sha256 is its files' hash


def test_import_stores_each_archive_once_in_s3(s3: MotoServer, tmp_path: Path) -> None:
    tgz(numpy_model(tmp_path / "a", 2.0), tmp_path / "a.tgz")
    tgz(numpy_model(tmp_path / "b", 3.0), tmp_path / "b.tgz")
    lines = [{"name": f"m{i}", "version": "1", "archive": "a.tgz" if i % 2 else "b.tgz"} for i in range(6)]
    (tmp_path / "models.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = cli("models", "import", str(tmp_path / "models.jsonl"),
                 "--store", str(tmp_path / "store"), "--model-store", STORE)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(keys(s3)) == 2


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing bucket", "s3://nowhere: the bucket does not exist at http://127.0.0.1:"),
        ("no credentials", "s3://fleet: no AWS credentials (set AWS_ACCESS_KEY_ID"),
        ("endpoint down", "s3://fleet: cannot reach the S3 endpoint http://127.0.0.1:"),
        ("refused credentials", "s3://fleet: access denied by http://127.0.0.1:"),
    ],
)
def test_an_unusable_s3_store_is_refused_with_one_line(
    s3: MotoServer, tmp_path: Path, case: str, expected: str
) -> None:
    archive = tgz(numpy_model(tmp_path / "double", 2.0), tmp_path / "double.tgz")
    env = {**os.environ, **s3.env()}
    model_store = STORE
    started: list[MotoServer] = []
    if case == "missing bucket":
        model_store = "s3://nowhere/models"
    elif case == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
        env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    elif case == "endpoint down":
        closed = MotoServer(tmp_path / "closed")  # a free port nobody listens on
        env["AWS_ENDPOINT_URL"] = closed.endpoint
    else:  # a second moto that checks credentials (ours are not in its IAM): S3 answers 403
        checking = MotoServer(tmp_path / "checking", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
        checking.start()
        started.append(checking)
        env["AWS_ENDPOINT_URL"] = checking.endpoint
    with contextlib.ExitStack() as stack:
        for server in started:
            stack.callback(server.stop)
        result = cli("models", "upload", str(archive), "--name", "double", "--version", "1",
                 "--store", str(tmp_path / "store"), "--model-store", model_store, env=env)  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_an_object_whose_files_do_not_match_its_hash_is_refused_and_not_cached(
    s3: MotoServer, tmp_path: Path
) -> None:
    store = S3ModelStore(STORE)
    with checked(numpy_model(tmp_path / "good", 2.0)) as artifact:
        uri = store.put(artifact)
    # Overwrite the object with other files under the same name (corruption, or a hand edit).
    pack(numpy_model(tmp_path / "evil", 5.0), tmp_path / "evil.tar")
    s3.client().upload_file(str(tmp_path / "evil.tar"), BUCKET, uri.split("/", 3)[3])
    cache = ArtifactCache(tmp_path / "cache", model_store=STORE)
    with pytest.raises(S3StoreError, match="sha256 mismatch"):
        cache.fetch(uri)
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_cache_refuses_artifacts_outside_its_model_store(s3: MotoServer, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", model_store=STORE)
    with pytest.raises(S3StoreError, match="outside the model store"):
        cache.fetch(f"s3://other/models/{'0' * 64}.tar")


def test_the_cache_keeps_the_most_recently_used_artifacts_within_its_bound(
    s3: MotoServer, tmp_path: Path
) -> None:
    store = S3ModelStore(STORE)
    uris = []
    for i in range(3):
        with checked(numpy_model(tmp_path / f"m{i}", float(i), padding_bytes=400_000)) as artifact:
            uris.append(store.put(artifact))
    cache = ArtifactCache(tmp_path / "cache", max_bytes=900_000, model_store=STORE)  # room for two
    a, b, c = uris
    cache.fetch(a)
    cache.fetch(b)
    cache.fetch(a)  # a is now more recently used than b
    cache.fetch(c)  # over the bound: b leaves
    held = {entry.name for _, _, entry in cache.entries()}
    assert held == {a.rsplit("/", 1)[1][:-4], c.rsplit("/", 1)[1][:-4]}
    assert sum(size for _, size, _ in cache.entries()) <= 900_000
    assert cache.downloads == 3
    cache.fetch(b)
    assert cache.downloads == 4


def test_an_endpoint_killed_mid_download_fails_cleanly_and_a_retry_after_restart_works(
    s3: MotoServer, tmp_path: Path
) -> None:
    store = S3ModelStore(STORE)
    # 48 MiB: downloaded in 16 MiB ranged parts, each larger than what loopback sockets buffer.
    source = numpy_model(tmp_path / "big", 2.0, padding_bytes=48 * 1024 * 1024)
    with checked(source) as artifact:
        uri = store.put(artifact)
    proxy = PausingProxy(s3.port, pause_after_bytes=1024 * 1024)
    cache_dir = tmp_path / "cache"
    outcome: list[BaseException | Path] = []
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        cache = ArtifactCache(cache_dir, model_store=STORE, client=s3_client())

        def fetch() -> None:
            try:
                outcome.append(cache.fetch(uri))
            except BaseException as exc:
                outcome.append(exc)

        fetching = threading.Thread(target=fetch)
        fetching.start()
        assert proxy.paused.wait(60), "the download never started"
        s3.kill()
        proxy.release()
        fetching.join(120)
        assert not fetching.is_alive(), "the download hung after the endpoint died"
        assert len(outcome) == 1 and isinstance(outcome[0], S3StoreError), outcome
        assert str(outcome[0]).startswith(uri), outcome[0]
        assert "\n" not in str(outcome[0])
        assert list(cache_dir.iterdir()) == []  # no partial artifact, no leftover download

        # The endpoint comes back (moto restarts empty: the store's content is put back), and a retry works.
        s3.start()
        s3.client().create_bucket(Bucket=BUCKET)
        with aws_environment(s3), checked(source) as artifact:
            assert S3ModelStore(STORE).put(artifact) == uri
        path = cache.fetch(uri)
        assert path == cache_dir / uri.rsplit("/", 1)[1][:-4]
        assert (path / "padding.bin").read_bytes() == (source / "padding.bin").read_bytes()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        proxy.close()
        if s3.process is None:
            s3.start()


def test_agents_load_from_s3_into_triton_and_into_our_container(s3: MotoServer, tmp_path: Path) -> None:
    require_triton()
    thread = FleetThread(tmp_path / "fleet", str(tmp_path / "fleet" / "store"), containers=1)
    thread.fleet.custom_containers = 1
    thread.fleet.artifact_store = STORE
    try:
        models = thread.start(lambda fleet: fleet.start())
        assert all(m.artifact_uri.startswith(f"{STORE}/") for m in models)
        x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
        with grpcclient.InferenceServerClient(thread.address) as client:
            scale = grpcclient.InferInput("INPUT", [3], "FP32")
            scale.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("scale", [scale]).as_numpy("OUTPUT"), x * 2)
            rows = np.ones((1, 4), dtype=np.float32)
            linear = grpcclient.InferInput("INPUT", [1, 4], "FP32")
            linear.set_data_from_numpy(rows)
            expected = rows @ (np.arange(8, dtype=np.float32).reshape(4, 2) / 10) + np.array([1.0, -1.0])
            np.testing.assert_allclose(
                client.infer("linear", [linear]).as_numpy("OUTPUT"), expected, rtol=1e-6
            )
        cached = {p.name for p in (tmp_path / "fleet" / "artifact-cache").iterdir()}
        assert {m.artifact_uri.rsplit("/", 1)[1][:-4] for m in models} <= cached
    finally:
        thread.stop()


def test_an_agent_whose_s3_endpoint_is_down_fails_the_load_cleanly_and_loads_once_it_is_back(
    s3: MotoServer, tmp_path: Path
) -> None:
    source = numpy_model(tmp_path / "double", 2.0)
    with checked(source) as artifact:
        uri = S3ModelStore(STORE).put(artifact)
        model = ModelVersion(
            "double", "1", backend="custom", memory_bytes=1024, artifact_uri=uri, sha256=artifact.sha256
        )
    thread = FleetThread(tmp_path / "fleet", str(tmp_path / "fleet" / "store"), containers=0)
    thread.fleet.custom_containers = 1
    thread.fleet.artifact_store = STORE

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        await fleet.start_containers()
        await fleet.wait_registered(60)
        fleet.start_controller()
        await fleet.start_router()

    try:
        thread.start(setup)
        table = thread.fleet.router.router.table  # type: ignore[union-attr]
        s3.kill()
        thread.call(registry.register_model(thread.fleet.store, model))
        deadline = time.monotonic() + 60
        while (state := table.fleet.states.get(("custom-0", model.key))) is None or state.phase != "failed":
            assert time.monotonic() < deadline, f"the load did not fail: {state}"
            time.sleep(0.05)
        assert f"{model.key}: {uri}: cannot reach the S3 endpoint" in state.message
        assert "\n" not in state.message
        cache = tmp_path / "fleet" / "artifact-cache"
        assert list(cache.iterdir()) == []  # nothing partial left behind

        s3.start()  # back (empty: moto keeps objects in memory), and the artifact put back
        s3.client().create_bucket(Bucket=BUCKET)
        with checked(source) as artifact:
            assert S3ModelStore(STORE).put(artifact) == uri
        x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT", [3], "FP32")
        tensor.set_data_from_numpy(x)
        # The agent retries the failed load with backoff (1 s, 2 s, ...), now from the endpoint that is back.
        deadline = time.monotonic() + 60
        while (state := table.fleet.states.get(("custom-0", model.key))) is None or state.phase != "ready":
            assert time.monotonic() < deadline, f"the load was not retried: {state}"
            time.sleep(0.05)
        with grpcclient.InferenceServerClient(thread.address) as client:
            result = client.infer("double", [tensor], client_timeout=30)
        np.testing.assert_allclose(result.as_numpy("OUTPUT"), x * 2)
        assert [p.name for p in cache.iterdir()] == [uri.rsplit("/", 1)[1].removesuffix(".tar")]
    finally:
        thread.stop()
        if s3.process is None:
            s3.start()


def test_a_throttled_download_is_retried_with_backoff_and_completes(s3: MotoServer, tmp_path: Path) -> None:
    with checked(numpy_model(tmp_path / "double", 2.0)) as artifact:
        uri = S3ModelStore(STORE).put(artifact)
    # Two requests answered 503 SlowDown (what S3 says above a prefix's request rate), then S3 itself.
    proxy = PausingProxy(s3.port, pause_after_bytes=1 << 40, throttle_first=2)
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        cache = ArtifactCache(tmp_path / "cache", model_store=STORE, client=s3_client())
        path = cache.fetch(uri)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        proxy.close()
    assert proxy.throttled == 2
    assert (path / "weights.npz").is_file() and cache.downloads == 1


def test_a_fleet_with_a_local_store_serves_a_model_uploaded_to_s3(s3: MotoServer, tmp_path: Path) -> None:
    thread = start_custom_fleet(tmp_path / "fleet", [])
    try:
        archive = tgz(numpy_model(tmp_path / "triple", 3.0), tmp_path / "triple.tgz")
        upload = cli("models", "upload", str(archive), "--name", "triple", "--version", "1",
                     "--store", thread.fleet.store_url, "--model-store", STORE)  # fmt: skip
        assert upload.returncode == 0, upload.stderr
        x = np.array([1.0, 2.0], dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT", [2], "FP32")
        tensor.set_data_from_numpy(x)
        with grpcclient.InferenceServerClient(thread.address) as client:
            # Placed by the controller and fetched by the agent; a call arriving first waits for the load.
            result = client.infer("triple", [tensor], client_timeout=60)
        np.testing.assert_allclose(result.as_numpy("OUTPUT"), x * 3)
    finally:
        thread.stop()
