"""`modelyard routes`: per-model route rules (default version, tenant pins, weighted split)."""

from __future__ import annotations

import json

import click

from modelyard.commands.output import Table, chosen, emit_data, output_option, print_table
from modelyard.console import STORE_HELP, fail, run_on_store
from modelyard.placement import registry
from modelyard.placement.model import RouteRule
from modelyard.placement.store import Store


def _pairs(values: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left or not right:
            fail(f"bad {what} {value!r}: expected LEFT=RIGHT")
        pairs.append((left, right))
    return pairs


@click.group()
def routes() -> None:
    """Route rules: which version a call gets when it names none. Changes apply without restarts."""


@routes.command("set")
@click.argument("model")
@click.option("--default", "default_version", default="", help="Version for callers without a pin or split.")
@click.option("--pin", "pins", multiple=True, metavar="TENANT=VERSION", help="Pin a tenant to a version.")
@click.option("--split", "splits", multiple=True, metavar="VERSION=WEIGHT", help="Weighted split (repeat).")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def set_command(
    model: str, default_version: str, pins: tuple[str, ...], splits: tuple[str, ...], store_url: str | None
) -> None:
    """Replace MODEL's route rule."""
    weights = []
    for version, weight in _pairs(splits, "split"):
        if not weight.isdigit() or int(weight) <= 0:
            fail(f"bad split weight {weight!r} for version {version!r}: a positive integer")
        weights.append((version, int(weight)))
    rule = RouteRule(model, default_version, tuple(_pairs(pins, "pin")), tuple(weights))

    async def write(store: Store) -> None:
        fleet = await registry.load_fleet(store)
        known = {m.version for m in fleet.models.values() if m.name == model}
        known |= set(fleet.pipelines_by_name.get(model, {}))  # a pipeline's versions are chosen alike
        if not known:
            fail(f"model '{model}' is not registered")
        named = {default_version} - {""} | {v for _, v in rule.tenant_versions} | {v for v, _ in weights}
        if unknown := sorted(named - known):
            registered = ", ".join(sorted(known))
            fail(f"model '{model}' has no version {', '.join(unknown)} (registered: {registered})")
        await registry.put_route_rule(store, rule)

    run_on_store(store_url, write)
    click.echo(f"route rule for {model}: {json.loads(rule.to_json())}")


@routes.command("show")
@click.argument("model", required=False)
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
def show_command(model: str | None, store_url: str | None, output: str) -> None:
    """Every route rule (or MODEL's): default version, tenant pins, weighted split."""
    fleet = run_on_store(store_url, registry.load_fleet, read_only=True)
    rules = sorted((r for r in fleet.routes.values() if model in (None, r.model)), key=lambda r: r.model)
    if model is not None and not rules:
        fail(f"model '{model}' has no route rule")
    if chosen(output) != "table":
        emit_data(chosen(output), {r.model: json.loads(r.to_json()) for r in rules})
        return
    table = Table(("model", "default", "pins", "split"))
    for r in rules:
        pins = ",".join(f"{t}={v}" for t, v in r.tenant_versions) or "-"
        split = ",".join(f"{v}={w}" for v, w in r.weights) or "-"
        table.rows.append((r.model, r.default_version or "(highest)", pins, split))
    print_table(table)


@routes.command("clear")
@click.argument("model")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def clear_command(model: str, store_url: str | None) -> None:
    """Remove MODEL's rule: calls get the highest version they may see."""
    if not run_on_store(store_url, lambda store: registry.delete_route_rule(store, model)):
        fail(f"model '{model}' has no route rule")
    click.echo(f"route rule for {model} removed")
