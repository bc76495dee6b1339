"""`modelyard placement show` and `rebalance` as processes against a real etcd."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from modelyard.placement import registry
from modelyard.placement.mapwriter import LOCK
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.store import open_store

GiB = 1024**3


def modelyard(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args], capture_output=True, text=True, timeout=timeout_s
    )


def seed(url: str) -> None:
    async def main() -> None:
        async with open_store(url) as store:
            for i in range(6):
                await registry.register_model(store, ModelVersion(f"m{i}", "1", memory_bytes=(i + 1) * GiB))
            await registry.register_container(store, Container("a", "x:1", memory_bytes=64 * GiB))
            await registry.write_shard_map(store, {f"m{i}@1": ["a"] for i in range(6)}, expected_generation=0)
            await registry.register_container(store, Container("b", "x:2", memory_bytes=64 * GiB))

    asyncio.run(main())


def test_show_json_reports_usage_per_container(etcd_url: str) -> None:
    seed(etcd_url)
    result = modelyard("placement", "show", "--store", etcd_url, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    by_id = {c["id"]: c for c in shown["containers"]}
    assert by_id["a"]["used_bytes"] == sum((i + 1) * GiB for i in range(6))
    assert by_id["a"]["copies"] == 6 and by_id["b"]["copies"] == 0
    assert by_id["b"]["capacity_bytes"] == 64 * GiB
    assert shown["unplaced"] == 0 and shown["generation"] == 1 and shown["lost"] == []


def test_show_table_has_a_bar_per_container(etcd_url: str) -> None:
    seed(etcd_url)
    result = modelyard("placement", "show", "--store", etcd_url)
    assert result.returncode == 0, result.stderr
    assert "█" in result.stdout and "6 models, 6 copies on 2 live containers" in result.stdout


def test_dry_run_prints_moves_and_changes_nothing(etcd_url: str) -> None:
    seed(etcd_url)
    result = modelyard("placement", "rebalance", "--store", etcd_url, "--dry-run")
    assert result.returncode == 0, result.stderr
    moved = re.findall(r"^(m\d@1)\s+a\s+b\s", result.stdout, re.MULTILINE)  # plain columns: piped
    assert moved, result.stdout  # the empty container b adopts copies from a
    assert re.search(rf"^{len(moved)} moves, ", result.stdout, re.MULTILINE)

    async def generation() -> int:
        async with open_store(etcd_url) as store:
            return await registry.read_generation(store)

    assert asyncio.run(generation()) == 1


def test_two_concurrent_rebalances_one_applies_the_other_exits_with_a_clear_message(etcd_url: str) -> None:
    seed(etcd_url)
    stop = threading.Event()
    release = threading.Event()  # set once the second rebalance has been refused

    def agent_for_b() -> None:
        """Reports b's new copies ready once released, so the first rebalance holds its lock until then.

        It stands in for b's agent (a real one needs a container process; see tests/test_rebalance_e2e.py).
        """

        async def run() -> None:
            async with open_store(etcd_url) as store:
                while not stop.is_set():
                    fleet = await registry.load_fleet(store)
                    for key in fleet.copies_on("b") if release.is_set() else ():
                        if ("b", key) not in fleet.states:
                            await registry.put_copy_state(store, "b", key, CopyState("ready"))
                    await asyncio.sleep(0.1)  # the stand-in agent's pace

        asyncio.run(run())

    helper = threading.Thread(target=agent_for_b, daemon=True)
    helper.start()
    try:
        command = [
            sys.executable,
            "-m",
            "modelyard",
            "placement",
            "rebalance",
            "--store",
            etcd_url,
            "--timeout",
            "30",
        ]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        async def lock_held() -> bool:
            async with open_store(etcd_url) as store:
                return await store.get(LOCK) is not None

        deadline = time.monotonic() + 30
        while not asyncio.run(lock_held()):  # the first rebalance has taken the lock
            assert first.poll() is None and time.monotonic() < deadline, "the first rebalance took no lock"
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        release.set()
        out, err = first.communicate(timeout=60)
    finally:
        stop.set()
        helper.join(10)
    assert first.returncode == 0, err
    assert "applied: shard map generation 3" in out
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith("error: another rebalance is in progress")
    assert "Traceback" not in second.stderr


def test_unreachable_store_is_one_line_and_exit_2() -> None:
    result = modelyard("placement", "show", "--store", "etcd://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "error: etcd at 127.0.0.1:1 is unreachable"
    )


def test_models_list_counts_no_ready_copy_on_a_container_that_is_gone(tmp_path: Path) -> None:
    """m@1 is assigned to `a` (registered) and `gone` (its lease expired: no container key), both reported
    ready by their agents: only `a`'s copy serves calls, so `models list` says 1 ready, not 2."""
    url = str(tmp_path / "store")

    async def main() -> None:
        async with open_store(url) as store:
            await registry.register_model(store, ModelVersion("m", "1", memory_bytes=GiB, replicas=2))
            await registry.register_container(store, Container("a", "x:1", memory_bytes=64 * GiB))
            await registry.write_shard_map(store, {"m@1": ["a", "gone"]}, expected_generation=0)
            for cid in ("a", "gone"):
                await registry.put_copy_state(store, cid, "m@1", CopyState("ready"))

    asyncio.run(main())
    result = modelyard("models", "list", "--store", url)
    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if "m@1" in line]
    cells = re.split(r"\s{2,}", row.strip())  # plain columns when piped, two spaces apart
    assert cells[4:6] == ["2", "1"], cells  # replicas 2, ready 1


def test_garbage_in_the_generation_key_shows_and_plans_the_map_as_written(etcd_url: str) -> None:
    """A fresh reader never takes one bad key for "no map": `placement show` still counts every copy, and a
    dry-run rebalance plans the same moves as it would with the key intact."""
    seed(etcd_url)
    before = modelyard("placement", "rebalance", "--store", etcd_url, "--dry-run")

    async def corrupt() -> None:
        async with open_store(etcd_url) as store:
            await store.put(registry.GENERATION, b"{garbage")

    asyncio.run(corrupt())
    shown = modelyard("placement", "show", "--store", etcd_url, "--json")
    assert shown.returncode == 0, shown.stderr
    by_id = {c["id"]: c for c in json.loads(shown.stdout)["containers"]}
    assert by_id["a"]["copies"] == 6 and json.loads(shown.stdout)["generation"] == 1
    after = modelyard("placement", "rebalance", "--store", etcd_url, "--dry-run")
    assert after.returncode == 0, after.stderr
    moves = re.compile(r"^\d+ moves, .*$", re.MULTILINE)
    assert moves.findall(after.stdout) == moves.findall(before.stdout) != [], (before.stdout, after.stdout)
