"""`modelyard placement`: offline plans from files (what-ifs, benchmarks); show and rebalance on a store.

`plan` is timed as a whole process, so this module imports only what `plan` needs; the store-backed
commands import the store, the registry and rich when they run.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import click

from modelyard.commands.output import Table, chosen, emit_data, output_option, print_table
from modelyard.console import STORE_HELP, fail, run_on_store
from modelyard.placement.inputs import InputError, format_map, read_containers, read_map, read_models
from modelyard.placement.planner import Capacity, Plan, plan
from modelyard.placement.units import format_bytes

if TYPE_CHECKING:
    from modelyard.placement.rebalance import RebalancePlan
    from modelyard.placement.registry import Fleet
    from modelyard.placement.store import Store
    from modelyard.placement.summary import FleetSummary
    from modelyard.placement.usage import ContainerUsage

T = TypeVar("T")


@click.group()
def placement() -> None:
    """Plan which containers hold which models."""


@placement.command("plan")
@click.option("--models", "models_path", required=True, metavar="MODELS.jsonl", help="One model per line.")
@click.option(
    "--containers",
    "containers_path",
    required=True,
    metavar="CONTAINERS.jsonl",
    help="One container per line.",
)
@click.option(
    "--previous", "previous_path", metavar="MAP.json", help="The current map: its copies stay where they are."
)
@click.option("--rebalance", is_flag=True, help="Let under-filled containers (new ones) adopt copies.")
@click.option("--out", "out_path", required=True, metavar="MAP.json", help="Where to write the new map.")
def plan_command(
    models_path: str, containers_path: str, previous_path: str | None, rebalance: bool, out_path: str
) -> None:
    """Place models on containers and write the map (version = previous version + 1)."""
    # Everything allocated here lives until the map is written: collection passes would only cost time.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _plan(models_path, containers_path, previous_path, rebalance, out_path)
    finally:
        if was_enabled:
            gc.enable()


def _plan(
    models_path: str, containers_path: str, previous_path: str | None, rebalance: bool, out_path: str
) -> None:
    try:
        models = read_models(models_path)
        containers = read_containers(containers_path)
        previous = read_map(previous_path) if previous_path else None
    except InputError as exc:
        fail(str(exc))
    result = plan(models, containers, previous.assignments if previous else None, rebalance=rebalance)
    version = previous.version + 1 if previous else 1
    try:
        _write_atomically(out_path, format_map(result, version))
    except OSError as exc:
        fail(f"cannot write {out_path}: {exc.strerror or exc}")
    click.echo(_summary(containers, result), err=True)


def _write_atomically(path: str, text: str) -> None:
    """Readers of `path` see the old map or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".map-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _summary(containers: Sequence[Capacity], result: Plan) -> str:
    used = {"gpu": 0, "cpu": 0}
    capacity = {"gpu": 0, "cpu": 0}
    for container in containers:
        used[container.kind] += result.used_bytes[container.id]
        capacity[container.kind] += container.memory_bytes
    copies = sum(map(len, result.assignments.values()))
    by_kind = ", ".join(f"{k} {_percent(used[k], capacity[k])}" for k in ("gpu", "cpu") if capacity[k])
    total = _percent(sum(used.values()), sum(capacity.values()))
    return (
        f"placed {copies} copies of {len(result.assignments)} models on {len(containers)} containers, "
        f"{len(result.unplaced)} models unplaced or short; utilization {total}"
        + (f" ({by_kind})" if by_kind else "")
    )


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


# -- store-backed commands -----------------------------------------------------------------------------


def _bar(fraction: float, width: int = 20) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "·" * (width - filled)


def _spread(rows: Sequence[ContainerUsage]) -> tuple[float, float]:
    live = [r.utilization for r in rows if r.live]
    if not live:
        return 0.0, 0.0
    return sum(live) / len(live), max(live)


COPY_STATES = ("assigned", "loading", "ready", "failed", "unloading", "lost")
TOP_CONTAINERS = 20  # container lines a summary shows by default


