"""The zero-hop client: calls containers directly, routed by the router's own table, with no extra hop.

`Client` follows `modelyard.v1.Router/WatchRoutes` on a background thread and keeps the routing table in
memory. Each call resolves (model, version, tenant, request id) with the same rules as the router
(router/versions.py), picks a ready copy and sends the request straight to that container with
`tritonclient`. It falls back to the router when the table is stale (the watch has been down longer than
`stale_after_s`), when it knows no ready copy, or when the container answers UNAVAILABLE (the copy moved).
Triton holds each version under an internal name (containers/triton/): the client sends that name to a
Triton container (it asks each container once what it is) and shows the public name in results.

It is meant for trusted internal services: the router sends container addresses only to route readers
(a token or certificate with the `routes` permission, or a caller presenting the fleet secret), and the
containers accept only calls carrying the fleet secret, so a direct call needs `fleet_secret`. The router
sends each caller only the models it may call; without addresses every call goes through the router.

    with Client("router:8001", tenant="acme", fleet_secret=secret) as client:
        result = client.infer("scale", [tensor])      # tritonclient.grpc.InferInput / InferResult
"""

from __future__ import annotations

import functools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.containers.triton.adapter import TRITON_SERVER_NAME, triton_model_name
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.grpc_options import container_channel_options
from modelyard.placement.model import RouteRule
from modelyard.router.identity import TENANT_HEADER
from modelyard.router.versions import choose_version
from modelyard.v1 import router_pb2, router_pb2_grpc

MAX_KEPT_PICKS = 4096  # (model, version, tenant) choices kept between route updates


@functools.lru_cache(maxsize=65536)
def _internal_name(name: str, version: str) -> str:
    """The name Triton knows a version by, made once per version (on every call's path)."""
    return triton_model_name(name, version)


@dataclass
class _VersionRoute:
    tenants: tuple[str, ...]
    ready: list[str]  # container addresses


@dataclass
class RouteCache:
    """The routing table as WatchRoutes describes it. Pure: `apply` updates, `pick` answers."""

    models: dict[str, dict[str, _VersionRoute]] = field(default_factory=dict)
    rules: dict[str, RouteRule] = field(default_factory=dict)
    generation: int = 0
    # (model, version asked, tenant) -> (version, ready addresses): choices that are not random (anything
    # but a weighted split), kept until the next update; on every call's path.
    _picked: dict[tuple[str, str, str | None], tuple[str, tuple[str, ...]] | None] = field(
        default_factory=dict
    )

    def apply(self, update: router_pb2.RouteUpdate) -> None:
        self._picked.clear()
        if update.snapshot:
            self.models.clear()
            self.rules.clear()
        self.generation = update.generation
        for entry in update.models:
            self.models[entry.model_name] = {
                v.version: _VersionRoute(tuple(v.tenants), [c.address for c in v.ready])
                for v in entry.versions
            }
            if entry.has_rule:
                rule = entry.rule
                self.rules[entry.model_name] = RouteRule(
                    entry.model_name,
                    rule.default_version,
                    tuple(sorted(rule.tenant_versions.items())),
                    tuple(sorted(rule.weights.items())),
                )
            else:
                self.rules.pop(entry.model_name, None)
        for name in update.removed:
            self.models.pop(name, None)
            self.rules.pop(name, None)

    def pick(self, model: str, version: str, tenant: str | None, request_id: str) -> tuple[str, str] | None:
        """(version, container address) for a call, or None when the router should take it."""
        key = (model, version, tenant)
        if key in self._picked:
            picked = self._picked[key]
        else:
            picked = self._choose(model, version, tenant, request_id)
            rule = self.rules.get(model)
            if version or rule is None or not rule.weights:  # a split is drawn per call
                if len(self._picked) >= MAX_KEPT_PICKS:
                    self._picked.clear()
                self._picked[key] = picked
        if picked is None:
            return None
        chosen, ready = picked
        return chosen, ready[0] if len(ready) == 1 else random.choice(ready)

    def _choose(
        self, model: str, version: str, tenant: str | None, request_id: str
    ) -> tuple[str, tuple[str, ...]] | None:
        versions = self.models.get(model)
        if not versions:
            return None
        visible = {
            v for v, r in versions.items() if not r.tenants or (tenant is not None and tenant in r.tenants)
        }
        chosen = choose_version(
            model,
            visible,
            requested=version,
            tenant=tenant,
            request_id=request_id,
            rule=self.rules.get(model),
        )
        if chosen is None or not versions[chosen].ready:
            return None
        return chosen, tuple(versions[chosen].ready)


