"""The routing core: from a call's header fields and metadata to a ready copy, and forwarding to it.

Servicers stay thin: they hand bytes and the call context here and get bytes back or an error of the
one family (modelyard/errors.py).
"""

from __future__ import annotations

import asyncio
import functools
import time

import grpc
import grpc.aio

from modelyard.containers.triton.adapter import triton_model_name
from modelyard.metric_names import QUEUE_DEPTH
from modelyard.placement.follow import StoreFollower
from modelyard.placement.model import PER_VERSION_NAME_BACKENDS, Container, ModelVersion
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store import Store
from modelyard.router.admission import Admission, Overloaded
from modelyard.router.container_queue import ContainerQueues
from modelyard.router.deadlines import DefaultDeadline
from modelyard.router.errors import BadRequest, DeadlineExceeded, NoReadyCopy, NotReady
from modelyard.router.follow import TableFollower
from modelyard.router.forward import ContainerChannels
from modelyard.router.identity import (
    FLEET_SECRET_HEADER,
    MAX_CACHED_TENANTS,
    TENANT_HEADER,
    Authenticator,
    Forwarded,
    Identity,
)
from modelyard.router.inputs import CHECKED_BACKENDS, check_inputs
from modelyard.router.lazy import LazyLoader
from modelyard.router.pipeline import PipelineRunner
from modelyard.router.presence import RouterPresence
from modelyard.router.public_names import public_response, public_rpc_error
from modelyard.router.rates import RateCounter
from modelyard.router.sagemaker_forward import SageMakerForwarder
from modelyard.router.sequences import lost_sequence, read_sequence, sticky_copy
from modelyard.router.stream import StreamPool
from modelyard.router.table import RoutingTable
from modelyard.router.wire import (
    WireError,
    name_version_fields,
    read_header,
    with_version,
)
from modelyard.telemetry import CURRENT_CALL, OTHER_LABEL, TRACE_HEADERS, CallInfo, Telemetry

DEFAULT_DEADLINE_S = 60.0  # for upstream calls whose caller set no deadline
_KSERVE = "/inference.GRPCInferenceService/"
_MODEL_INFER = _KSERVE + "ModelInfer"


@functools.lru_cache(maxsize=65536)
def _internal_name_fields(name: str, version: str) -> bytes:
    """Fields 1 and 2 of a request for one version under Triton's (and MLServer's) internal name."""
    return name_version_fields(triton_model_name(name, version), version)


