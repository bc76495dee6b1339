"""TLS and mutual TLS on the router's front and between router and container, with a throwaway CA."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from backends.agent import Agent
from backends.container import CustomContainer
from backends.custom import CustomAdapter
from modelyard.tls import channel_credentials, server_credentials
from placement import registry
from placement.model import Container
from router.server import RouterServer
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
    make_cert(root, "intruder", "intruder-ca", "extendedKeyUsage=clientAuth\n")
    return PKI(root)


@dataclass
class SecureFleet:
    thread: FleetThread
    mtls_router: RouterServer
    plain_upstream_router: RouterServer


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
        await registry.register_model(fleet.store, model)
        await registry.write_shard_map(fleet.store, {model.key: ["box"]}, expected_generation=0)
        secure = RouterServer(
            fleet.store, port=0,
            server_credentials=server_credentials(pki["server.pem"], pki["server.key"], pki["ca.pem"]),
            upstream_credentials=channel_credentials(pki["ca.pem"]),
        )  # fmt: skip
        plain = RouterServer(fleet.store, port=0)
        await secure.start()
        await plain.start()
        fleet.router = secure
        await fleet.wait_ready([model], timeout_s=30)
        box.update(container=container, adapter=adapter, secure=secure, plain=plain)

    try:
        thread.call(setup())
        yield SecureFleet(thread, box["secure"], box["plain"])  # type: ignore[arg-type]
    finally:

        async def teardown() -> None:
            await box["plain"].stop()  # type: ignore[attr-defined]
            await box["container"].stop()  # type: ignore[attr-defined]
            await box["adapter"].close()  # type: ignore[attr-defined]

        if box:
            thread.call(teardown())
        thread.stop()


def infer(address: str, **tls: object) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with grpcclient.InferenceServerClient(address, **tls) as client:  # type: ignore[arg-type]
        return client.infer("m", [tensor], client_timeout=10).as_numpy("OUTPUT")


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
    assert caught.value.status() == "StatusCode.UNAVAILABLE"


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
