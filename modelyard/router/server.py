"""Building and running the router's grpc.aio server."""

from __future__ import annotations

import ssl

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelyard.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, message_size_options
from modelyard.placement.follow import StoreFollower
from modelyard.placement.store import Store
from modelyard.router.health import RouterHealth
from modelyard.router.identity import Authenticator
from modelyard.router.kserve import SERVICE as KSERVE_SERVICE
from modelyard.router.kserve import kserve_handler
from modelyard.router.metrics import register_fleet_gauges
from modelyard.router.rest import RestFront
from modelyard.router.routing import DEFAULT_DEADLINE_S, Router
from modelyard.router.v1_service import SERVICE as ROUTER_SERVICE
from modelyard.router.v1_service import api_handler
from modelyard.telemetry import Telemetry


class RouterStartError(RuntimeError):
    pass


class RouterServer:
    """The router and its gRPC server on one address."""

    def __init__(
        self,
        store: Store,
        host: str = "127.0.0.1",
        port: int = 8001,
        telemetry: Telemetry | None = None,
        *,
        server_credentials: grpc.ServerCredentials | None = None,
        upstream_credentials: grpc.ChannelCredentials | None = None,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
        identity: Authenticator | None = None,
        fleet_secret: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        follower: StoreFollower | None = None,
        rate_period_s: float | None = None,
        admission: bool = True,
        http_port: int | None = None,
        http_ssl: ssl.SSLContext | None = None,
    ) -> None:
        """`identity`: how callers are identified (None: the x-tenant-id header is trusted as sent);
        `fleet_secret`: sent to containers on every call, and makes a caller presenting it a route reader;
        `http_port`: also serve KServe v2 REST there (router/rest.py; 0: any free port), over `http_ssl`."""
        self.telemetry = telemetry
        self.server_credentials = server_credentials
        self.max_message_bytes = max_message_bytes
        self.router = Router(
            store,
            telemetry,
            upstream_credentials,
            default_deadline_s=default_deadline_s,
            identity=identity,
            fleet_secret=fleet_secret,
            follower=follower,
            rate_period_s=rate_period_s,
            admission=admission,
        )
        self.health = RouterHealth(self.router.follower, (KSERVE_SERVICE, ROUTER_SERVICE))
        self.host = host
        self.port = port
        self.server: grpc.aio.Server | None = None
        self.rest: RestFront | None = None
        if http_port is not None:
            self.rest = RestFront(
                self.router, host, http_port, ssl_context=http_ssl, max_body_bytes=max_message_bytes
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(options=message_size_options(self.max_message_bytes))
        server.add_generic_rpc_handlers((kserve_handler(self.router), api_handler(self.router)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (KSERVE_SERVICE, ROUTER_SERVICE, health_name, reflection.SERVICE_NAME), server
        )
        try:
            if self.server_credentials is not None:
                bound = server.add_secure_port(self.address, self.server_credentials)
            else:
                bound = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RouterStartError(f"cannot listen on {self.address}: {exc}") from exc
        if not bound:
            raise RouterStartError(f"cannot listen on {self.address} (port in use?)")
        self.port = bound
        await self.router.start()
        await self.health.start()
        if self.telemetry is not None and self.telemetry.metrics:
            register_fleet_gauges(self.telemetry, self.router)
            # /readyz: ready once the routing table is loaded (as grpc.health.v1 says on the gRPC port).
            self.telemetry.serve_metrics(ready=self.router.follower.first_load.is_set)
        await server.start()
        self.server = server
        if self.rest is not None:
            try:
                await self.rest.start()
            except OSError as exc:
                await self.stop(0)
                raise RouterStartError(str(exc)) from exc

    @property
    def rest_address(self) -> str | None:
        return self.rest.address if self.rest is not None else None

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.stop()
        if self.rest is not None:
            await self.rest.stop()
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
        await self.router.stop()