@placement.command()
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Read the whole fleet now and list every container (slower: seconds at 100k model versions).",
)
@click.option("--container", "containers", multiple=True, help="List the copies on this container (repeat).")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(COPY_STATES), help="List copies in this state."
)
@click.option("--tenant", default=None, help="List the copies of the models this tenant may call.")
@click.option("--limit", type=click.IntRange(0), default=None, help="Lines to show (0: all).")
@click.option("--offset", type=click.IntRange(0), default=0, help="Lines to skip first.")
def show(
    store_url: str | None,
    output: str,
    everything: bool,
    containers: tuple[str, ...],
    states: tuple[str, ...],
    tenant: str | None,
    limit: int | None,
    offset: int,
) -> None:
    """A summary: the fullest containers, copies per state, totals, what is unplaced or lost.

    By default it reads the summary the placement controller keeps in the store (one key, however big the
    fleet), or computes it when no controller wrote one. `--all` reads the whole fleet and lists every
    container; `-o json|yaml` gives that full listing as data; `--container`, `--state` and `--tenant`
    list the copies that match (reading the whole fleet). `--limit/--offset` page any listing.
    """
    fmt = chosen(output)
    if containers or states or tenant is not None:
        _show_copies(store_url, fmt, containers, states, tenant, limit, offset)
    elif everything or fmt != "table":
        _show_everything(store_url, fmt, limit, offset)
    else:
        _show_summary(store_url, TOP_CONTAINERS if limit is None else limit, offset)


def _read_summary(store_url: str | None) -> tuple[FleetSummary, dict[str, object], bool]:
    """(summary, autoscale status, whether a controller wrote it); computed from a full read without one."""
    import asyncio
    import time

    from modelyard.placement.autoscaler import STATUS, read_status
    from modelyard.placement.registry import ConcurrentPlanError, load_fleet
    from modelyard.placement.summary import SUMMARY, FleetSummary, summarize

    async def read(store: Store) -> tuple[FleetSummary, dict[str, object], bool]:
        stored, status = await asyncio.gather(store.get(SUMMARY), store.get(STATUS))
        autoscale = read_status(status.value if status else None)
        if stored is not None:
            try:
                return FleetSummary.from_json(stored.value), autoscale, True
            except (ValueError, UnicodeDecodeError) as exc:
                click.echo(
                    f"note: the stored fleet summary does not parse ({exc}); reading the fleet", err=True
                )
        fleet = await load_fleet(store)
        return summarize(fleet, now=time.time()), autoscale, False

    return run_on_store(store_url, read, (ConcurrentPlanError,), read_only=True)


def _show_summary(store_url: str | None, limit: int, offset: int) -> None:
    import time

    summary, autoscale, stored = _read_summary(store_url)
    live = [line for line in summary.containers if line.live]
    fullest = sorted(summary.containers, key=lambda line: (not line.live, -line.utilization, line.id))
    shown = fullest[offset : offset + limit] if limit else fullest[offset:]
    table = Table(
        ("container", "kind", "used", "capacity", "", "util", "copies"),
        title=f"shard map generation {summary.generation}: "
        + (
            f"{len(shown)} fullest of {len(fullest)} containers"
            if len(shown) < len(fullest)
            else "containers"
        ),
        right=frozenset({"used", "capacity", "util", "copies"}),
    )
    for line in shown:
        table.rows.append(
            _container_row(line.id, line.kind, line.live, line.used_bytes, line.capacity_bytes, line.copies)
        )
    print_table(table)
    if len(shown) < len(fullest):
        click.echo(
            f"... {len(fullest) - len(shown)} more containers: "
            "--limit N --offset M to page, --all for every one"
        )
    utilizations = [line.utilization for line in live]
    mean = sum(utilizations) / len(utilizations) if utilizations else 0.0
    click.echo(
        f"{summary.models} models, {summary.copies} copies on {len(live)} live containers; "
        f"utilization mean {mean:.0%}, max {max(utilizations, default=0.0):.0%}; unplaced or "
        f"under-replicated: {summary.under_replicated}; lost copies: {summary.lost}"
    )
    by_state = ", ".join(f"{summary.states.get(s, 0)} {s}" for s in COPY_STATES if s != "lost")
    click.echo(f"copies by state: {by_state}, {summary.lost} lost (their container is gone)")
    if summary.short_sample:
        more = summary.under_replicated - len(summary.short_sample)
        click.echo(
            "short of copies: "
            + ", ".join(summary.short_sample)
            + (f" and {more} more (--state or -o json)" if more > 0 else "")
        )
    _echo_autoscale(summary.resident, summary.evictable, autoscale)
    if stored:
        age_s = max(0.0, time.time() - summary.written_at)
        click.echo(
            f"(summary written by {summary.writer} {age_s:.0f} s ago at store revision {summary.revision}; "
            "--all reads the fleet now)",
            err=True,
        )


