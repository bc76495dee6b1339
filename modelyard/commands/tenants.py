"""`modelyard tenants`: per-tenant limits (calls in flight, rate, priority), followed by every router."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from modelyard.commands.output import Table, chosen, emit_data, output_option, print_table
from modelyard.console import STORE_HELP, fail, run_on_store
from modelyard.placement import registry
from modelyard.placement.registry import Fleet
from modelyard.placement.store import KeyValue, Store
from modelyard.placement.tenants import NO_LIMITS, TenantLimits, check_tenant_name, parse_limits, share

DEFAULT = "(default)"


def _target(tenant: str | None, default: bool) -> str | None:
    """The tenant named (None: the default entry); one clear line when neither or both are given."""
    if default == (tenant is not None):
        fail("name a TENANT or give --default (not both)")
    if tenant is None:
        return None
    try:
        return check_tenant_name(tenant)
    except ValueError as exc:
        fail(str(exc))


def _describe(limits: TenantLimits) -> dict[str, Any]:
    return {k: v for k, v in asdict(limits).items() if v or k == "priority"}


def _text(limits: dict[str, Any]) -> str:
    return " ".join(
        f"{k.replace('_', '-')}={v:g}" if isinstance(v, float) else f"{k.replace('_', '-')}={v}"
        for k, v in limits.items()
    )


@click.group()
def tenants() -> None:
    """Tenant limits: calls in flight, call rate, priority on busy containers (no restarts needed)."""


@tenants.command("set")
@click.argument("tenant", required=False)
@click.option("--default", "default", is_flag=True, help="Set the limits of every tenant without an entry.")
@click.option("--max-inflight", default=None, metavar="N", help="Calls and open streams in flight.")
@click.option("--rps", default=None, metavar="R", help="Calls per second, fleet-wide (a token bucket).")
@click.option("--burst", default=None, metavar="B", help="Calls at once above --rps (default: 1 s).")
@click.option("--priority", default=None, metavar="high|normal|low", help="Share of busy containers.")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def set_command(
    tenant: str | None,
    default: bool,
    max_inflight: str | None,
    rps: str | None,
    burst: str | None,
    priority: str | None,
    store_url: str | None,
) -> None:
    """Set TENANT's limits (or the default's): the values given replace the entry's, the others stay."""
    target = _target(tenant, default)
    try:  # checked before the store is touched: a bad value writes nothing
        parse_limits(NO_LIMITS, max_inflight=max_inflight, rps=rps, burst=burst, priority=priority)
    except ValueError as exc:
        fail(str(exc))

    async def write(store: Store) -> TenantLimits:
        for _ in range(10):  # read, change, compare-and-swap: concurrent sets both land
            old = await store.get(registry.tenant_key(target))
            base = NO_LIMITS
            if old is not None:
                try:
                    base = TenantLimits.from_json(old.value)
                except ValueError:
                    base = NO_LIMITS  # an unreadable entry is replaced
            limits = parse_limits(base, max_inflight=max_inflight, rps=rps, burst=burst, priority=priority)
            if await registry.put_tenant_limits(store, target, limits, old):
                return limits
        fail(f"the limits of {target or DEFAULT} keep changing: try again")

    limits = run_on_store(store_url, write)
    click.echo(f"limits of {target or DEFAULT}: {_text(_describe(limits))}")


def _status(fleet: Fleet, tenant: str | None) -> dict[str, Any]:
    """What routers enforce for `tenant` (None: the default entry), as `show` and `list -o json` print."""
    entry = fleet.tenants.get(tenant) if tenant is not None else fleet.tenant_default
    source = "entry" if entry is not None else ("default" if fleet.tenant_default is not None else "none")
    limits = entry or fleet.tenant_default or NO_LIMITS
    routers = max(1, len(fleet.routers))
    return {
        "tenant": tenant if tenant is not None else DEFAULT,
        "source": source,
        "limits": _describe(limits),
        "live_routers": len(fleet.routers),
        "per_router": _describe(share(limits, routers)),
    }


async def _load_tenants(store: Store) -> Fleet:
    """The fleet's tenant limits and live routers only (not its models: a whole fleet can be 100k keys)."""
    items: list[KeyValue] = []
    revision = 0
    for prefix in (registry.TENANTS, registry.TENANT_DEFAULT, registry.ROUTERS):
        found, revision = await store.get_prefix(prefix)
        items += found
    return Fleet.from_items(items, revision)


@tenants.command("show")
@click.argument("tenant", required=False)
@click.option("--default", "default", is_flag=True, help="Show the default limits.")
@output_option
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def show_command(tenant: str | None, default: bool, output: str, store_url: str | None) -> None:
    """TENANT's limits, where they come from, and each live router's share of them."""
    target = _target(tenant, default)
    status = _status(run_on_store(store_url, _load_tenants, read_only=True), target)
    output = chosen(output)
    if output != "table":
        emit_data(output, status)
        return
    click.echo(f"tenant:       {status['tenant']}")
    click.echo(f"limits:       {_text(status['limits'])} (from {status['source']})")
    click.echo(f"live routers: {status['live_routers']}, each enforcing {_text(status['per_router'])}")


@tenants.command("list")
@output_option
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def list_command(output: str, store_url: str | None) -> None:
    """Every tenant with limits, and the default."""
    fleet = run_on_store(store_url, _load_tenants, read_only=True)
    rows = [_status(fleet, t) for t in sorted(fleet.tenants)]
    if fleet.tenant_default is not None:
        rows.append(_status(fleet, None))
    output = chosen(output)
    if output != "table":
        emit_data(output, rows)
        return
    if not rows:
        click.echo("no tenant limits")
        return
    print_table(
        Table(
            ("tenant", "limits", "source", "per router"),
            [(r["tenant"], _text(r["limits"]), r["source"], _text(r["per_router"])) for r in rows],
        )
    )


@tenants.command("clear")
@click.argument("tenant", required=False)
@click.option("--default", "default", is_flag=True, help="Remove the default limits.")
@click.option("--store", "store_url", default=None, help=STORE_HELP)
def clear_command(tenant: str | None, default: bool, store_url: str | None) -> None:
    """Remove TENANT's limits (it gets the default's, if any)."""
    target = _target(tenant, default)
    if not run_on_store(store_url, lambda store: store.delete(registry.tenant_key(target))):
        fail(f"{target or DEFAULT} has no limits")
    click.echo(f"limits of {target or DEFAULT} removed")
