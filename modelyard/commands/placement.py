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
from modelyard.placement.planner import Capacity, Demand, Plan, plan
from modelyard.placement.units import format_bytes

if TYPE_CHECKING:
    from modelyard.placement.rebalance import RebalancePlan
    from modelyard.placement.registry import Fleet
    from modelyard.placement.store import Store
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
    click.echo(_summary(models, containers, result), err=True)


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


def _summary(models: Sequence[Demand], containers: Sequence[Capacity], result: Plan) -> str:
    size = {model.name: model.memory_bytes for model in models}
    kind = {container.id: container.kind for container in containers}
    used = {"gpu": 0, "cpu": 0}
    copies = 0
    for name, ids in result.assignments.items():
        copies += len(ids)
        for container_id in ids:
            used[kind[container_id]] += size[name]
    capacity = {"gpu": 0, "cpu": 0}
    for container in containers:
        capacity[container.kind] += container.memory_bytes
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


@placement.command()
@click.option("--store", "store_url", default=None, help=STORE_HELP)
@output_option
def show(store_url: str | None, output: str) -> None:
    """Per container: memory used / capacity, copies; and what is unplaced or lost."""
    from modelyard.placement.autoscale import resident_and_evictable
    from modelyard.placement.autoscaler import STATUS, read_status
    from modelyard.placement.registry import ConcurrentPlanError, load_fleet
    from modelyard.placement.usage import lost_copies, under_replicated, usage

    async def read(store: Store) -> tuple[Fleet, dict[str, object]]:
        fleet = await load_fleet(store)
        status = await store.get(STATUS)
        return fleet, read_status(status.value if status else None)

    fleet, autoscale = run_on_store(store_url, read, (ConcurrentPlanError,), read_only=True)
    resident, evictable = resident_and_evictable(fleet)
    rows = usage(fleet, fleet.assignments)
    short = under_replicated(fleet)
    lost = lost_copies(fleet)
    copies = sum(len(ids) for ids in fleet.assignments.values())
    if chosen(output) != "table":
        emit_data(
            chosen(output),
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
        state = "" if r.live else " (lost)"
        table.rows.append(
            (
                r.id + state,
                r.kind,
                format_bytes(r.used_bytes),
                format_bytes(r.capacity_bytes) if r.live else "-",
                _bar(r.utilization) if r.live else "",
                f"{r.utilization:.0%}" if r.live else "-",
                str(r.copies),
            )
        )
    print_table(table)
    mean, top = _spread(rows)
    click.echo(
        f"{len(fleet.models)} models, {copies} copies on {sum(r.live for r in rows)} live containers; "
        f"utilization mean {mean:.0%}, max {top:.0%}; unplaced or under-replicated: {len(short)}; "
        f"lost copies: {len(lost)}"
    )
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
        _print_moves(proposal)
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


def _print_moves(proposal: RebalancePlan) -> None:
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
    before_mean, before_max = _spread(proposal.usage_before)
    after_mean, after_max = _spread(proposal.usage_after)
    click.echo(
        f"{len(proposal.moves)} moves, {format_bytes(proposal.bytes_moved)} moved; utilization mean/max "
        f"{before_mean:.0%}/{before_max:.0%} -> {after_mean:.0%}/{after_max:.0%}; "
        f"unplaced after: {len(proposal.unplaced)}"
    )
    for name, why in sorted(proposal.unplaced.items()):
        click.echo(f"unplaced: {name}: {why}", err=True)