def _container_row(cid: str, kind: str, live: bool, used: int, capacity: int, copies: int) -> tuple[str, ...]:
    utilization = used / capacity if capacity else 0.0
    return (
        cid + ("" if live else " (lost)"),
        kind,
        format_bytes(used),
        format_bytes(capacity) if live else "-",
        _bar(utilization) if live else "",
        f"{utilization:.0%}" if live else "-",
        str(copies),
    )


def _echo_autoscale(resident: int, evictable: int, autoscale: dict[str, object]) -> None:
    click.echo(
        f"copies resident (replicas >= 1): {resident}; evictable (load on demand): {evictable}; "
        f"evictions: {autoscale.get('evictions', 0)}; copies added or removed for load: "
        f"{autoscale.get('copy_changes', 0)}"
    )
    decisions = autoscale.get("decisions")
    if isinstance(decisions, list) and decisions:
        click.echo(
            "recent copy decisions (copy target "
            f"{autoscale.get('copy_target_rps', 0)} calls/s, scale down after "
            f"{autoscale.get('scale_down_after_s', 0)} s):"
        )
        for line in decisions[-10:]:
            click.echo(f"  {line}")


def _read_fleet(store_url: str | None) -> tuple[Fleet, dict[str, object]]:
    from modelyard.placement.autoscaler import STATUS, read_status
    from modelyard.placement.registry import ConcurrentPlanError, load_fleet

    async def read(store: Store) -> tuple[Fleet, dict[str, object]]:
        fleet = await load_fleet(store)
        status = await store.get(STATUS)
        return fleet, read_status(status.value if status else None)

    return run_on_store(store_url, read, (ConcurrentPlanError,), read_only=True)


def _page(rows: Sequence[T], limit: int | None, offset: int) -> Sequence[T]:
    return rows[offset : offset + limit] if limit else rows[offset:]


def _show_everything(store_url: str | None, fmt: str, limit: int | None, offset: int) -> None:
    """Every container (paged with --limit/--offset), read from the whole fleet now."""
    from modelyard.placement.autoscale import resident_and_evictable
    from modelyard.placement.usage import lost_copies, under_replicated, usage

    fleet, autoscale = _read_fleet(store_url)
    resident, evictable = resident_and_evictable(fleet)
    every = usage(fleet, fleet.assignments)
    rows = _page(every, limit, offset)
    short = under_replicated(fleet)
    lost = lost_copies(fleet)
    copies = sum(len(ids) for ids in fleet.assignments.values())
    if fmt != "table":
        emit_data(
            fmt,
            {
                "generation": fleet.generation,
                "models": len(fleet.models),
                "copies": copies,
                "containers": [
                    {
                        "id": r.id,
                        "kind": r.kind,
                        "live": r.live,
                        "used_bytes": r.used_bytes,
                        "capacity_bytes": r.capacity_bytes,
                        "copies": r.copies,
                    }
                    for r in rows
                ],
                "unplaced": len(short),
                "under_replicated": short,
                "lost": [{"model": m, "container": c} for m, c in lost],
                "resident_copies": resident,
                "evictable_copies": evictable,
                "autoscale": autoscale,
            },
        )
        return
    table = Table(
        ("container", "kind", "used", "capacity", "", "util", "copies"),
        title=f"shard map generation {fleet.generation}",
        right=frozenset({"used", "capacity", "util", "copies"}),
    )
    for r in rows:
        table.rows.append(_container_row(r.id, r.kind, r.live, r.used_bytes, r.capacity_bytes, r.copies))
    print_table(table)
    mean, top = _spread(every)  # the fleet's, not the page's
    click.echo(
        f"{len(fleet.models)} models, {copies} copies on {sum(1 for c in fleet.containers)} live containers; "
        f"utilization mean {mean:.0%}, max {top:.0%}; unplaced or under-replicated: {len(short)}; "
        f"lost copies: {len(lost)}"
    )
    _echo_autoscale(resident, evictable, autoscale)


