"""The `modelyard` command.

Start-up cost counts (`modelyard placement plan` on 10k models takes a few tenths of a second), so this
module imports only click: each command imports what it runs, and the `placement`, `models` and
`routes` groups are imported when invoked.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from modelyard import settings
from modelyard.console import fail


class LazyGroup(click.Group):
    """A group whose subgroups (`name: "module:attribute"`) are imported only when used."""

    def __init__(self, *args: Any, lazy_groups: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_groups = lazy_groups

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_groups])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_groups.get(cmd_name)
        if target is None:
            command = super().get_command(ctx, cmd_name)
        else:
            module, _, attribute = target.partition(":")
            command = getattr(importlib.import_module(module), attribute)
            from modelyard.commands.verbs import one_verb_family

            one_verb_family(cmd_name, command)
        if command is not None:
            _log_options_everywhere(command)
        return command


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_log_level_type = click.Choice(LOG_LEVELS, case_sensitive=False)


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        import logging

        logging.getLogger().setLevel(value.upper())


def _set_log_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        import logging

        from modelyard.logs import setup_logging

        setup_logging(logging.getLevelName(logging.getLogger().level), True)


def _log_options_everywhere(command: click.Command) -> None:
    """--log-level and --log-json after a command's name as well as before it (`modelyard models list
    --log-level DEBUG`), on every command and group, as the README says."""
    if getattr(command, "_modelyard_log_options", False):
        return
    command._modelyard_log_options = True  # type: ignore[attr-defined]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _log_options_everywhere(sub)
    taken = {opt for p in command.params for opt in getattr(p, "opts", ())}
    if "--log-level" not in taken:
        command.params.append(
            click.Option(
                ["--log-level"],
                type=_log_level_type,
                expose_value=False,
                callback=_set_log_level,
                help="Python log level (also accepted before the command).",
            )
        )
    if "--log-json" not in taken:
        command.params.append(
            click.Option(
                ["--log-json"],
                is_flag=True,
                expose_value=False,
                callback=_set_log_json,
                help="One JSON object per log line (also accepted before the command).",
            )
        )


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs the router's `main` on uvloop where it is installed (measured: about a tenth less CPU per
    call than asyncio's own loop), else, or with MODELYARD_EVENT_LOOP=asyncio, on asyncio's loop."""
    import asyncio

    if settings.get("MODELYARD_EVENT_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


@click.group(
    cls=LazyGroup,
    lazy_groups={
        "placement": "modelyard.commands.placement:placement",
        "models": "modelyard.commands.models:models",
        "pipelines": "modelyard.commands.pipelines:pipelines",
        "routes": "modelyard.commands.router:routes",
        "tenants": "modelyard.commands.tenants:tenants",
        "apply": "modelyard.commands.apply:apply_command",
        "export": "modelyard.commands.apply:export_command",
        "infer": "modelyard.commands.infer:infer",
        "logs": "modelyard.commands.logs:logs",
    },
)
@click.version_option(package_name="modelyard", prog_name="modelyard", message="%(prog)s %(version)s")
@click.option(
    "--log-level",
    envvar="MODELYARD_LOG_LEVEL",
    type=_log_level_type,
    default="WARNING",
    show_default=True,
    help="Python log level.",
)
@click.option(
    "--log-json",
    envvar="MODELYARD_LOG_JSON",
    is_flag=True,
    help="One JSON object per log line, with trace and span ids.",
)
def main(log_level: str, log_json: bool) -> None:
    """modelyard: serve thousands of ML models from a fleet of shared inference containers."""
    from modelyard.logs import setup_logging

    setup_logging(log_level, log_json)


F = TypeVar("F", bound=Callable[..., Any])


def _tls_server_options(command: F) -> F:
    """--tls-cert, --tls-key and --tls-client-ca (server TLS, optionally mutual)."""
    for option in reversed(
        (
            click.option(
                "--tls-cert",
                envvar="MODELYARD_TLS_CERT",
                default=None,
                help="Serve TLS with this PEM certificate.",
            ),
            click.option(
                "--tls-key", envvar="MODELYARD_TLS_KEY", default=None, help="The certificate's PEM key."
            ),
            click.option(
                "--tls-client-ca",
                envvar="MODELYARD_TLS_CLIENT_CA",
                default=None,
                help="Require client certificates signed by this CA (mutual TLS).",
            ),
        )
    ):
        command = option(command)
    return command


_artifact_cache_option = click.option(
    "--artifact-cache",
    envvar="MODELYARD_ARTIFACT_CACHE",
    type=click.Path(path_type=Path),
    default=Path(".modelyard/artifact-cache"),
    show_default=True,
    help="Folder of verified local copies of S3 artifacts (shared by a container and its agent).",
)


def _fleet_secret_option(command: F) -> F:
    return click.option(
        "--fleet-secret-file",
        envvar="MODELYARD_FLEET_SECRET_FILE",
        default=None,
        help="File holding the fleet secret: containers accept only calls that carry it.",
    )(command)


def _drain_option(command: F) -> F:
    """--drain-s, declared once for the router and our container."""
    return click.option(
        "--drain-s",
        type=click.FloatRange(min=0),
        default=10.0,
        show_default=True,
        help="On SIGTERM: seconds calls and streams in flight get to finish (new ones refused) before exit.",
    )(command)


def _autoscale_options(command: F) -> F:
    """--copy-target-rps and --scale-down-after-s, declared once for the controller and `up`."""
    command = click.option(
        "--scale-down-after-s",
        type=click.FloatRange(min=0),
        default=300.0,
        show_default=True,
        help="Extra copies go after the rate stayed below half the target this long.",
    )(command)
    return click.option(
        "--copy-target-rps",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="Calls/s per copy above which a model gets another copy, up to its max replicas (0: off).",
    )(command)


def _max_message_option(command: F) -> F:
    return click.option(
        "--max-message-bytes",
        envvar="MODELYARD_MAX_MESSAGE_BYTES",
        type=click.IntRange(1024, 2**31 - 1),
        default=64 * 1024**2,
        show_default=True,
        help="Largest request or response; a larger one gets RESOURCE_EXHAUSTED.",
    )(command)


def _max_inflight_option(command: F) -> F:
    return click.option(
        "--max-inflight",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Calls a container runs at once, across routers (0: its backend's default: Triton and ours "
        "16, MLServer 8, SageMaker 4); above it, routers queue calls per tenant and serve them in turn.",
    )(command)


def _metrics_port_option(command: F) -> F:
    return click.option(
        "--metrics-port",
        type=int,
        default=None,
        help="Serve /metrics here (default: $MODELYARD_METRICS_PORT).",
    )(command)


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path(".modelyard"),
    show_default=True,
    help="Where the store, artifacts and container repositories live.",
)
@click.option(
    "--store",
    "store_url",
    default=None,
    help="Store URL (etcd://host:port) or directory; default: WORKDIR/store.",
)
@click.option(
    "--containers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Number of Triton containers.",
)
@click.option(
    "--custom-containers",
    default=1,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Number of our own containers (many small numpy models each).",
)
@click.option(
    "--sagemaker-containers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Number of SageMaker multi-model containers (AWS's multi-model-server; needs Java); with one or "
    "more, the example `sagemaker_scale`.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Router listen address.")
@click.option("--port", default=8001, show_default=True, type=int, help="Router port (0: any free port).")
@click.option(
    "--http-port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Router KServe v2 REST port (0: any free port).",
)
@click.option(
    "--model-store",
    envvar="MODELYARD_MODEL_STORE",
    default=None,
    help="Artifact directory or s3://BUCKET/PREFIX (AWS_ENDPOINT_URL, credentials and region from the "
    "environment); default: WORKDIR/artifacts.",
)
@click.option(
    "--mlserver-containers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Number of MLServer containers (scikit-learn models; with one or more, the example `iris`).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="One /metrics (and /healthz, /readyz) for the router, the controller and the agents; 0: a free "
    "port, printed at start.",
)
@_autoscale_options
@_max_inflight_option
def up(
    workdir: Path,
    store_url: str | None,
    containers: int,
    custom_containers: int,
    sagemaker_containers: int,
    host: str,
    port: int,
    http_port: int,
    model_store: str | None,
    mlserver_containers: int,
    metrics_port: int,
    copy_target_rps: float,
    scale_down_after_s: float,
    max_inflight: int,
) -> None:
    """Start a local fleet: Triton and custom containers, example models, agents, controller and router."""
    import asyncio

    from modelyard.catalog.modelstore import ArchiveError
    from modelyard.catalog.stores import open_model_store
    from modelyard.containers.custom.process import ContainerStartError
    from modelyard.containers.mlserver.process import MLServerStartError
    from modelyard.containers.sagemaker.process import SageMakerNotInstalled, SageMakerStartError
    from modelyard.containers.triton.server import TritonNotInstalled, TritonStartError
    from modelyard.local import LocalFleet, run_up
    from modelyard.placement.store import StoreError
    from modelyard.router.server import RouterStartError
    from modelyard.telemetry import MetricsPortError

    if not is_loopback(host):
        fail(
            f"modelyard up trusts x-tenant-id as sent, so it serves on loopback only (not {host}); "
            "use modelyard serve with --tenant-tokens or --tenant-certs"
        )
    from modelyard.commands.logs import UP_LOG
    from modelyard.logs import also_log_to

    try:
        also_log_to(workdir / UP_LOG)  # the router, agents and controller run here: `modelyard logs` reads it
    except OSError as exc:
        fail(f"cannot write {workdir / UP_LOG}: {exc.strerror or exc}")
    fleet = LocalFleet(
        workdir=workdir,
        store_url=store_url or str(workdir / "store"),
        containers=containers,
        custom_containers=custom_containers,
        sagemaker_containers=sagemaker_containers,
        host=host,
        port=port,
        http_port=http_port,
        artifact_store=model_store,
        mlserver_containers=mlserver_containers,
        copy_target_rps=copy_target_rps,
        scale_down_after_s=scale_down_after_s,
        max_inflight=max_inflight,
        metrics_port=metrics_port,
        router_process=True,  # the data path in its own process, as deployed (modelyard/router/process.py)
    )
    if model_store and not model_store.startswith("s3://"):
        fleet.model_store = Path(model_store)  # our containers load uploads from there too
    startup_errors = (
        TritonNotInstalled,
        TritonStartError,
        ContainerStartError,
        RouterStartError,
        MLServerStartError,
        SageMakerNotInstalled,
        SageMakerStartError,
    )
    from modelyard.memory import freeze_long_lived_objects

    freeze_long_lived_objects()  # the fleet view, out of the garbage collector's walks (memory.py)
    try:
        if model_store:
            # A missing bucket or credentials: one line, now.
            open_model_store(model_store, cache_dir=settings.artifact_cache_dir()).check()
        if not asyncio.run(run_up(fleet)):
            sys.exit(1)
    except (*startup_errors, StoreError, TimeoutError, ArchiveError, MetricsPortError) as exc:
        fail(str(exc))


@main.command()
@click.option("--store", "store_url", default=None, help="Store URL (etcd://host:port) or directory.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=int)
@click.option(
    "--http-port",
    envvar="MODELYARD_HTTP_PORT",
    default=None,
    type=click.IntRange(0, 65535),
    help="Also serve KServe v2 REST on this port (same identity, TLS and routing; 0: any free port).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Router processes sharing the port (SO_REUSEPORT).",
)
@_metrics_port_option
@click.option(
    "--traces",
    type=click.Choice(["none", "console", "otlp"]),
    default=None,
    help="Trace exporter (default: $MODELYARD_TRACES or none; otlp reads OTEL_EXPORTER_OTLP_*).",
)
@_tls_server_options
@click.option(
    "--upstream-ca",
    envvar="MODELYARD_UPSTREAM_CA",
    default=None,
    help="Call containers over TLS, trusting this CA.",
)
@click.option(
    "--upstream-cert",
    envvar="MODELYARD_UPSTREAM_CERT",
    default=None,
    help="Client certificate for containers that require one.",
)
@click.option("--upstream-key", envvar="MODELYARD_UPSTREAM_KEY", default=None, help="Its PEM key.")
@click.option(
    "--default-deadline-s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Deadline of calls to containers when the caller set none (bidi sessions excepted).",
)
@click.option(
    "--tenant-tokens",
    envvar="MODELYARD_TENANT_TOKENS",
    default=None,
    help="Identify callers by bearer token: a file of 'sha256:<hex> TENANT [routes]' lines (reloaded).",
)
@click.option(
    "--tenant-certs",
    envvar="MODELYARD_TENANT_CERTS",
    default=None,
    help="Identify callers by client certificate: a file of 'SAN-or-CN=name TENANT [routes]' lines "
    "(needs --tls-client-ca).",
)
@click.option(
    "--insecure-trust-tenant-header",
    envvar="MODELYARD_INSECURE_TRUST_TENANT_HEADER",
    is_flag=True,
    help="Take x-tenant-id as sent: only behind a gateway that sets it (the default on loopback).",
)
@_drain_option
@_fleet_secret_option
@_max_message_option
def serve(
    store_url: str | None,
    host: str,
    port: int,
    http_port: int | None,
    workers: int,
    metrics_port: int | None,
    traces: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    upstream_ca: str | None,
    upstream_cert: str | None,
    upstream_key: str | None,
    default_deadline_s: float,
    tenant_tokens: str | None,
    tenant_certs: str | None,
    insecure_trust_tenant_header: bool,
    drain_s: float,
    fleet_secret_file: str | None,
    max_message_bytes: int,
) -> None:
    """Run the router against a store.

    Callers are identified by bearer token (--tenant-tokens) and/or client certificate (--tenant-certs);
    on a non-loopback address the router refuses to start without one, unless told to trust the
    x-tenant-id header as sent (--insecure-trust-tenant-header, behind a trusted gateway).
    """
    import asyncio
    import signal

    from modelyard.placement.store import StoreError
    from modelyard.router.identity import Authenticator, IdentityConfigError, IdentityFile
    from modelyard.router.server import RouterServer, RouterStartError
    from modelyard.router.workers import run_workers
    from modelyard.telemetry import MetricsPortError, Telemetry
    from modelyard.tls import TLSConfigError, channel_credentials

    url = settings.store_url(store_url)
    try:
        server_tls = _server_tls(tls_cert, tls_key, tls_client_ca)
        http_ssl = None
        if http_port is not None and tls_cert and tls_key:
            from modelyard.router.rest import server_ssl_context

            http_ssl = server_ssl_context(tls_cert, tls_key, tls_client_ca)
        upstream_tls = (
            channel_credentials(upstream_ca, upstream_cert, upstream_key)
            if upstream_ca or upstream_cert or upstream_key
            else None
        )
    except (TLSConfigError, OSError) as exc:  # OSError: ssl.SSLError from the REST port's context
        fail(str(exc))
    if tenant_certs and not tls_client_ca:
        fail("--tenant-certs needs --tls-client-ca: the router must verify client certificates")
    trust_header = insecure_trust_tenant_header
    if not (tenant_tokens or tenant_certs or trust_header):
        if not is_loopback(host):
            fail(
                f"refusing to serve on {host} without an identity mode: give --tenant-tokens and/or "
                "--tenant-certs, or --insecure-trust-tenant-header behind a gateway that sets x-tenant-id"
            )
        trust_header = True
    fleet_secret = read_fleet_secret(fleet_secret_file)
    try:
        identity = Authenticator(
            trust_tenant_header=trust_header,
            tokens=IdentityFile(tenant_tokens, "token file") if tenant_tokens else None,
            certificates=IdentityFile(tenant_certs, "certificate map") if tenant_certs else None,
            fleet_secret=fleet_secret,
        )
    except IdentityConfigError as exc:
        fail(str(exc))
    click.echo(f"router: tenants from {identity.mode}", err=True)
    if workers > 1:
        # The workers are `serve` processes: they read the same settings from the environment.
        for name, value in (
            ("MODELYARD_TENANT_TOKENS", tenant_tokens),
            ("MODELYARD_TENANT_CERTS", tenant_certs),
            ("MODELYARD_INSECURE_TRUST_TENANT_HEADER", "1" if insecure_trust_tenant_header else None),
            ("MODELYARD_FLEET_SECRET_FILE", fleet_secret_file),
            ("MODELYARD_MAX_MESSAGE_BYTES", str(max_message_bytes)),
            ("MODELYARD_HTTP_PORT", None if http_port is None else str(http_port)),
        ):
            if value:
                os.environ[name] = value
        if port == 0:
            fail("--workers needs a fixed --port: the workers share it")
        if http_port == 0:
            fail("--workers needs a fixed --http-port: the workers share it")
        click.echo(f"router: {workers} workers on {host}:{port}")
        sys.exit(
            run_workers(
                url, host, port, workers, metrics_port, default_deadline_s=default_deadline_s, drain_s=drain_s
            )
        )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        store = settings.open_configured_store(url)
        server = RouterServer(
            store,
            host,
            port,
            Telemetry(
                "modelyard-router",
                traces=settings.traces(traces),
                metrics_port=settings.metrics_port(metrics_port),
                metrics_host=settings.metrics_host(),
            ),
            server_credentials=server_tls,
            upstream_credentials=upstream_tls,
            default_deadline_s=default_deadline_s,
            identity=identity,
            fleet_secret=fleet_secret,
            max_message_bytes=max_message_bytes,
            rate_period_s=settings.rate_period_s(),
            admission=settings.admission(),
            http_port=http_port,
            http_ssl=http_ssl,
        )
        try:
            await server.start()
            loop_name = type(asyncio.get_running_loop()).__module__.partition(".")[0]
            click.echo(f"router listening on {server.address} (pid {os.getpid()}, event loop: {loop_name})")
            if server.rest_address is not None:
                click.echo(f"router REST on {server.rest_address}")
            await stop.wait()
        finally:
            await server.stop(grace_s=drain_s)  # calls in flight finish; new ones are refused
            await store.close()

    # The router moves every tensor twice (in and out): its large buffers are reused (modelyard/memory.py),
    # keeping up to a few messages' worth of freed memory.
    from modelyard.memory import freeze_long_lived_objects, reuse_large_buffers

    reuse_large_buffers(max_message_bytes)
    freeze_long_lived_objects()  # the fleet view, out of the garbage collector's walks (memory.py)
    try:
        run_event_loop(run())
    except (RouterStartError, StoreError, MetricsPortError) as exc:
        fail(str(exc))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8101, show_default=True, type=int, help="0: any free port.")
@click.option(
    "--memory-bytes", type=click.IntRange(1), required=True, help="Memory budget for loaded models."
)
@click.option(
    "--traces",
    type=click.Choice(["none", "console", "otlp"]),
    default=None,
    help="Trace exporter (default: $MODELYARD_TRACES or none).",
)
@_tls_server_options
@_metrics_port_option
@_drain_option
@_fleet_secret_option
@_max_message_option
@click.option(
    "--model-store",
    envvar="MODELYARD_MODEL_STORE",
    default=".modelyard/artifacts",
    show_default=True,
    help="Load models only from inside this directory (the model store's file:// root); with "
    "s3://BUCKET/PREFIX, only from the agent's --artifact-cache.",
)
@_artifact_cache_option
def container(
    host: str,
    port: int,
    memory_bytes: int,
    traces: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    metrics_port: int | None,
    drain_s: float,
    fleet_secret_file: str | None,
    max_message_bytes: int,
    model_store: str,
    artifact_cache: Path,
) -> None:
    """Run our own KServe v2 container: many small numpy models in one process."""

    from modelyard.numpy_container.container import run_container
    from modelyard.telemetry import Telemetry
    from modelyard.tls import TLSConfigError

    telemetry = Telemetry(
        "modelyard-container",
        traces=settings.traces(traces),
        metrics_port=settings.metrics_port(metrics_port),
        metrics_host=settings.metrics_host(),
    )
    # S3 artifacts reach it as the agent's verified copies in the shared cache folder.
    load_from = artifact_cache if model_store.startswith("s3://") else Path(model_store)
    try:
        credentials = _server_tls(tls_cert, tls_key, tls_client_ca)
    except TLSConfigError as exc:
        fail(str(exc))
    try:
        # On uvloop, as the router (run_event_loop): each load and call costs the container less CPU.
        run_event_loop(
            run_container(
                host,
                port,
                memory_bytes,
                telemetry,
                credentials,
                fleet_secret=read_fleet_secret(fleet_secret_file),
                model_store=load_from.resolve(),
                max_message_bytes=max_message_bytes,
                drain_s=drain_s,
            )
        )
    except OSError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--store", "store_url", default=None, help="Store URL (etcd://host:port) or directory.")
@click.option("--id", "container_id", required=True, help="This container's id in the shard map.")
@click.option(
    "--backend",
    type=click.Choice(["triton", "custom", "mlserver", "sagemaker"]),
    default="triton",
    show_default=True,
)
@click.option("--address", "--triton", "address", required=True, help="The container's gRPC address.")
@click.option(
    "--repository",
    type=click.Path(path_type=Path),
    default=None,
    help="Triton and MLServer: the instance's model repository directory; SageMaker: its model store "
    "(MMS --model-store). Shared with the container.",
)
@click.option("--memory-bytes", type=click.IntRange(1), required=True, help="The container's memory budget.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option(
    "--advertise", default=None, help="Address routers use for this container (default: --address)."
)
@_metrics_port_option
@_fleet_secret_option
@click.option(
    "--model-store",
    envvar="MODELYARD_MODEL_STORE",
    default=None,
    help="With s3://BUCKET/PREFIX: fetch artifacts from there only (AWS configuration from the "
    "environment) into --artifact-cache.",
)
@_artifact_cache_option
@click.option(
    "--artifact-cache-bytes",
    type=click.IntRange(1),
    default=10 * 1024**3,
    show_default=True,
    help="Bound of the artifact cache; least recently used artifacts leave first.",
)
@_max_inflight_option
def agent(
    store_url: str | None,
    container_id: str,
    backend: str,
    address: str,
    repository: Path | None,
    memory_bytes: int,
    kind: str,
    advertise: str | None,
    metrics_port: int | None,
    fleet_secret_file: str | None,
    model_store: str | None,
    artifact_cache: Path,
    artifact_cache_bytes: int,
    max_inflight: int,
) -> None:
    """Run the agent of one container: load and unload models to match the shard map."""
    import asyncio

    from modelyard.catalog.s3store import ArtifactCache, is_s3_uri
    from modelyard.containers.adapter import ContainerAdapter
    from modelyard.containers.agent import Agent, register_agent_gauges
    from modelyard.containers.custom.adapter import CustomAdapter
    from modelyard.containers.fetching import FetchingAdapter
    from modelyard.containers.mlserver.adapter import MLServerAdapter, find_mlserver_pid
    from modelyard.containers.sagemaker.adapter import SageMakerAdapter
    from modelyard.containers.triton.adapter import TritonAdapter
    from modelyard.placement.model import Container
    from modelyard.placement.store import StoreError
    from modelyard.telemetry import MetricsPortError, Telemetry

    if backend in ("triton", "mlserver", "sagemaker") and repository is None:
        fail(f"--repository is required for a {backend} container (its model repository folder)")
    cache_dir = artifact_cache.resolve()
    secret = read_fleet_secret(fleet_secret_file)

    async def run() -> None:
        store = settings.open_configured_store(store_url)
        container = Container(
            id=container_id,
            address=advertise or address,
            kind="gpu" if kind == "gpu" else "cpu",
            memory_bytes=memory_bytes,
            backend=backend,  # type: ignore[arg-type]  # one of the choices
            max_inflight=max_inflight,
        )
        adapter: ContainerAdapter = (
            CustomAdapter(address, fleet_secret=secret)
            if backend == "custom"
            else TritonAdapter(address, repository or Path(), fleet_secret=secret)
        )
        if backend == "mlserver":  # MLServer's model-settings go into its repository folder (shared with it)
            # Its footprints are MLServer's resident growth when the pod shares its process namespace.
            adapter = MLServerAdapter(address, repository or Path(), pid=find_mlserver_pid)
        if backend == "sagemaker":  # HTTP; models are linked into its model store folder (shared with it)
            adapter = SageMakerAdapter(address, repository or Path())
        # Artifacts in S3 are fetched into a bounded, verified local cache before the container loads them.
        cache = ArtifactCache(
            cache_dir,
            max_bytes=artifact_cache_bytes,
            model_store=model_store if model_store and is_s3_uri(model_store) else None,
        )
        adapter = FetchingAdapter(adapter, cache)
        try:
            telemetry = Telemetry(
                f"modelyard-agent-{container_id}",
                metrics_port=settings.metrics_port(metrics_port),
                metrics_host=settings.metrics_host(),
            )
            the_agent = Agent(store, container, adapter, telemetry=telemetry)
            register_agent_gauges(telemetry, [the_agent])
            # /readyz: ready once its container is registered in the store (it answers and has a lease).
            telemetry.serve_metrics(ready=lambda: the_agent.registered)
            await the_agent.run()
        finally:
            await adapter.close()
            await store.close()

    from modelyard.memory import freeze_long_lived_objects

    freeze_long_lived_objects()  # the fleet view, out of the garbage collector's walks (memory.py)
    try:
        asyncio.run(run())
    except (StoreError, MetricsPortError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--store", "store_url", default=None, help="Store URL (etcd://host:port) or directory.")
@click.option(
    "--ready-timeout",
    "ready_timeout_s",
    default=120.0,
    show_default=True,
    type=float,
    help="Seconds a rebalance waits for new copies before keeping the old ones.",
)
@_autoscale_options
@_metrics_port_option
def controller(
    store_url: str | None,
    ready_timeout_s: float,
    copy_target_rps: float,
    scale_down_after_s: float,
    metrics_port: int | None,
) -> None:
    """Run the placement controller: place new models, re-place lost copies, fill new containers."""
    import asyncio

    from modelyard.placement.controller import PlacementController
    from modelyard.placement.metrics import register_controller_gauges
    from modelyard.placement.store import StoreError
    from modelyard.telemetry import MetricsPortError, Telemetry

    async def run() -> None:
        telemetry = Telemetry(
            "modelyard-controller",
            metrics_port=settings.metrics_port(metrics_port),
            metrics_host=settings.metrics_host(),
        )
        async with settings.open_configured_store(store_url) as store:
            the_controller = PlacementController(
                store,
                ready_timeout_s=ready_timeout_s,
                copy_target_rps=copy_target_rps,
                scale_down_after_s=scale_down_after_s,
                telemetry=telemetry,
                store_quota_bytes=settings.etcd_quota_bytes(),
            )
            if telemetry.metrics:
                register_controller_gauges(telemetry, the_controller)
                # /readyz: ready once it follows the store (leading or standing by to take over).
                telemetry.serve_metrics(ready=the_controller.follower.loaded.is_set)
            await the_controller.run()

    from modelyard.memory import freeze_long_lived_objects

    freeze_long_lived_objects()  # the fleet view, out of the garbage collector's walks (memory.py)
    try:
        asyncio.run(run())
    except (StoreError, MetricsPortError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_fleet_secret(path: str | None) -> str | None:
    """The fleet secret in `path` (surrounding whitespace dropped), or None without a path."""
    if not path:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        fail(f"cannot read the fleet secret {path}: {exc.strerror or exc}")
    if len(secret) < 16 or not secret.isprintable() or " " in secret:
        fail(f"the fleet secret in {path} must be at least 16 printable characters without spaces")
    return secret


def _server_tls(cert: str | None, key: str | None, client_ca: str | None) -> Any:
    """Server credentials from the --tls-* options, or None for plaintext."""
    from modelyard.tls import TLSConfigError, server_credentials

    if not cert and not key:
        if client_ca:
            raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise TLSConfigError("TLS needs both --tls-cert and --tls-key")
    return server_credentials(cert, key, client_ca)


if __name__ == "__main__":
    main()
