"""`modelyard apply -f FLEET.yaml` and `modelyard export`: a fleet described in a file (catalog/fleet.py).

Exit status: 0 done (or nothing to do); 2 a refusal (a bad file, archive, pipeline or route rule, an
unreachable store, a failed write: nothing was written unless the message says otherwise); 3 the file
changes what is immutable (a registered version's artifact or settings, a pipeline's spec).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from modelyard import settings
from modelyard.console import STORE_HELP, fail, run_on_store
from modelyard.containers.archives import register_archive_checks

register_archive_checks()  # apply checks every archive a fleet file names, before anything is written


@click.command("apply")
@click.option(
    "-f",
    "--file",
    "fleet_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="The fleet file (YAML or JSON; - reads stdin).",
)
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing, store no artifact.")
@click.option(
    "--prune",
    is_flag=True,
    help="Also remove the models, pipelines and route rules the file does not list.",
)
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@click.option(
    "--model-store",
    default=None,
    help="Artifact directory or s3://BUCKET/PREFIX; default $MODELYARD_MODEL_STORE or .modelyard/artifacts.",
)
def apply_command(
    fleet_file: Path, dry_run: bool, prune: bool, store_url: str | None, model_store: str | None
) -> None:
    """Make the fleet in FILE true: register its model versions (uploading their archives), pipelines and
    route rules, and change the copies of those already registered.

    Idempotent: applying the same file again changes nothing. Everything is checked before anything is
    written, and the changes are written all or none. Shows each change (+ add, ~ change, - remove).
    """
    from modelyard.catalog.fleet import FleetFileError, parse
    from modelyard.catalog.fleet_apply import (
        FleetApplyError,
        FleetConflict,
        FleetPlan,
        plan,
        staging_note,
        write,
    )
    from modelyard.catalog.modelstore import ArchiveError
    from modelyard.catalog.stores import open_model_store

    origin = "<stdin>" if str(fleet_file) == "-" else str(fleet_file)
    try:
        text = sys.stdin.read() if origin == "<stdin>" else fleet_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {origin}: {getattr(exc, 'strerror', None) or exc}")
    base = Path.cwd() if origin == "<stdin>" else fleet_file.parent
    try:
        spec = parse(text, origin, base)
        artifacts = open_model_store(
            settings.model_store(model_store), cache_dir=settings.artifact_cache_dir()
        )
        if not dry_run:
            artifacts.check()
    except (FleetFileError, ArchiveError) as exc:
        fail(str(exc))

    from modelyard.placement.store import Store

    async def run(store: Store) -> FleetPlan:
        try:
            fleet_plan = await plan(store, spec, artifacts, prune=prune, store_artifacts=not dry_run)
        except FleetApplyError as exc:  # named after the file, as the file's own errors are
            raise type(exc)(f"{origin}: {exc}") from None
        if note := staging_note(fleet_plan):
            click.echo(f"note: {note}", err=True)
        for change in fleet_plan.ordered():  # in the order they are written
            click.echo(change.line())
        if not dry_run:
            await write(store, fleet_plan)
        return fleet_plan

    from modelyard.placement.store import missing_store
    from modelyard.settings import store_url as configured_store_url

    url = configured_store_url(store_url)
    if dry_run and (path := missing_store(url)) is not None:
        # Nothing to read, and a dry run creates nothing: compare with an empty store made for the run.
        import tempfile

        click.echo(f"note: no store at {path} yet: compared with an empty fleet", err=True)
        with tempfile.TemporaryDirectory(prefix="modelyard-dry-run-") as empty:
            fleet_plan = run_on_store(empty, run, (FleetApplyError,), exists=(FleetConflict,))
    else:
        fleet_plan = run_on_store(url, run, (FleetApplyError,), exists=(FleetConflict,))
    if fleet_plan.kept:
        click.echo(
            f"{len(fleet_plan.kept)} registered but not in the file, kept (--prune removes them)", err=True
        )
    if dry_run:
        click.echo(f"dry run: {fleet_plan.summary(done=False)}; nothing written")
    else:
        click.echo(f"applied: {fleet_plan.summary(done=True)}")


@click.command("export")
@click.option(
    "-o", "--output", "output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def export_command(output: str, store_url: str | None) -> None:
    """Write the fleet (models, pipelines, route rules) as a fleet file: `modelyard apply -f` of it
    changes nothing."""
    from modelyard.catalog.fleet_apply import export

    document, skipped = run_on_store(store_url, export, read_only=True)
    if skipped:
        click.echo(f"warning: {skipped} store values do not parse and are left out", err=True)
    if output == "json":
        import json

        click.echo(json.dumps(document, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(document, sort_keys=False, default_flow_style=False), nl=False)