def _show_copies(
    store_url: str | None,
    fmt: str,
    containers: tuple[str, ...],
    states: tuple[str, ...],
    tenant: str | None,
    limit: int | None,
    offset: int,
) -> None:
    """One line per copy (model, container, state, budget) matching every filter given, in model order."""
    fleet, _ = _read_fleet(store_url)
    wanted_containers = set(containers)
    matches: list[tuple[str, str, str, int]] = []
    for key in sorted(fleet.assignments):
        model = fleet.models.get(key)
        if tenant is not None and (model is None or not model.visible_to(tenant)):
            continue
        for cid in fleet.assignments[key]:
            if wanted_containers and cid not in wanted_containers:
                continue
            if cid not in fleet.containers:
                phase = "lost"
            else:
                state = fleet.states.get((cid, key))
                phase = state.phase if state else "assigned"
            if states and phase not in states:
                continue
            matches.append((key, cid, phase, fleet.budget_bytes(model) if model else 0))
    page = _page(matches, 50 if limit is None and fmt == "table" else limit, offset)
    if fmt != "table":
        emit_data(
            fmt,
            {
                "matching": len(matches),
                "offset": offset,
                "copies": [
                    {"model": m, "container": c, "state": p, "budget_bytes": b} for m, c, p, b in page
                ],
            },
        )
        return
    table = Table(("model", "container", "state", "budget"), right=frozenset({"budget"}))
    table.rows.extend((m, c, p, format_bytes(b)) for m, c, p, b in page)
    print_table(table)
    click.echo(
        f"{len(page)} of {len(matches)} matching copies"
        + (f" from {offset}" if offset else "")
        + ("; --limit N --offset M to page (--limit 0: all)" if len(page) < len(matches) else "")
    )


@placement.command()
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@click.option("--dry-run", is_flag=True, help="Print the move plan; change nothing.")
@click.option(
    "--timeout",
    "ready_timeout_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds to wait for new copies to become ready.",
)
def rebalance(store_url: str | None, dry_run: bool, ready_timeout_s: float) -> None:
    """Re-place lost and unplaced copies and fill new containers, make-before-break."""
    import socket

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from modelyard.placement.rebalance import apply_rebalance, plan_rebalance
    from modelyard.placement.registry import ConcurrentPlanError, load_fleet

    async def run(store: Store) -> int:
        fleet = await load_fleet(store)
        proposal = plan_rebalance(fleet)
        _print_moves(proposal, fleet)
        if dry_run or not proposal.moves:
            if not proposal.moves:
                click.echo("nothing to move")
            return 0
        holder = f"{socket.gethostname()}:{os.getpid()}"
        with Progress(
            TextColumn("loading new copies"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as progress:
            task = progress.add_task("load", total=sum(1 for m in proposal.moves if m.target))
            result = await apply_rebalance(
                store,
                proposal,
                holder=holder,
                ready_timeout_s=ready_timeout_s,
                on_ready=lambda move: progress.advance(task),
            )
        click.echo(f"applied: shard map generation {result.generation}, {result.ready} new copies ready")
        for (model, cid), why in sorted(result.failed.items()):
            click.echo(f"not moved: {model} to {cid}: {why} (its old copies were kept)", err=True)
        return 1 if result.failed else 0

    sys.exit(run_on_store(store_url, run, (ConcurrentPlanError,)))


def _print_moves(proposal: RebalancePlan, fleet: Fleet) -> None:
    from modelyard.placement.usage import usage

    if proposal.moves:
        table = Table(("model", "from", "to", "bytes"), title="moves", right=frozenset({"bytes"}))
        for move in proposal.moves:
            table.rows.append(
                (
                    move.model,
                    move.source or "(new)",
                    move.target or "(dropped)",
                    format_bytes(move.memory_bytes),
                )
            )
        print_table(table)
    before_mean, before_max = _spread(usage(fleet, proposal.before))
    after_mean, after_max = _spread(usage(fleet, proposal.after))
    click.echo(
        f"{len(proposal.moves)} moves, {format_bytes(proposal.bytes_moved)} moved; utilization mean/max "
        f"{before_mean:.0%}/{before_max:.0%} -> {after_mean:.0%}/{after_max:.0%}; "
        f"unplaced after: {len(proposal.unplaced)}"
    )
    for name, why in sorted(proposal.unplaced.items()):
        click.echo(f"unplaced: {name}: {why}", err=True)