class Router:
    def __init__(
        self,
        store: Store,
        telemetry: Telemetry | None = None,
        upstream_credentials: grpc.ChannelCredentials | None = None,
        *,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
        identity: Authenticator | None = None,
        fleet_secret: str | None = None,
        follower: StoreFollower | None = None,
        rate_period_s: float | None = None,
        admission: bool = True,
    ) -> None:
        """`follower`: a store follower shared with other components of this process (else its own);
        `rate_period_s`: seconds between reports of the call rates (None: the default)."""
        self.store = store
        # Without a configured identity the x-tenant-id header is trusted (tests, loopback `up`).
        self.identity = identity or Authenticator.trusting_header(fleet_secret)
        self.fleet_secret = fleet_secret  # sent to containers on every call (their restricted protocols)
        self.default_deadline_s = default_deadline_s
        self.default_deadline = DefaultDeadline(default_deadline_s)  # unary calls without a deadline
        self.telemetry = telemetry
        self.table = RoutingTable()
        self._owns_follower = follower is None
        self.follower: StoreFollower = follower or TableFollower(store, self.table)
        if follower is not None:
            follower.listen(self.table.on_change)
        self.channels = ContainerChannels(upstream_credentials)
        self.sagemaker = SageMakerForwarder()  # HTTP to SageMaker containers: one pooled client
        self.lazy = LazyLoader(store, self.table, telemetry, store_down=lambda: self.follower.degraded)
        # Calls per model, reported for copies that follow load.
        self.rates = RateCounter(store, period_s=rate_period_s)
        self.retries = 0  # unary calls sent to a second copy after UNAVAILABLE
        self.cache_hits = 0  # calls that found a ready copy (misses: self.lazy.misses), on /metrics
        self.streams = StreamPool(self.channels, fleet_secret, self)  # pooled upstream streams
        self.pipelines = PipelineRunner(self)
        self._metadata: dict[str | None, grpc.aio.Metadata] = {}  # upstream metadata by tenant
        # Tenant limits and fair sharing of saturated containers (router/admission.py, container_queue.py)
        admission_on = admission  # off (MODELYARD_ADMISSION=off): only to measure what admission costs
        metrics = telemetry is not None and telemetry.metrics
        refused = telemetry.refused if metrics and telemetry is not None else None
        self.admission = Admission(enabled=admission_on, refused_counter=refused)
        self.queues = ContainerQueues(self.channels.outstanding, enabled=admission_on)
        self.presence = RouterPresence(store, self.rates.router_id)
        self._limited: tuple[frozenset[str], bool] = (frozenset(), False)  # limited tenants, default
        self.follower.listen(self.admission.on_change)
        self.follower.listen(self.queues.on_change)
        self.follower.listen(self._limits_changed)
        if metrics and telemetry is not None:
            telemetry.gauge(
                QUEUE_DEPTH,
                lambda: [(n, {"container": cid}) for cid, n in self.queues.depth().items()],
                "Calls waiting for a container at its bound",
            )

    async def start(self) -> None:
        self.follower.start()  # idempotent: a shared follower may be running already
        self.identity.start()
        self.rates.start()
        self.presence.start()

    async def stop(self) -> None:
        await self.presence.stop()
        await self.rates.stop()
        await self.identity.stop()
        for listener in (self.admission.on_change, self.queues.on_change, self._limits_changed):
            self.follower.unlisten(listener)
        if self._owns_follower:
            await self.follower.stop()
        else:
            self.follower.unlisten(self.table.on_change)
        await self.default_deadline.close()
        await self.streams.close()  # before the channels they run on
        await self.channels.close()
        await self.sagemaker.close()

    @property
    def ready(self) -> bool:
        return self.table.loaded

    def upstream_timeout(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds an upstream call may take: the caller's deadline, or the router's default."""
        remaining = context.time_remaining()
        return self.default_deadline_s if remaining is None else remaining

    def route(self, request: bytes, context: grpc.aio.ServicerContext) -> tuple[ModelVersion, bytes]:
        """The model version a request goes to, and the bytes to send: on Triton under the version's
        internal name; elsewhere with the version pinned when it matters."""
        model, request, _ = self._route(request, context)
        return model, request

    def _route(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[ModelVersion, bytes, tuple[Identity, Forwarded]]:
        """`route`, and the caller (identity, metadata that travels on) read on the way."""
        if not self.table.loaded:
            raise NotReady("routing table not loaded yet")
        try:
            name, version, request_id = read_header(request)
        except WireError as exc:
            raise BadRequest(f"malformed request: {exc}") from exc
        if not name:
            raise BadRequest("model_name is required")
        caller = self.identity.caller(context)
        identity = caller[0]
        tenant = identity.tenant
        call = CURRENT_CALL.get()
        if call is not None:  # before resolving, so a refused call is still counted under its model
            call.model, call.version, call.tenant = name, version, tenant or ""
            call.model_label, call.tenant_label = OTHER_LABEL, OTHER_LABEL if tenant else ""
        model = self.table.resolve(name, version, tenant, request_id)
        if call is not None:
            call.version = model.version
            call.model_label = name  # registered, and visible to the caller
            call.tenant_label = self.tenant_label(identity, model)
        if model.backend in PER_VERSION_NAME_BACKENDS:
            request += _internal_name_fields(model.name, model.version)  # appended fields win: one copy
        # With several versions registered, the container must not pick its own default.
        elif not version and len(self.table.versions(name)) > 1:
            request = with_version(request, model.version)
        return model, request, caller

    async def forward_unary(
        self,
        method: str,
        request: bytes,
        context: grpc.aio.ServicerContext,
        *,
        lazy_load: bool = True,
        admit: bool = True,
    ) -> bytes:
        """Sends `request` to a ready copy; with `lazy_load`, a model with none is loaded first.

        A copy that answers UNAVAILABLE or NOT_FOUND never ran the request (connection refused or closed,
        model not loaded there), or its answer was lost with the connection (a keepalive ping went
        unanswered: the container fell silent; an inference run twice is harmless), so it is sent again:
        to another ready copy, or, when the failed one was the only one, to the copy that replaces it,
        waited for within the call's deadline as a cold call waits. Any other code is final: the request
        may have run.
        """
        model, request, caller = self._route(request, context)
        if method == _MODEL_INFER and model.backend in CHECKED_BACKENDS:
            check_inputs(model, request)  # a container that does not check them itself (MLServer)
        admission = self.admission
        tenant = caller[0].tenant
        # Before any upstream work; a pipeline's steps were admitted with the pipeline (`admit` False).
        ticket = admission.enter(tenant) if admit and admission.active else None
        try:
            key = model.key
            self.rates.count(key)
            copies = self.table.ready_copies(key)
            # A call of a Triton sequence goes where its sequence is (router/sequences.py); read only when
            # there is a choice to make, and on failures.
            sequence = read_sequence(request) if len(copies) > 1 and method == _MODEL_INFER else None
            container = sticky_copy(sequence.id, copies) if sequence else self.channels.pick(copies)
            if container is None:
                container = await self._load_copy(model, context, lazy_load)
            else:
                self.cache_hits += 1
            remaining = context.time_remaining()  # None: held to the router's default (deadlines.py)
            timeout = self.default_deadline_s if remaining is None else remaining
            deadline = time.monotonic() + timeout
            metadata = self.upstream_metadata(*caller)
            call = CURRENT_CALL.get()
            outstanding = self.channels.outstanding
            queues = self.queues
            bounds, waiting = queues.bounds, queues.waiting
            refused: set[str] = set()  # containers that answered this call UNAVAILABLE
            while True:
                copy = container.id
                if call is not None:
                    call.container = copy
                inflight = outstanding.get(copy, 0)
                if inflight < bounds.get(copy, inflight + 1):
                    outstanding[copy] = inflight + 1
                else:  # the container is at its bound: a slot in turn with other tenants, or refused
                    await self._wait_turn(copy, caller[0].tenant, deadline, call)
                    timeout = deadline - time.monotonic()
                try:
                    if container.backend == "sagemaker":  # HTTP, not gRPC
                        response = await self.sagemaker.unary(model, container, method, request, timeout)
                    elif remaining is None:
                        unary = self.channels.unary(container.address, method)
                        response = await self.default_deadline.call(unary, request, metadata, deadline, model)
                    else:
                        response = await self.channels.unary(container.address, method)(
                            request, timeout=timeout, metadata=metadata
                        )
                    return public_response(model, method, response)
                except grpc.aio.AioRpcError as exc:
                    if method == _MODEL_INFER:
                        sequence = sequence or read_sequence(request)
                        if sequence is not None:  # never resent elsewhere once its state may be gone
                            lost = lost_sequence(sequence, model, copy, exc.code(), exc.details() or "")
                            if lost is not None:
                                raise lost from exc
                    # NOT_FOUND from a copy the table lists as ready: the container lost or dropped the model
                    # (restarted at its address, or unloaded it for a move) before the store said so. The
                    # request did not run there either, so it is resent like an UNAVAILABLE one.
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                        raise public_rpc_error(model, exc) from None
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self.channels.suspect.add(container.address)
                    refused.add(copy)
                    others = [c for c in self.table.ready_copies(key) if c.id not in refused]
                    retry_on = sticky_copy(sequence.id, others) if sequence else self.channels.pick(others)
                    if retry_on is None:
                        if not lazy_load:
                            raise public_rpc_error(model, exc) from None
                        retry_on = await self.wait_for_replacement(model, container, refused, deadline)
                    container = retry_on
                    timeout = deadline - time.monotonic()
                    self.retries += 1
                    if call is not None:
                        call.retries += 1
                finally:
                    outstanding[copy] -= 1
                    if copy in waiting:
                        queues.release(copy)
        finally:
            if ticket is not None:
                admission.leave(ticket)

    async def _wait_turn(self, copy: str, tenant: str | None, deadline: float, call: CallInfo | None) -> None:
        """A slot on container `copy` at its bound, in turn with other tenants' calls; raises Overloaded."""
        admission = self.admission
        try:
            waited_s = await self.queues.wait_turn(
                copy, tenant, admission.weight(tenant), deadline - time.monotonic()
            )
        except Overloaded as exc:
            admission.count_refusal(tenant, exc.limit)
            raise
        if self.telemetry is not None and self.telemetry.metrics:
            label = call.tenant_label if call is not None else admission.label(tenant)
            self.telemetry.queue_wait.record(waited_s, {"tenant": label})

    def _limits_changed(self, fleet: Fleet, changes: Changes) -> None:
        """Zero-hop clients of a limited tenant get no container addresses (their calls come through the
        router and its limits): when the limited tenants change, every route watcher is sent its routes
        again."""
        if not (changes.everything or changes.tenants):
            return
        admission = self.admission
        default = admission.fleet_default
        limited = (
            frozenset(t for t in fleet.tenants if admission.is_limited(t)),
            admission.active and default is not None and default.limited,
        )
        if limited != self._limited:
            self._limited = limited
            self.table.notify_routes()

    def routes_for(self, identity: Identity) -> Identity:
        """The identity route answers are made for: a limited tenant reads no container addresses."""
        if identity.routes and self.admission.is_limited(identity.tenant):
            return Identity(identity.tenant, False, identity.via)
        return identity

    async def choose_copy(
        self,
        model: ModelVersion,
        context: grpc.aio.ServicerContext,
        *,
        lazy_load: bool = True,
        request: bytes | None = None,
    ) -> Container:
        """The ready copy a call goes to (the one choice, for unary calls and streams alike): of the
        model's ready copies, the less busy of two, or the sequence's own copy for a `request` of a Triton
        sequence; with `lazy_load`, a model with none is loaded first, within the call's deadline.
        (`forward_unary` makes the same choice inline.)"""
        self.rates.count(model.key)
        copies = self.table.ready_copies(model.key)
        sequence = read_sequence(request) if request is not None and len(copies) > 1 else None
        container = sticky_copy(sequence.id, copies) if sequence else self.channels.pick(copies)
        if container is None:
            container = await self._load_copy(model, context, lazy_load)
        else:
            self.cache_hits += 1
        call = CURRENT_CALL.get()
        if call is not None:
            call.container = container.id
        return container

    async def _load_copy(
        self, model: ModelVersion, context: grpc.aio.ServicerContext, lazy_load: bool
    ) -> Container:
        """A copy for a model with none ready: loaded on demand within the call's deadline (`lazy_load`)."""
        container = None
        if lazy_load:
            container = self.channels.pick(await self.lazy.ready_copies(model, context.time_remaining()))
        if container is None:
            raise NoReadyCopy(f"model '{model.name}' version '{model.version}' has no ready copy")
        return container

    async def wait_for_replacement(
        self, model: ModelVersion, failed: Container, refused: set[str], deadline: float
    ) -> Container:
        """A ready copy to resend a call to after `failed` refused it and no other listed copy is left.

        Containers in `refused` stay excluded while listed (their agents have not noticed yet); one that
        leaves the table and is listed again came back. While only refused copies are listed, waits for
        the table to change or, when the call never reached `failed`, for its channel to connect again (a
        restarted container); with none listed, waits as a cold call does (the controller re-places the
        copy). Every wait is on an event, bounded by the call's deadline.
        """
        key = model.key
        # A SageMaker container speaks HTTP: no gRPC channel can say it is back, only the table can.
        channel = self.channels.channel(failed.address) if failed.backend != "sagemaker" else None
        # READY: the container itself answered UNAVAILABLE; only a change in the table can help then.
        unreachable = channel is not None and channel.get_state() != grpc.ChannelConnectivity.READY
        while True:
            copies = self.table.ready_copies(key)
            refused &= {c.id for c in copies}
            chosen = self.channels.pick([c for c in copies if c.id not in refused])
            if chosen is not None:
                return chosen
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"model '{model.name}' version '{model.version}': its copy on {failed.id} is unavailable "
                    "and no other copy was ready within the call's deadline"
                )
            if not copies:
                await self.lazy.ready_copies(model, left)  # raises NoReadyCopy etc. with the reason
                continue
            waits = [asyncio.ensure_future(self.table.wait_changed(key, left))]
            if channel is not None and unreachable and failed.id in refused:
                waits.append(asyncio.ensure_future(channel.channel_ready()))
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if len(waits) == 2 and waits[1] in done:
                refused.discard(failed.id)  # connected again: worth one more try
                unreachable = False

    def identify(self, context: grpc.aio.ServicerContext) -> Identity:
        """The caller's authenticated identity (router/identity.py); raises Unauthenticated or
        PermissionDenied."""
        return self.identity.identify(context)

    def tenant_label(self, identity: Identity, model: ModelVersion) -> str:
        """The tenant as a metric label: only tenants the router knows (from a token or certificate, or
        named by the model's visibility or route rule); any other is counted as `other`."""
        tenant = identity.tenant
        if not tenant:
            return ""
        if identity.via != "header" or tenant in model.tenants:
            return tenant
        rule = self.table.fleet.routes.get(model.name)
        if rule is not None and any(t == tenant for t, _ in rule.tenant_versions):
            return tenant
        return OTHER_LABEL

    def upstream_metadata(self, identity: Identity, forwarded: Forwarded) -> grpc.aio.Metadata:
        """What a container gets with a call: the caller's metadata that travels on, the authenticated
        tenant and the fleet secret; with tracing, the trace context becomes this span's. Without either of
        the first and the last (the usual call), made once per tenant, not per call."""
        tracing = self.telemetry is not None and self.telemetry.tracing
        if not forwarded and not tracing:
            metadata = self._metadata.get(identity.tenant)
            if metadata is None:
                if len(self._metadata) >= MAX_CACHED_TENANTS:
                    self._metadata.clear()  # anyone can name any tenant in the header: stay bounded
                metadata = self._metadata[identity.tenant] = grpc.aio.Metadata(*self._own_headers(identity))
            return metadata
        pairs = (*forwarded, *self._own_headers(identity))
        if tracing and self.telemetry is not None:
            pairs = (*((k, v) for k, v in pairs if k not in TRACE_HEADERS), *self.telemetry.inject())
        return grpc.aio.Metadata(*pairs)

    def _own_headers(self, identity: Identity) -> tuple[tuple[str, str], ...]:
        headers: tuple[tuple[str, str], ...] = ()
        if identity.tenant:
            headers += ((TENANT_HEADER, identity.tenant),)
        if self.fleet_secret:
            headers += ((FLEET_SECRET_HEADER, self.fleet_secret),)
        return headers
