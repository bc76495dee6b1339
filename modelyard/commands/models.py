"""`modelyard models`: upload, import, list, show and remove model versions.

Exit status: 0 done; 2 a refusal (bad archive or name, unreachable store), also when some lines of an
import failed; 3 `name@version` already exists with another artifact or other settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelyard import settings
from modelyard.catalog.modelstore import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_BYTES_ENV,
    ArchiveError,
    ModelStore,
)
from modelyard.catalog.registration import (
    AlreadyRegistered,
    Registration,
    RegistrationError,
    remove,
    upload,
)
from modelyard.catalog.stores import open_model_store
from modelyard.commands.output import Table, chosen, emit_data, output_option, print_table
from modelyard.console import EXIT_REFUSED, STORE_HELP, fail, run_on_store
from modelyard.containers.archives import register_archive_checks
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion, split_model_key
from modelyard.placement.rates import ModelRate
from modelyard.placement.store import Store
from modelyard.placement.units import format_bytes

if TYPE_CHECKING:
    from modelyard.placement.summary import FleetSummary

register_archive_checks()  # upload and import check archives: every backend's check, before any is read

REFUSALS = (ArchiveError, RegistrationError)  # a user's archive or name refused: one line, exit 2
MODEL_STORE_ENV = "MODELYARD_MODEL_STORE"
DEFAULT_MODEL_STORE = ".modelyard/artifacts"

_model_store_option = click.option(
    "--model-store",
    default=None,
    help=f"Artifact directory or s3://BUCKET/PREFIX; default ${MODEL_STORE_ENV} or {DEFAULT_MODEL_STORE}.",
)
_max_archive_bytes_option = click.option(
    "--max-archive-bytes",
    type=click.IntRange(1),
    envvar=MAX_ARCHIVE_BYTES_ENV,
    default=DEFAULT_MAX_ARCHIVE_BYTES,
    show_default=True,
    help=f"Refuse archives larger than this, packed or unpacked (also ${MAX_ARCHIVE_BYTES_ENV}).",
)


def _open_artifacts(model_store: str | None) -> ModelStore:
    try:
        artifacts = open_model_store(
            settings.model_store(model_store), cache_dir=settings.artifact_cache_dir()
        )
        artifacts.check()  # a missing bucket or credentials: one line before any archive is read
        return artifacts
    except ArchiveError as exc:
        fail(str(exc))


@click.group()
def models() -> None:
    """Add, import, list, show, set and remove model versions."""


@models.command("upload")
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Model name; a Triton model's default: its config.pbtxt name.")
@click.option(
    "--version",
    default=None,
    help="Version (Triton models: a positive integer). A Triton model directory: the version folder to "
    "register (default: every one).",
)
@click.option("--tenant", "tenants", multiple=True, help="Tenant allowed to call it (repeat); none: public.")
@click.option("--memory-bytes", type=int, default=None, help="Declared footprint; default from the archive.")
@click.option(
    "--replicas",
    type=int,
    default=1,
    show_default=True,
    help="Copies kept whatever the load; 0: load on demand.",
)
@click.option(
    "--max-replicas",
    type=int,
    default=0,
    help="Copies it may have under load; default: as many as --replicas.",
)
@click.option("--kind", type=click.Choice(["cpu", "gpu", "any"]), default="cpu", show_default=True)
@click.option("--sha256", "expected_sha256", default=None, help="Refuse the archive unless it has this hash.")
@click.option(
    "--backend",
    type=click.Choice(["triton", "custom", "mlserver", "sagemaker"]),
    default=None,
    help="Refuse the archive unless it is for this backend. sagemaker: ARCHIVE is SageMaker's model.tar.gz "
    "(model files, code/inference.py).",
)
@click.option(
    "--manifest",
    "manifest_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Our manifest.json (signature) when the archive has none, e.g. a SageMaker model.tar.gz as it is.",
)
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@_model_store_option
@_max_archive_bytes_option
def upload_command(
    archive: Path,
    name: str | None,
    version: str | None,
    tenants: tuple[str, ...],
    memory_bytes: int | None,
    replicas: int,
    max_replicas: int,
    kind: str,
    expected_sha256: str | None,
    backend: str | None,
    manifest_file: Path | None,
    store_url: str | None,
    model_store: str | None,
    max_archive_bytes: int,
) -> None:
    """Check ARCHIVE, store it by sha256 and register it as NAME@VERSION.

    ARCHIVE is a Triton model directory as Triton keeps it (config.pbtxt and numeric version folders; each
    folder registers as that version), a .tar.gz of one, or an archive with our manifest.json.
    Versions are immutable: if NAME@VERSION exists with another artifact or other settings, nothing
    changes and the exit status is 3; the same archive and settings again is a no-op.
    """
    from modelyard.catalog.triton_import import is_triton_model

    artifacts = _open_artifacts(model_store)
    if is_triton_model(archive):
        _upload_triton_model(
            archive, name, version, tenants, memory_bytes, replicas, max_replicas, kind, expected_sha256,
            backend, manifest_file, store_url, artifacts, max_archive_bytes,
        )  # fmt: skip
        return
    if name is None:
        name = _config_name(archive)
    if name is None or version is None:
        fail("give --name and --version (only a Triton model directory's own config.pbtxt and version "
             "folders name them)")  # fmt: skip
    result = run_on_store(
        store_url,
        lambda store: upload(
            store,
            artifacts,
            archive,
            name=name,
            version=version,
            tenants=tenants,
            memory_bytes=memory_bytes,
            replicas=replicas,
            max_replicas=max_replicas,
            kind=kind,
            expected_sha256=expected_sha256,
            max_archive_bytes=max_archive_bytes,
            backend=backend,
            manifest_file=manifest_file,
        ),
        errors=REFUSALS,
        exists=(AlreadyRegistered,),
    )
    _echo_registration(result)


def _echo_registration(result: Registration) -> None:
    model = result.model
    click.echo(
        f"{'registered' if result.created else 'already registered, unchanged:'} {model.key} "
        f"({model.backend}, {model.kind}, {format_bytes(model.memory_bytes)}, sha256 {model.sha256[:12]})"
    )


def _config_name(archive: Path) -> str | None:
    """The model name a folder in our Triton layout (config.pbtxt + version/) declares, if any."""
    from modelyard.catalog.triton_repo import TritonRepoError, read_config

    if not (archive.is_dir() and (archive / "config.pbtxt").is_file()):
        return None
    try:
        return read_config(archive).name or archive.name
    except TritonRepoError:
        return archive.name  # the upload itself reports the config


def _upload_triton_model(
    archive: Path,
    name: str | None,
    version: str | None,
    tenants: tuple[str, ...],
    memory_bytes: int | None,
    replicas: int,
    max_replicas: int,
    kind: str,
    expected_sha256: str | None,
    backend: str | None,
    manifest_file: Path | None,
    store_url: str | None,
    artifacts: ModelStore,
    max_archive_bytes: int,
) -> None:
    from modelyard.catalog.triton_import import upload_model_dir
    from modelyard.catalog.triton_repo import TritonRepoError

    if backend not in (None, "triton"):
        fail(f"{archive} is a Triton model directory, not a {backend} archive")
    if manifest_file is not None:
        fail(
            f"{archive} is a Triton model directory: its config.pbtxt is the signature, leave out --manifest"
        )
    results = run_on_store(
        store_url,
        lambda store: upload_model_dir(
            store,
            artifacts,
            archive,
            name=name,
            version=version,
            tenants=tenants,
            memory_bytes=memory_bytes,
            replicas=replicas,
            max_replicas=max_replicas,
            kind=kind,
            expected_sha256=expected_sha256,
            max_archive_bytes=max_archive_bytes,
        ),
        errors=(*REFUSALS, TritonRepoError),
        exists=(AlreadyRegistered,),
    )
    for result in results:
        _echo_registration(result)


@models.command("import")
@click.argument("file", type=click.Path(path_type=Path), required=False)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path),
    default=None,
    help="A Triton model repository (folder or .tar.gz): every model and version folder in it.",
)
@click.option(
    "--tenants",
    "tenant_lists",
    multiple=True,
    help="With --triton-repo: tenants allowed to call its models, comma-separated (repeat); none: public.",
)
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@_model_store_option
@_max_archive_bytes_option
def import_command(
    file: Path | None,
    triton_repo: Path | None,
    tenant_lists: tuple[str, ...],
    store_url: str | None,
    model_store: str | None,
    max_archive_bytes: int,
) -> None:
    """Register every model version listed in FILE (JSONL), or found in a Triton repository, skipping
    those already registered.

    One JSON object per line: name, version, archive (path relative to FILE's folder), optional tenants
    (list), memory_bytes, replicas, kind. Each archive is checked and stored once. A bad line is reported
    with its number and registers nothing; the others go on. Exit status 2 if any line failed.

    --triton-repo REPO: each REPO/MODEL/config.pbtxt with numeric version folders registers as MODEL@N;
    ensembles become pipelines (after their step models), or are refused with one line naming them.
    """
    if (file is None) == (triton_repo is None):
        fail("give FILE (JSONL) or --triton-repo REPO, one of them")
    tenants = tuple(sorted({t.strip() for item in tenant_lists for t in item.split(",") if t.strip()}))
    if tenant_lists and file is not None:
        fail("--tenants goes with --triton-repo; a JSONL line names its own tenants")
    artifacts = _open_artifacts(model_store)
    if triton_repo is not None:
        _import_triton_repo(triton_repo, tenants, store_url, artifacts, max_archive_bytes)
        return
    assert file is not None
    _import_jsonl(file, store_url, artifacts, max_archive_bytes)


def _import_triton_repo(
    repo: Path, tenants: tuple[str, ...], store_url: str | None, artifacts: ModelStore, max_archive_bytes: int
) -> None:
    from modelyard.catalog.triton_import import import_repository
    from modelyard.catalog.triton_repo import TritonRepoError

    def report(label: str, error: str | None) -> None:
        if error is not None:
            click.echo(f"{repo}: {label}: {error}", err=True)

    outcome = run_on_store(
        store_url,
        lambda store: import_repository(
            store, artifacts, repo, tenants=tenants, max_archive_bytes=max_archive_bytes, on_entry=report
        ),
        errors=(OSError, TritonRepoError, ArchiveError),
    )
    click.echo(outcome.summary())
    if outcome.failed:
        sys.exit(EXIT_REFUSED)


def _import_jsonl(file: Path, store_url: str | None, artifacts: ModelStore, max_archive_bytes: int) -> None:
    from modelyard.catalog.bulk_import import count_lines, import_models

    try:
        total = count_lines(file)
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")

    def report(number: int, error: str | None) -> None:
        if error is not None:
            click.echo(f"{file}:{number}: {error}", err=True)

    if sys.stdout.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        with Progress(
            TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("import", total=total)

            def on_line(number: int, error: str | None) -> None:
                progress.advance(task)
                if error is not None:
                    console.print(f"{file}:{number}: {error}", markup=False, highlight=False)

            outcome = run_on_store(
                store_url,
                lambda store: import_models(
                    store, artifacts, file, max_archive_bytes=max_archive_bytes, on_line=on_line
                ),
                errors=(OSError,),
            )
    else:
        outcome = run_on_store(
            store_url,
            lambda store: import_models(
                store, artifacts, file, max_archive_bytes=max_archive_bytes, on_line=report
            ),
            errors=(OSError,),
        )
    click.echo(outcome.summary())
    if outcome.failed:
        sys.exit(EXIT_REFUSED)


LIST_PAGE = 50  # model versions a table shows by default


@models.command("list")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
@click.option("--all", "everything", is_flag=True, help="Every model version (reads the whole fleet).")
@click.option("--tenant", default=None, help="Only the versions this tenant may call (public ones too).")
@click.option("--container", default=None, help="Only the versions with a copy assigned to this container.")
@click.option(
    "--state",
    type=click.Choice(["assigned", "loading", "ready", "failed", "unloading", "lost", "none"]),
    default=None,
    help="Only the versions with a copy in this state (none: no copy at all).",
)
@click.option(
    "--limit", type=click.IntRange(0), default=None, help=f"Versions to show (default {LIST_PAGE}; 0: all)."
)
@click.option(
    "--after", default="", metavar="NAME@VERSION", help="Start after this version (the continue token)."
)
def list_command(
    store_url: str | None,
    output: str,
    everything: bool,
    tenant: str | None,
    container: str | None,
    state: str | None,
    limit: int | None,
    after: str,
) -> None:
    """Registered model versions with their ready copies, a page at a time.

    By default the first 50 (in name order) and the totals, read without reading the whole fleet; the
    last line gives the `--after` token of the next page. `--all` or `-o json|yaml` list every version;
    `--tenant`, `--container` and `--state` filter (those read the whole fleet: seconds at 100k).
    """
    fmt = chosen(output)
    if (
        everything
        or tenant is not None
        or container is not None
        or state is not None
        or (fmt != "table" and limit is None)
    ):
        fleet = run_on_store(store_url, registry.load_fleet, read_only=True)
        rows = [
            m
            for m in sorted(fleet.models.values(), key=lambda m: (m.name, m.version))
            if (not after or m.key > after) and _matches(m, fleet, tenant, container, state)
        ]
        page = rows[:limit] if limit else rows
        next_after = page[-1].key if len(page) < len(rows) else ""
        total = f"{len(rows)} matching" if tenant or container or state else f"{len(rows)}"
        _print_models(fmt, page, fleet, next_after, total)
        return
    page_size = LIST_PAGE if limit is None else limit
    fleet, next_after, summary = run_on_store(
        store_url, lambda store: _read_page(store, after, page_size), read_only=True
    )
    rows = sorted(fleet.models.values(), key=lambda m: (m.name, m.version))
    total = f"{summary.models} (the controller's count)" if summary else ""
    _print_models(fmt, rows, fleet, next_after, total)
    if summary and fmt == "table":
        backends = ", ".join(f"{n} {b}" for b, n in summary.backends.items())
        states = ", ".join(f"{n} {s}" for s, n in summary.states.items())
        click.echo(f"registered: {backends or 'none'}; copies: {states or 'none'}, {summary.lost} lost")


def _matches(
    model: ModelVersion, fleet: registry.Fleet, tenant: str | None, container: str | None, state: str | None
) -> bool:
    if tenant is not None and not model.visible_to(tenant):
        return False
    held = fleet.assignments.get(model.key, ())
    if container is not None and container not in held:
        return False
    if state is None:
        return True
    if state == "none":
        return not held
    phases = [
        "lost" if cid not in fleet.containers else (s.phase if s else "assigned")
        for cid in held
        for s in [fleet.states.get((cid, model.key))]
    ]
    return state in phases


def _print_models(
    fmt: str, rows: list[ModelVersion], fleet: registry.Fleet, next_after: str, total: str
) -> None:
    if fmt != "table":
        emit_data(fmt, [json.loads(m.to_json()) for m in rows])
        if next_after:
            click.echo(f"more: --after {next_after}", err=True)
        return
    table = Table(("model", "backend", "kind", "memory", "replicas", "ready", "tenants"))
    table.right = frozenset({"memory", "replicas", "ready"})
    for m in rows:
        table.rows.append(
            (
                m.key,
                m.backend,
                m.kind,
                format_bytes(m.memory_bytes),
                str(m.replicas),
                str(len(fleet.ready_on(m.key))),  # a dead container's (lease gone) copies serve nothing
                ",".join(m.tenants) or "public",
            )
        )
    print_table(table)
    if next_after or total:
        click.echo(
            f"{len(rows)} model versions shown"
            + (f" of {total}" if total else "")
            + (f"; next page: --after {next_after} (--all or -o json: every one)" if next_after else "")
        )


async def _read_page(store: Store, after: str, limit: int) -> tuple[registry.Fleet, str, FleetSummary | None]:
    """One page of versions and, when a controller wrote one, the fleet summary (for the totals)."""
    import asyncio

    from modelyard.placement.listing import read_page
    from modelyard.placement.summary import SUMMARY, FleetSummary

    page, stored = await asyncio.gather(read_page(store, after, limit or 1_000_000_000), store.get(SUMMARY))
    summary = None
    if stored is not None:
        try:
            summary = FleetSummary.from_json(stored.value)
        except (ValueError, UnicodeDecodeError):
            summary = None  # the page stands without totals
    return page.fleet, page.next_after, summary


@models.command("show")
@click.argument("model")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
def show_command(model: str, store_url: str | None, output: str) -> None:
    """MODEL as NAME (every version) or NAME@VERSION: registration, memory declared/measured, copies."""
    name, _, version = model.partition("@")
    fleet, rates = run_on_store(store_url, _fleet_and_rates, read_only=True)
    found: list[ModelVersion] = sorted(
        (m for m in fleet.models.values() if m.name == name and (not version or m.version == version)),
        key=lambda m: m.version,
    )
    if not found:
        fail(f"{model} is not registered")
    if chosen(output) != "table":
        emit_data(chosen(output), [_shown(m, fleet, rates) for m in found])
        return
    for m in found:
        measured = [
            s.measured_bytes for (_, key), s in fleet.states.items() if key == m.key and s.measured_bytes
        ]
        click.echo(f"{m.key}")
        tenants = ", ".join(m.tenants) or "public"
        click.echo(f"  backend {m.backend}, kind {m.kind}, replicas {m.replicas}, tenants {tenants}")
        rate = rates.get(m.key)
        ready_copies = len(fleet.ready_on(m.key))
        click.echo(
            f"  copies: at most {m.most_copies}{' (load on demand)' if m.on_demand else ''}; "
            f"{rate.rate if rate else 0.0:.1f} calls/s in all"
        )
        click.echo(
            f"  memory declared {format_bytes(m.memory_bytes)}, measured "
            + (format_bytes(max(measured)) if measured else "not yet")
            + f" (budgeted: {format_bytes(max([m.memory_bytes, *measured]))})"
        )
        click.echo(f"  artifact {m.artifact_uri} (sha256 {m.sha256})")
        _echo_signature(m)
        for cid in fleet.assignments.get(m.key, ()):
            state = fleet.states.get((cid, m.key))
            alive = cid in fleet.containers
            phase = state.phase if state else "assigned"
            note = f" — {state.message}" if state and state.message else ""
            per_copy = ""
            if alive and phase == "ready" and ready_copies:
                per_copy = f", {(rate.rate if rate else 0.0) / ready_copies:.1f} calls/s"
            click.echo(f"  copy on {cid}: {phase if alive else 'lost'}{per_copy}{note}")


def _shown(model: ModelVersion, fleet: registry.Fleet, rates: dict[str, ModelRate]) -> dict[str, object]:
    """What `models show` says about one version, as data (-o json|yaml)."""
    data: dict[str, object] = json.loads(model.to_json())
    data["signature"] = json.loads(model.signature) if model.signature else None
    rate = rates.get(model.key)
    data["calls_per_s"] = rate.rate if rate else 0.0
    data["budget_bytes"] = fleet.budget_bytes(model)
    data["copies"] = [
        {
            "container": cid,
            "phase": (state.phase if state else "assigned") if cid in fleet.containers else "lost",
            "measured_bytes": state.measured_bytes if state else 0,
            "message": state.message if state else "",
        }
        for cid in fleet.assignments.get(model.key, ())
        for state in [fleet.states.get((cid, model.key))]
    ]
    return data


def _echo_signature(model: ModelVersion) -> None:
    from modelyard.placement.model import parse_signature

    if not model.signature:
        click.echo("  signature not stored (registered before signatures were): read from its artifact")
        return
    inputs, outputs, decoupled = parse_signature(model.signature)
    for what, tensors in (("inputs", inputs), ("outputs", outputs)):
        click.echo(f"  {what}: " + ", ".join(f"{n} {d} {list(s)}" for n, d, s in tensors))
    if decoupled:
        click.echo("  decoupled: answers a request with a stream of responses (call it with InferStream)")


@models.command("set")
@click.argument("model")
@click.option("--replicas", type=int, default=None, help="Copies kept whatever the load; 0: load on demand.")
@click.option("--max-replicas", type=int, default=None, help="Copies it may have under load.")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def set_command(model: str, replicas: int | None, max_replicas: int | None, store_url: str | None) -> None:
    """Change how many copies NAME@VERSION keeps and may have under load; the controller follows."""
    from modelyard.catalog.registration import set_copies

    try:
        split_model_key(model)
    except ValueError as exc:
        fail(str(exc))
    if replicas is None and max_replicas is None:
        fail("nothing to set: give --replicas and/or --max-replicas")
    updated = run_on_store(
        store_url,
        lambda store: set_copies(store, model, replicas=replicas, max_replicas=max_replicas),
        REFUSALS,
    )
    click.echo(f"{updated.key}: replicas {updated.replicas}, max replicas {updated.most_copies}")


@models.command("remove")
@click.argument("model")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def remove_command(model: str, store_url: str | None) -> None:
    """Unregister NAME@VERSION; the placement controller drops its copies. The stored artifact is kept."""
    try:
        name, version = split_model_key(model)
    except ValueError as exc:
        fail(str(exc))
    removed = run_on_store(store_url, lambda store: remove(store, name, version), REFUSALS)
    click.echo(f"removed {removed.key}")


async def _fleet_and_rates(store: Store) -> tuple[registry.Fleet, dict[str, ModelRate]]:
    """The fleet and the call rates routers report (placement/rates.py)."""
    import time

    from modelyard.placement.rates import read_rates

    return await registry.load_fleet(store), await read_rates(store, time.time())
