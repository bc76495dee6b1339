"""The trust boundary on a real fleet (one Triton, one of our containers, their agents, the router, all
holding a generated fleet secret): two tenants x every router RPC x {own private, other's private, public,
missing}; containers refuse callers without the secret; oversize messages are refused by a router process
whose memory stays bounded.

Every fleet test runs twice, in full: on the embedded store, then on an etcd that serves TLS only and
accepts only clients with a certificate from its CA (the router, controller and agents, and `modelyard
serve` in its own process, reach it through MODELYARD_ETCD_CA/CERT/KEY). A fleet starts in seconds and the
matrix answers in about ten, so the second run costs little and no subset is needed.

"A model private to another tenant does not exist": its answer is compared literally with the answer for
a model that was never registered, the two names swapped.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from modelyard.catalog.examples import install_example
from modelyard.containers.triton.server import free_port
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.v1 import router_pb2
from tests.conftest import EtcdServer, require_triton
from tests.fleet import FleetThread
from tests.test_lazy_load import scale_model
from tests.test_tls import make_ca, make_cert

TENANTS = ("acme", "beta")
CUSTOM = {"public": "pub", "acme": "acme_m", "beta": "beta_m"}  # our container
TRITON = {"public": "t_pub", "acme": "t_acme", "beta": "t_beta"}  # Triton
MISSING = "never_registered"
KSERVE = "/inference.GRPCInferenceService/"
ROUTER = "/modelyard.v1.Router/"


@pytest.fixture(scope="module", params=["embedded", "etcd-tls"])
def fleet_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fleet's store URL: the embedded store, then a TLS-only etcd requiring client certificates (its
    CA, certificate and key in the environment while the module's fleet runs)."""
    workdir = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        yield str(workdir / "store")
        return
    make_ca(workdir, "ca")
    make_cert(workdir, "etcd", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_cert(workdir, "client", "ca", "extendedKeyUsage=clientAuth\n")
    server = EtcdServer(
        workdir / "etcd", tls=(workdir / "etcd.pem", workdir / "etcd.key"), client_ca=workdir / "ca.pem"
    )
    server.workdir.mkdir()
    with pytest.MonkeyPatch.context() as env:
        try:
            server.start()
            for name, file in (("CA", "ca.pem"), ("CERT", "client.pem"), ("KEY", "client.key")):
                env.setenv(f"MODELYARD_ETCD_{name}", str(workdir / file))
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="module")
def fleet(fleet_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("trust")
    thread = FleetThread(workdir, fleet_store, containers=1)
    thread.fleet.custom_containers = 1

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        scale = install_example("scale", workdir / "artifacts")
        models = []
        for owner in ("public", *TENANTS):
            tenants = () if owner == "public" else (owner,)
            models.append(replace(scale_model(workdir / "models", CUSTOM[owner], 2.0), tenants=tenants))
            models.append(replace(scale, name=TRITON[owner], tenants=tenants))
        for model in models:
            await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        fleet.start_controller()
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def infer_request(model: str) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    return request


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    body: str  # the response (text format) or the status details


def unary(address: str, method: str, request: bytes, metadata: tuple[tuple[str, str], ...]) -> Answer:
    with grpc.insecure_channel(address) as channel:
        try:
            response = channel.unary_unary(method)(request, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return Answer(exc.code(), exc.details() or "")
    return Answer(grpc.StatusCode.OK, response.hex())


def streamed(
    address: str, method: str, requests: list[bytes], metadata: tuple[tuple[str, str], ...]
) -> Answer:
    """A bidi or server stream's responses (hex, joined) or its status."""
    with grpc.insecure_channel(address) as channel:
        try:
            if method.endswith("InferStream"):
                responses = list(channel.unary_stream(method)(requests[0], timeout=30, metadata=metadata))
            else:
                responses = list(channel.stream_stream(method)(iter(requests), timeout=30, metadata=metadata))
        except grpc.RpcError as exc:
            return Answer(exc.code(), exc.details() or "")
    return Answer(grpc.StatusCode.OK, "|".join(r.hex() for r in responses))


def error_messages(answer: Answer) -> list[str]:
    """The in-stream `error_message`s of a bidi answer (field 1 of each response)."""
    messages = []
    for part in answer.body.split("|"):
        response = kserve.ModelStreamInferResponse.FromString(bytes.fromhex(part))
        if response.error_message:
            messages.append(response.error_message)
    return messages


def shape(answer: Answer, name: str, bidi: bool) -> tuple[grpc.StatusCode, str | list[str]]:
    """An answer with the model's name replaced: a bidi stream's in-stream error messages, else the status
    details or the response bytes (hex)."""
    if bidi and answer.code == grpc.StatusCode.OK:
        return answer.code, [m.replace(name, "NAME") for m in error_messages(answer)]
    return answer.code, answer.body.replace(name, "NAME")


# Each RPC, as (name, call): call(address, model, metadata) -> Answer.
Call = Callable[[str, str, tuple[tuple[str, str], ...]], Answer]
RPCS: dict[str, Call] = {
    "ModelInfer": lambda a, m, md: unary(a, KSERVE + "ModelInfer", infer_request(m).SerializeToString(), md),
    "ModelMetadata": lambda a, m, md: unary(
        a, KSERVE + "ModelMetadata", kserve.ModelMetadataRequest(name=m).SerializeToString(), md
    ),
    "ModelConfig": lambda a, m, md: unary(
        a, KSERVE + "ModelConfig", kserve.ModelConfigRequest(name=m).SerializeToString(), md
    ),
    "ModelStatistics": lambda a, m, md: unary(
        a, KSERVE + "ModelStatistics", kserve.ModelStatisticsRequest(name=m).SerializeToString(), md
    ),
    "ModelReady": lambda a, m, md: unary(
        a, KSERVE + "ModelReady", kserve.ModelReadyRequest(name=m).SerializeToString(), md
    ),
    "Infer": lambda a, m, md: unary(a, ROUTER + "Infer", infer_request(m).SerializeToString(), md),
    "WhereIs": lambda a, m, md: unary(
        a, ROUTER + "WhereIs", router_pb2.WhereIsRequest(model_name=m).SerializeToString(), md
    ),
    "InferStream": lambda a, m, md: streamed(
        a, ROUTER + "InferStream", [infer_request(m).SerializeToString()], md
    ),
    "InferSession": lambda a, m, md: streamed(
        a, ROUTER + "InferSession", [infer_request(m).SerializeToString()], md
    ),
    "ModelStreamInfer": lambda a, m, md: streamed(
        a, KSERVE + "ModelStreamInfer", [infer_request(m).SerializeToString()], md
    ),
}


def other(tenant: str) -> str:
    return next(t for t in TENANTS if t != tenant)


@pytest.mark.parametrize("backend", ["custom", "triton"])
@pytest.mark.parametrize("rpc", sorted(RPCS))
@pytest.mark.parametrize("tenant", TENANTS)
def test_another_tenants_private_model_answers_exactly_as_a_missing_one(
    fleet: FleetThread, tenant: str, rpc: str, backend: str
) -> None:
    names = CUSTOM if backend == "custom" else TRITON
    call, metadata = RPCS[rpc], (("x-tenant-id", tenant),)
    hidden = call(fleet.address, names[other(tenant)], metadata)
    missing = call(fleet.address, MISSING, metadata)
    bidi = rpc in ("InferSession", "ModelStreamInfer")
    assert shape(hidden, names[other(tenant)], bidi) == shape(missing, MISSING, bidi)
    if bidi:
        assert error_messages(hidden) == [f"model '{names[other(tenant)]}' is not registered"]
    elif rpc == "ModelReady":
        assert kserve.ModelReadyResponse.FromString(bytes.fromhex(hidden.body)).ready is False
    else:
        assert hidden.code == grpc.StatusCode.NOT_FOUND, hidden


@pytest.mark.parametrize("backend", ["custom", "triton"])
@pytest.mark.parametrize("rpc", sorted(RPCS))
@pytest.mark.parametrize("tenant", TENANTS)
def test_own_private_and_public_models_are_served(
    fleet: FleetThread, tenant: str, rpc: str, backend: str
) -> None:
    names = CUSTOM if backend == "custom" else TRITON
    for model in (names[tenant], names["public"]):
        answer = RPCS[rpc](fleet.address, model, (("x-tenant-id", tenant),))
        assert answer.code == grpc.StatusCode.OK, (model, answer)
        if rpc in ("InferSession", "ModelStreamInfer"):
            assert error_messages(answer) == []
        if rpc == "ModelReady":
            assert kserve.ModelReadyResponse.FromString(bytes.fromhex(answer.body)).ready is True


def test_a_caller_without_a_tenant_gets_only_public_models(fleet: FleetThread) -> None:
    for backend in (CUSTOM, TRITON):
        assert RPCS["ModelInfer"](fleet.address, backend["public"], ()).code == grpc.StatusCode.OK
        hidden = RPCS["ModelInfer"](fleet.address, backend["acme"], ())
        assert (hidden.code, hidden.body) == (
            grpc.StatusCode.NOT_FOUND,
            f"model '{backend['acme']}' is not registered",
        )


@pytest.mark.parametrize("tenant", TENANTS)
def test_repository_index_lists_only_what_the_tenant_may_call(fleet: FleetThread, tenant: str) -> None:
    answer = unary(
        fleet.address, KSERVE + "RepositoryIndex", kserve.RepositoryIndexRequest().SerializeToString(),
        (("x-tenant-id", tenant),),
    )  # fmt: skip
    index = kserve.RepositoryIndexResponse.FromString(bytes.fromhex(answer.body))
    listed = {(m.name, m.state) for m in index.models}
    expected = {(n[k], "READY") for n in (CUSTOM, TRITON) for k in ("public", tenant)}
    assert listed == expected


@pytest.mark.parametrize("tenant", TENANTS)
def test_watch_routes_never_mentions_another_tenants_private_models(fleet: FleetThread, tenant: str) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        stream = channel.unary_stream(ROUTER + "WatchRoutes")(
            router_pb2.WatchRoutesRequest().SerializeToString(),
            timeout=30,
            metadata=(("x-tenant-id", tenant),),
        )
        snapshot = router_pb2.RouteUpdate.FromString(next(iter(stream)))
        stream.cancel()
    assert {e.model_name for e in snapshot.models} == {
        n[k] for n in (CUSTOM, TRITON) for k in ("public", tenant)
    }
    assert other(tenant) not in str(snapshot)
    assert all(not v.ready for e in snapshot.models for v in e.versions)  # no secret: no addresses


def container_call(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.RepositoryIndex(kserve.RepositoryIndexRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("kind", ["triton", "custom"])
def test_a_container_called_directly_without_the_secret_gives_nothing(fleet: FleetThread, kind: str) -> None:
    process = fleet.fleet.tritons[0] if kind == "triton" else fleet.fleet.customs[0]
    secret = fleet.fleet.fleet_secret
    refused = grpc.StatusCode.UNAVAILABLE if kind == "triton" else grpc.StatusCode.UNAUTHENTICATED
    assert container_call(process.address, ()) == refused
    assert container_call(process.address, ((FLEET_SECRET_HEADER, "guess-" + secret[6:]),)) == refused
    assert container_call(process.address, ((FLEET_SECRET_HEADER, secret),)) == grpc.StatusCode.OK
    with grpc.insecure_channel(process.address) as channel:  # inference too, not only the repository
        try:
            channel.unary_unary(KSERVE + "ModelInfer")(
                infer_request(CUSTOM["acme"]).SerializeToString(), timeout=10
            )
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code == refused


def test_our_container_loads_only_from_its_model_store(fleet: FleetThread, tmp_path: Path) -> None:
    outside = scale_model(
        tmp_path.parent.parent / "elsewhere", "intruder", 1.0
    )  # not under the fleet's store
    request = kserve.RepositoryModelLoadRequest(model_name="intruder")
    request.parameters["artifact_uri"].string_param = outside.artifact_uri
    process = fleet.fleet.customs[0]
    with grpc.insecure_channel(process.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            kserve_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                request, timeout=10, metadata=((FLEET_SECRET_HEADER, fleet.fleet.fleet_secret),)
            )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "outside this container's model store" in (caught.value.details() or "")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def small_router(fleet: FleetThread) -> Iterator[tuple[str, int]]:
    """`modelyard serve` as its own process (its memory measured alone), 1 MiB messages at most."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "modelyard", "serve", "--store", fleet.fleet.store_url, "--port", str(port),
            "--max-message-bytes", str(1 << 20), "--fleet-secret-file", str(fleet.fleet.fleet_secret_file),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while RPCS["ModelReady"](address, CUSTOM["public"], ()).body != "0801":  # ready=true
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the router did not serve within 30 s"
            time.sleep(0.1)
        yield address, process.pid
    finally:
        process.terminate()
        process.wait(10)


def test_an_oversize_message_is_resource_exhausted_and_memory_stays_bounded(
    fleet: FleetThread, small_router: tuple[str, int]
) -> None:
    address, router_pid = small_router
    served = RPCS["ModelInfer"](address, CUSTOM["public"], ())
    assert served.code == grpc.StatusCode.OK
    big = infer_request(CUSTOM["public"])
    big.raw_input_contents.append(np.zeros(2 << 20, dtype=np.float32).tobytes())  # 8 MiB
    payload = big.SerializeToString()
    before = rss_bytes(router_pid)
    for _ in range(40):  # 320 MiB offered in all
        answer = unary(address, KSERVE + "ModelInfer", payload, ())
        assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(1 << 20) in answer.body  # the limit, in the message
    grown = rss_bytes(router_pid) - before
    print(f"router RSS {before / 1024**2:.1f} MiB, grew by {grown / 1024**2:.1f} MiB over 320 MiB refused")
    assert grown < 32 * 1024**2, f"router RSS grew by {grown / 1024**2:.1f} MiB"
    assert RPCS["ModelInfer"](address, CUSTOM["public"], ()).code == grpc.StatusCode.OK  # still serving


def modelyard(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args], capture_output=True, text=True, timeout=timeout_s
    )


def test_serve_on_a_non_loopback_address_refuses_to_start_without_an_identity_mode(tmp_path: Path) -> None:
    refused = modelyard("serve", "--store", str(tmp_path / "store"), "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: refusing to serve on 0.0.0.0")
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tenant-certs", "certs"], "--tenant-certs needs --tls-client-ca"),
        (["--tenant-tokens", "missing-file"], "cannot read token file missing-file"),
        (["--tenant-tokens", "bad-tokens"], "token file line 1: a token key is sha256:<64 hex digits>"),
    ],
)
def test_serve_says_what_is_wrong_with_its_identity_settings(
    tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "bad-tokens").write_text("plain-token acme\n")
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "serve", "--store", str(tmp_path / "store"), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


def test_up_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    refused = modelyard("up", "--workdir", str(tmp_path), "--host", "0.0.0.0")
    assert refused.returncode == 2 and "serves on loopback only" in refused.stderr
