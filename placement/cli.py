"""`modelyard placement`: offline planning from files (what-ifs, benchmarks)."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

import click

from placement.inputs import InputError, format_map, read_containers, read_map, read_models
from placement.planner import Capacity, Demand, Plan, plan


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
        _fail(str(exc))
    result = plan(models, containers, previous.assignments if previous else None, rebalance=rebalance)
    version = previous.version + 1 if previous else 1
    try:
        _write_atomically(out_path, format_map(result, version))
    except OSError as exc:
        _fail(f"cannot write {out_path}: {exc.strerror or exc}")
    click.echo(_summary(models, containers, result), err=True)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


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