class Client:
    def __init__(
        self,
        router_address: str,
        *,
        tenant: str | None = None,
        stale_after_s: float = 5.0,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        token: str | None = None,
        fleet_secret: str | None = None,
    ) -> None:
        """With `root_certificates` (PEM paths, as tritonclient takes them), every connection — to the
        router and to containers — uses TLS; add `private_key`/`certificate_chain` for mutual TLS.
        `token`: a bearer token for a router that identifies callers by token. `fleet_secret`: lets the
        client read routes and call containers directly."""
        self.router_address = router_address
        self.tenant = tenant
        # To the router: who we are. To containers: the fleet secret (and the tenant, as the router sends).
        self._router_headers: dict[str, str] = {}
        if tenant:
            self._router_headers[TENANT_HEADER] = tenant
        if token:
            self._router_headers["authorization"] = f"Bearer {token}"
        self._watch_metadata = tuple(self._router_headers.items()) + (
            ((FLEET_SECRET_HEADER, fleet_secret),) if fleet_secret else ()
        )
        self._container_headers = {TENANT_HEADER: tenant} if tenant else {}
        if fleet_secret:
            self._container_headers[FLEET_SECRET_HEADER] = fleet_secret
        self.stale_after_s = stale_after_s
        self.cache = RouteCache()
        self.direct_calls = 0
        self.router_calls = 0
        self._tls: dict[str, Any] = (
            {"ssl": True, "root_certificates": root_certificates, "private_key": private_key,
             "certificate_chain": certificate_chain}
            if root_certificates
            else {}
        )  # fmt: skip
        self._router = grpcclient.InferenceServerClient(router_address, **self._tls)
        self._containers: dict[str, grpcclient.InferenceServerClient] = {}
        self._tritons: dict[str, bool] = {}  # container address -> whether it is a Triton
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._down_since: float | None = time.monotonic()
        self._closed = threading.Event()
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._follow, name="modelyard-routes", daemon=True)
        self._thread.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_synced(self, timeout_s: float = 10.0) -> bool:
        """Waits for the first routing table; False if it did not come in time (calls then use the router)."""
        return self._synced.wait(timeout_s)

    @property
    def stale(self) -> bool:
        """True before the first table arrives, and once the watch has been down for `stale_after_s`."""
        down = self._down_since
        if not self._synced.is_set():
            return True
        return down is not None and time.monotonic() - down > self.stale_after_s

    def _follow(self) -> None:
        while not self._closed.is_set():
            try:
                with self._watch_channel() as channel:
                    self._channel = channel
                    stub = router_pb2_grpc.RouterStub(channel)
                    updates = stub.WatchRoutes(router_pb2.WatchRoutesRequest(), metadata=self._watch_metadata)
                    for update in updates:
                        with self._lock:
                            self.cache.apply(update)
                        self._down_since = None
                        self._synced.set()
            except grpc.RpcError:
                pass
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._closed.wait(0.5)

    def _watch_channel(self) -> grpc.Channel:
        if not self._tls:
            return grpc.insecure_channel(self.router_address)

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        credentials = grpc.ssl_channel_credentials(
            read(self._tls["root_certificates"]),
            read(self._tls["private_key"]),
            read(self._tls["certificate_chain"]),
        )
        return grpc.secure_channel(self.router_address, credentials)

    def _container(self, address: str) -> grpcclient.InferenceServerClient:
        client = self._containers.get(address)
        if client is None:
            # The router's channel options: pings while calls are in flight (a container that went silent
            # fails the call, UNAVAILABLE, sent on to the router, within seconds instead of at its deadline)
            # and reconnects within a second.
            client = self._containers[address] = grpcclient.InferenceServerClient(
                address, channel_args=list(container_channel_options()), **self._tls
            )
        return client

    def _is_triton(self, address: str) -> bool:
        """Whether the container at `address` is a Triton (asked once per address)."""
        known = self._tritons.get(address)
        if known is None:
            metadata = self._container(address).get_server_metadata(
                headers=self._container_headers, client_timeout=5
            )
            known = self._tritons[address] = metadata.name == TRITON_SERVER_NAME
        return known

    def infer(
        self,
        model_name: str,
        inputs: list[grpcclient.InferInput],
        model_version: str = "",
        outputs: list[grpcclient.InferRequestedOutput] | None = None,
        request_id: str = "",
        client_timeout: float | None = None,
        **kwargs: Any,
    ) -> grpcclient.InferResult:
        """Like tritonclient's `infer`, sent straight to a container holding the model when possible."""
        choice = None
        if not self.stale:
            with self._lock:
                choice = self.cache.pick(model_name, model_version, self.tenant, request_id)
        if choice is not None:
            version, address = choice
            try:
                triton = self._is_triton(address)
                result = self._container(address).infer(
                    _internal_name(model_name, version) if triton else model_name,
                    inputs,
                    model_version=version,
                    outputs=outputs,
                    request_id=request_id,
                    headers=self._container_headers or None,
                    client_timeout=client_timeout,
                    **kwargs,
                )
                if triton:
                    result.get_response().model_name = model_name
                self.direct_calls += 1
                return result
            except InferenceServerException as exc:
                if exc.status() != "StatusCode.UNAVAILABLE":
                    raise
                # The copy moved or its container went away: the router knows where it is now.
        self.router_calls += 1
        return self._router.infer(
            model_name,
            inputs,
            model_version=model_version,
            outputs=outputs,
            request_id=request_id,
            headers=self._router_headers or None,
            client_timeout=client_timeout,
            **kwargs,
        )

    def close(self) -> None:
        self._closed.set()
        if self._channel is not None:
            self._channel.close()
        self._thread.join(5)
        for client in [self._router, *self._containers.values()]:
            client.close()
