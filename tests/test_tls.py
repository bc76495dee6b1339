"""TLS and mutual TLS on the router's front and between router and container, with a throwaway CA; tenants
from client certificates and from bearer tokens (router/identity.py)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.containers.agent import Agent
from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.numpy_container.container import CustomContainer
from modelyard.placement import registry
from modelyard.placement.model import Container
from modelyard.router.identity import Authenticator, IdentityFile, token_key
from modelyard.router.rest import server_ssl_context
from modelyard.router.server import RouterServer
from modelyard.tls import channel_credentials, server_credentials
from tests.fleet import FleetThread
from tests.test_lazy_load import scale_model


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> None:
    subject = ("-subj", f"/CN={name}", "-days", "1")
    openssl("req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", *subject, cwd=directory)


def make_cert(directory: Path, name: str, ca: str, extensions: str) -> None:
    openssl(
        "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory
    )
    (directory / f"{name}.ext").write_text(extensions)
    signer = ("-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "1")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        *signer,
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
        cwd=directory,
    )


@dataclass
class PKI:
    root: Path

    def __getitem__(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """ca signs server and client; a second CA (intruder) signs a client the router must refuse."""
    root = tmp_path_factory.mktemp("pki")
    make_ca(root, "ca")
    make_ca(root, "intruder-ca")
    make_cert(
        root, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    make_cert(root, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(
        root, "beta", "ca", "subjectAltName=URI:spiffe://fleet/tenant/beta\nextendedKeyUsage=clientAuth\n"
    )
    make_cert(root, "stranger", "ca", "extendedKeyUsage=clientAuth\n")  # signed, but mapped to no tenant
    make_cert(root, "intruder", "intruder-ca", "extendedKeyUsage=clientAuth\n")
    # CN=client is acme's trusted service (may read routes); beta is known by its SAN.
    (root / "tenant-certs").write_text("CN=client acme routes\nspiffe://fleet/tenant/beta beta\n")
    return PKI(root)


ACME_TOKEN = "acme-token-0123456789"
BETA_TOKEN = "beta-token-0123456789"


@dataclass
class SecureFleet:
    thread: FleetThread
    mtls_router: RouterServer
    plain_upstream_router: RouterServer
    token_router: RouterServer
    tokens: Path


@pytest.fixture(scope="module")
def fleet(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    """Our container serving TLS only; one router with mTLS in front and TLS to the container, and one
    router that calls the container in plaintext (and must fail)."""
    workdir = tmp_path_factory.mktemp("tls")
    thread = FleetThread(workdir, str(workdir / "store"), containers=0)
    box: dict[str, object] = {}

    async def setup() -> None:
        fleet = thread.fleet
        await fleet.start_store_and_models(examples=False)
        container = CustomContainer(
            1 << 30, server_credentials=server_credentials(pki["server.pem"], pki["server.key"])
        )
        await container.start()
        adapter = CustomAdapter(container.address, channel_credentials(pki["ca.pem"]))
        agent = Agent(
            fleet.store, Container("box", container.address, memory_bytes=1 << 30, backend="custom"), adapter
        )
        fleet._tasks.append(asyncio.get_running_loop().create_task(agent.run()))
        model = scale_model(workdir / "models", "m", 2.0)
        private = replace(scale_model(workdir / "models", "p", 3.0), tenants=("acme",))
        for m in (model, private):
            await registry.register_model(fleet.store, m)
        await registry.write_shard_map(
            fleet.store, {model.key: ["box"], private.key: ["box"]}, expected_generation=0
        )
        secure = RouterServer(
            fleet.store, port=0,
            server_credentials=server_credentials(pki["server.pem"], pki["server.key"], pki["ca.pem"]),
            upstream_credentials=channel_credentials(pki["ca.pem"]),
            identity=Authenticator(certificates=IdentityFile(pki["tenant-certs"], "certificate map")),
            http_port=0,
            http_ssl=server_ssl_context(str(pki["server.pem"]), str(pki["server.key"]), str(pki["ca.pem"])),
        )  # fmt: skip
        plain = RouterServer(fleet.store, port=0)
        tokens.write_text(f"{token_key(ACME_TOKEN)} acme  # the acme team\n")
        by_token = RouterServer(
            fleet.store, port=0,
            server_credentials=server_credentials(pki["server.pem"], pki["server.key"]),
            upstream_credentials=channel_credentials(pki["ca.pem"]),
            identity=Authenticator(tokens=IdentityFile(tokens, "token file", check_s=0.05)),
        )  # fmt: skip
        for router in (secure, plain, by_token):
            await router.start()
        fleet.router = secure
        await fleet.wait_ready([model, private], timeout_s=30)
        box.update(container=container, adapter=adapter, secure=secure, plain=plain, tokens=by_token)

    tokens = workdir / "tenant-tokens"
    try:
        thread.call(setup())
        yield SecureFleet(thread, box["secure"], box["plain"], box["tokens"], tokens)  # type: ignore[arg-type]
    finally:

        async def teardown() -> None:
            await box["tokens"].stop()  # type: ignore[attr-defined]
            await box["plain"].stop()  # type: ignore[attr-defined]
            await box["container"].stop()  # type: ignore[attr-defined]
            await box["adapter"].close()  # type: ignore[attr-defined]

        if box:
            thread.call(teardown())
        thread.stop()


def infer(address: str, model: str = "m", headers: dict[str, str] | None = None, **tls: object) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with grpcclient.InferenceServerClient(address, **tls) as client:  # type: ignore[arg-type]
        return client.infer(model, [tensor], headers=headers, client_timeout=10).as_numpy("OUTPUT")


def refusal(
    address: str, model: str = "m", headers: dict[str, str] | None = None, **tls: object
) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        infer(address, model, headers, **tls)
    return str(caught.value.status()), str(caught.value.message())


def client_tls(pki: PKI, name: str | None) -> dict[str, object]:
    tls: dict[str, object] = {"ssl": True, "root_certificates": str(pki["ca.pem"])}
    if name:
        tls.update(private_key=str(pki[f"{name}.key"]), certificate_chain=str(pki[f"{name}.pem"]))
    return tls


def test_a_client_with_a_valid_certificate_is_served_end_to_end_over_tls(
    fleet: SecureFleet, pki: PKI
) -> None:
    np.testing.assert_allclose(infer(fleet.mtls_router.address, **client_tls(pki, "client")), [2.0, 4.0])


@pytest.mark.parametrize("who", [None, "intruder"], ids=["no-client-cert", "cert-from-another-ca"])
def test_clients_without_a_valid_certificate_are_refused(
    fleet: SecureFleet, pki: PKI, who: str | None
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(fleet.mtls_router.address, **client_tls(pki, who))
    assert caught.value.status() == "StatusCode.UNAVAILABLE"


def test_a_plaintext_client_is_refused_by_the_tls_front(fleet: SecureFleet) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(fleet.mtls_router.address)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"


def test_a_router_calling_the_tls_container_in_plaintext_fails(fleet: SecureFleet) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(fleet.plain_upstream_router.address)
    # The container refuses the plaintext connection (UNAVAILABLE: the request never ran), so the router
    # waits within the deadline for a copy it can reach (router/routing.py forward_unary); there is none.
    assert caught.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


def test_the_zero_hop_client_follows_routes_and_calls_the_container_over_tls(
    fleet: SecureFleet, pki: PKI
) -> None:
    from modelyard.client import Client

    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    tls = {"root_certificates": str(pki["ca.pem"]), "private_key": str(pki["client.key"]),
           "certificate_chain": str(pki["client.pem"])}  # fmt: skip
    with Client(fleet.mtls_router.address, **tls) as client:
        assert client.wait_synced()  # WatchRoutes over mutual TLS
        out = client.infer("m", [tensor], client_timeout=10).as_numpy("OUTPUT")
    np.testing.assert_allclose(out, [2.0, 4.0])
    assert client.direct_calls == 1 and client.router_calls == 0  # straight to the TLS-only container


def test_a_client_certificate_gives_its_tenant_and_only_its_tenant(fleet: SecureFleet, pki: PKI) -> None:
    address = fleet.mtls_router.address
    np.testing.assert_allclose(
        infer(address, "p", **client_tls(pki, "client")), [3.0, 6.0]
    )  # CN=client: acme
    np.testing.assert_allclose(infer(address, "m", **client_tls(pki, "beta")), [2.0, 4.0])  # by its SAN
    # For beta, acme's private model is exactly a model that was never registered.
    assert refusal(address, "p", **client_tls(pki, "beta")) == (
        "StatusCode.NOT_FOUND",
        refusal(address, "never", **client_tls(pki, "beta"))[1].replace("never", "p"),
    )


def test_a_certificate_mapped_to_no_tenant_is_unauthenticated(fleet: SecureFleet, pki: PKI) -> None:
    code, message = refusal(fleet.mtls_router.address, **client_tls(pki, "stranger"))
    assert code == "StatusCode.UNAUTHENTICATED" and "CN=stranger maps to no tenant" in message


def test_a_tenant_header_that_disagrees_with_the_certificate_is_denied(fleet: SecureFleet, pki: PKI) -> None:
    tls = client_tls(pki, "beta")
    code, message = refusal(fleet.mtls_router.address, "p", {"x-tenant-id": "acme"}, **tls)
    assert code == "StatusCode.PERMISSION_DENIED" and "x-tenant-id 'acme'" in message
    np.testing.assert_allclose(
        infer(fleet.mtls_router.address, "m", {"x-tenant-id": "beta"}, **tls), [2.0, 4.0]
    )


def token_tls(pki: PKI) -> dict[str, object]:
    return {"ssl": True, "root_certificates": str(pki["ca.pem"])}


def test_a_bearer_token_gives_its_tenant(fleet: SecureFleet, pki: PKI) -> None:
    address = fleet.token_router.address
    auth = {"authorization": f"Bearer {ACME_TOKEN}"}
    np.testing.assert_allclose(infer(address, "p", auth, **token_tls(pki)), [3.0, 6.0])
    denied = refusal(address, "p", {**auth, "x-tenant-id": "beta"}, **token_tls(pki))
    assert denied[0] == "StatusCode.PERMISSION_DENIED"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer not-a-token"}, {"authorization": "Basic abc"}, {"x-tenant-id": "acme"}],
    ids=["none", "unknown-token", "not-bearer", "header-only"],
)
def test_callers_without_a_valid_token_are_unauthenticated(
    fleet: SecureFleet, pki: PKI, headers: dict[str, str]
) -> None:
    assert (
        refusal(fleet.token_router.address, "m", headers, **token_tls(pki))[0] == "StatusCode.UNAUTHENTICATED"
    )


def test_the_token_file_is_reloaded_when_it_changes(fleet: SecureFleet, pki: PKI) -> None:
    address = fleet.token_router.address
    beta = {"authorization": f"Bearer {BETA_TOKEN}"}
    assert refusal(address, "m", beta, **token_tls(pki))[0] == "StatusCode.UNAUTHENTICATED"
    original = fleet.tokens.read_text()
    staged = fleet.tokens.with_suffix(".new")
    staged.write_text(original + f"{token_key(BETA_TOKEN)} beta\n")
    os.replace(staged, fleet.tokens)  # as a Kubernetes Secret volume changes: a new file
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                np.testing.assert_allclose(infer(address, "m", beta, **token_tls(pki)), [2.0, 4.0])
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, "the new token was not accepted within 10 s"
                time.sleep(0.05)
        # A change that does not parse keeps the identities the router has.
        staged.write_text("this is not a token line at all\n")
        os.replace(staged, fleet.tokens)
        source = fleet.token_router.router.identity.tokens
        assert source is not None
        deadline = time.monotonic() + 10
        while source._signature != source._stat():  # the router has looked at the bad file
            assert time.monotonic() < deadline, "the router did not look at the changed file"
            time.sleep(0.02)
        np.testing.assert_allclose(infer(address, "m", beta, **token_tls(pki)), [2.0, 4.0])
    finally:
        fleet.tokens.write_text(original)


def test_with_mutual_tls_the_plaintext_health_port_still_answers_the_kubelets_probes(
    pki: PKI, tmp_path: Path
) -> None:
    """The kubelet's gRPC probe presents no client certificate, so a router requiring one fails it; the
    probes of deploy/k8s/router.yaml go to /readyz and /healthz on the plaintext metrics port instead."""
    import sys
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from modelyard.containers.triton.server import free_port
    from tests.conftest import stop_process

    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "--store", str(tmp_path / "store"),
         "--port", str(port), "--metrics-port", str(metrics_port),
         "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
         "--tls-client-ca", str(pki["ca.pem"]), "--tenant-certs", str(pki["tenant-certs"])],
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # as the kubelet's readinessProbe: every period until it passes
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=3) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=3) as response:
            assert response.status == 200
        # What a gRPC probe would see on the TLS port: no client certificate, no answer.
        credentials = grpc.ssl_channel_credentials(pki["ca.pem"].read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        stop_process(process)  # type: ignore[arg-type]


def rest_infer(address: str, model: str, client: str | None, pki: PKI) -> tuple[int, dict[str, object]]:
    """A KServe v2 REST infer call over TLS to the router's REST port, with `client`'s certificate."""
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    if client is not None:
        context.load_cert_chain(str(pki[f"{client}.pem"]), str(pki[f"{client}.key"]))
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    body = {"inputs": [{"name": "INPUT", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body=json.dumps(body))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_rest_over_mtls_takes_the_tenant_from_the_client_certificate(fleet: SecureFleet, pki: PKI) -> None:
    address = fleet.mtls_router.rest_address
    assert address is not None
    status, answer = rest_infer(address, "p", "client", pki)  # CN=client: acme, whose private model p is
    assert status == 200 and answer["outputs"][0]["data"] == [3.0, 6.0]  # type: ignore[index]
    status, answer = rest_infer(address, "p", "beta", pki)  # beta: p does not exist
    assert status == 404 and "'p'" in str(answer["error"])
    status, answer = rest_infer(address, "m", "stranger", pki)
    assert status == 401 and "CN=stranger maps to no tenant" in str(answer["error"])
    with pytest.raises((ssl.SSLError, ConnectionError)):  # no certificate: the handshake fails
        rest_infer(address, "m", None, pki)
