"""`modelyard pipelines`: register, list, show and remove pipelines (placement/pipeline.py).

Exit status: 0 done; 2 a refusal (an invalid spec, a step that does not fit its model, an unreachable
store); 3 NAME@VERSION already exists with another spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelyard import settings
from modelyard.commands.output import Table, chosen, emit_data, output_option, print_table
from modelyard.console import STORE_HELP, fail, run_on_store

if TYPE_CHECKING:
    from modelyard.catalog.modelstore import ModelStore
    from modelyard.placement.pipeline import Pipeline
    from modelyard.placement.store import Store

# Like every group, `modelyard pipelines --help` imports only click: each command imports what it runs.
MODEL_STORE_HELP = (
    "Artifact directory, read only for steps' models registered before signatures were stored in the "
    "registry; default $MODELYARD_MODEL_STORE or "
    ".modelyard/artifacts."
)


@click.group()
def pipelines() -> None:
    """Add, list, show and remove pipelines (steps over models, callable by name)."""


@pipelines.command("register")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@click.option("--model-store", default=None, help=MODEL_STORE_HELP)
def register_command(spec: Path, store_url: str | None, model_store: str | None) -> None:
    """Check SPEC (YAML) and register it as NAME@VERSION.

    Every tensor needs exactly one producer, the steps may not form a cycle, and every step's model must
    be registered with a signature that fits (names, datatypes, shapes). An invalid spec is refused with
    one line and nothing is registered.
    """
    from modelyard.catalog.modelstore import ArchiveError
    from modelyard.catalog.registration import AlreadyRegistered
    from modelyard.catalog.stores import open_model_store
    from modelyard.placement.pipeline import PipelineError, parse_yaml

    try:
        text = spec.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {spec}: {getattr(exc, 'strerror', None) or exc}")
    try:
        pipeline = parse_yaml(text)
        artifacts = open_model_store(
            settings.model_store(model_store), cache_dir=settings.artifact_cache_dir()
        )
    except (PipelineError, ArchiveError) as exc:
        fail(f"{spec}: {exc}")

    registered, created = run_on_store(
        store_url,
        lambda store: _register(store, spec, pipeline, artifacts),
        (PipelineError,),
        exists=(AlreadyRegistered,),
    )
    streams = " (it streams: call it with InferStream)" if registered.streaming else ""
    click.echo(
        f"{'registered' if created else 'already registered, unchanged:'} pipeline {registered.key}: "
        f"{len(registered.steps)} steps{streams}"
    )


async def _register(
    store: Store, spec: Path, pipeline: Pipeline, artifacts: ModelStore
) -> tuple[Pipeline, bool]:
    from modelyard.catalog.pipelines import register
    from modelyard.placement.pipeline import PipelineError

    try:
        return await register(store, pipeline, artifacts)
    except PipelineError as exc:
        raise PipelineError(f"{spec}: {exc}") from None


@pipelines.command("list")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
def list_command(store_url: str | None, output: str) -> None:
    """Registered pipelines."""
    from modelyard.catalog.pipelines import load_pipelines

    found = run_on_store(store_url, load_pipelines, read_only=True)
    if chosen(output) != "table":
        emit_data(chosen(output), [p.to_dict() for p in found])
        return
    table = Table(("pipeline", "tenants", "calls", "steps"))
    for p in found:
        steps = ", ".join(f"{s.name}={s.model}" for s in p.steps)
        tenants = ",".join(p.tenants) or "public"
        table.rows.append((p.key, tenants, "stream" if p.streaming else "unary", steps))
    print_table(table)


@pipelines.command("show")
@click.argument("name")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
def show_command(name: str, store_url: str | None, output: str) -> None:
    """NAME (every version) or NAME@VERSION: tensors and steps."""
    from modelyard.catalog.pipelines import load_pipelines

    base, _, version = name.partition("@")
    found = [
        p
        for p in run_on_store(store_url, load_pipelines, read_only=True)
        if p.name == base and version in ("", p.version)
    ]
    if not found:
        fail(f"pipeline {name} is not registered")
    if chosen(output) != "table":
        emit_data(chosen(output), [p.to_dict() for p in found])
        return
    for p in found:
        click.echo(f"pipeline {p.key} ({', '.join(p.tenants) or 'public'})")
        for what, tensors in (("inputs", p.inputs), ("outputs", p.outputs)):
            click.echo(f"  {what}: " + ", ".join(f"{t.name} {t.describe()}" for t in tensors))
        for s in p.steps:
            ins = ", ".join(f"{m}<-{t}" for m, t in s.inputs)
            outs = ", ".join(f"{m}->{t}" for m, t in s.outputs)
            click.echo(f"  step {s.name}: {s.model} ({ins}; {outs}){' streams' if s.decoupled else ''}")


@pipelines.command("remove")
@click.argument("key", metavar="NAME@VERSION")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def remove_command(key: str, store_url: str | None) -> None:
    """Unregister pipeline NAME@VERSION (the models of its steps stay)."""
    from modelyard.catalog.pipelines import remove
    from modelyard.catalog.registration import RegistrationError

    if "@" not in key:
        fail(f"not a pipeline key (expected NAME@VERSION): {key!r}")
    run_on_store(store_url, lambda store: remove(store, key), (RegistrationError,))
    click.echo(f"removed pipeline {key}")
