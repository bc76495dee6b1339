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


# -- summaries, pages and filters (issue 30: 100k model versions) -------------------------------------------


def test_show_prints_the_controllers_summary_and_all_reads_the_fleet_now(etcd_url: str) -> None:
    """A summary in the store describing another fleet (2 models): show prints it, not the store's 6 models,
    and says how old it is; --all reads the 6."""
    from modelyard.placement.registry import Fleet
    from modelyard.placement.summary import SUMMARY, summarize

    seed(etcd_url)
    other = Fleet.of(
        models=[ModelVersion("p", "1", memory_bytes=GiB), ModelVersion("q", "1", memory_bytes=GiB)],
        containers=[Container("a", "x:1", memory_bytes=64 * GiB)],
        assignments={"p@1": ["a"], "q@1": ["a"]},
    )

    async def put_summary() -> None:
        async with open_store(etcd_url) as store:
            await store.put(SUMMARY, summarize(other, writer="controller t", now=time.time()).to_json())

    asyncio.run(put_summary())
    result = modelyard("placement", "show", "--store", etcd_url)
    assert result.returncode == 0, result.stderr
    assert "2 models, 2 copies on 1 live containers" in result.stdout
    assert "copies by state: 2 assigned, 0 loading, 0 ready" in result.stdout
    assert "summary written by controller t" in result.stderr
    everything = modelyard("placement", "show", "--store", etcd_url, "--all")
    assert "6 models, 6 copies on 2 live containers" in everything.stdout


def test_show_summary_lists_the_fullest_containers_first_and_pages_the_rest(etcd_url: str) -> None:
    seed(etcd_url)
    result = modelyard("placement", "show", "--store", etcd_url, "--limit", "1")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("a ", "b "))]
    assert [row.split()[0] for row in rows] == ["a"]  # a holds 6 copies, b none
    assert "1 more containers" in result.stdout
    second = modelyard("placement", "show", "--store", etcd_url, "--limit", "1", "--offset", "1")
    assert [line.split()[0] for line in second.stdout.splitlines() if line.startswith(("a ", "b "))] == ["b"]


def test_show_filters_list_the_matching_copies_a_page_at_a_time(etcd_url: str) -> None:
    seed(etcd_url)

    async def one_ready() -> None:
        async with open_store(etcd_url) as store:
            await registry.put_copy_state(store, "a", "m0@1", CopyState("ready"))

    asyncio.run(one_ready())
    ready = modelyard("placement", "show", "--store", etcd_url, "--state", "ready", "-o", "json")
    assert json.loads(ready.stdout)["copies"] == [
        {"model": "m0@1", "container": "a", "state": "ready", "budget_bytes": GiB}
    ]
    page = modelyard(
        "placement", "show", "--store", etcd_url, "--container", "a", "--state", "assigned", "--limit", "2"
    )
    assert page.returncode == 0, page.stderr
    assert "2 of 5 matching copies" in page.stdout and "m1@1" in page.stdout and "m3@1" not in page.stdout
    assert modelyard("placement", "show", "--store", etcd_url, "--container", "b").stdout.count("@1") == 0


def register(url: str, models: list[ModelVersion]) -> None:
    async def main() -> None:
        async with open_store(url) as store:
            for model in models:
                await registry.register_model(store, model)

    asyncio.run(main())


def test_models_list_pages_with_a_continue_token(store_url: str) -> None:
    register(store_url, [ModelVersion(f"m{i}", "1", memory_bytes=GiB) for i in range(5)])

    def listed(*args: str) -> tuple[list[str], str]:
        result = modelyard("models", "list", "--store", store_url, *args)
        assert result.returncode == 0, result.stderr
        keys = [line.split()[0] for line in result.stdout.splitlines() if "@" in line.split()[0]]
        return keys, result.stdout.splitlines()[-1]

    first, tail = listed("--limit", "2")
    assert first == ["m0@1", "m1@1"] and "next page: --after m1@1" in tail
    second, tail = listed("--limit", "2", "--after", "m1@1")
    assert second == ["m2@1", "m3@1"] and "--after m3@1" in tail
    last, tail = listed("--limit", "2", "--after", "m3@1")
    assert last == ["m4@1"] and "next page" not in tail
    everything = json.loads(modelyard("models", "list", "--store", store_url, "-o", "json").stdout)
    assert [m["name"] for m in everything] == [f"m{i}" for i in range(5)]


def test_models_list_filters_by_tenant_container_and_state(tmp_path: Path) -> None:
    url = str(tmp_path / "store")

    async def main() -> None:
        async with open_store(url) as store:
            await registry.register_model(store, ModelVersion("pub", "1", memory_bytes=GiB))
            await registry.register_model(
                store, ModelVersion("acme", "1", memory_bytes=GiB, tenants=("acme",))
            )
            await registry.register_model(
                store, ModelVersion("zeta", "1", memory_bytes=GiB, tenants=("zeta",))
            )
            await registry.register_container(store, Container("a", "x:1", memory_bytes=64 * GiB))
            await registry.write_shard_map(store, {"pub@1": ["a"], "acme@1": ["a"]}, expected_generation=0)
            await registry.put_copy_state(store, "a", "acme@1", CopyState("ready"))

    asyncio.run(main())

    def keys(*args: str) -> list[str]:
        result = modelyard("models", "list", "--store", url, *args)
        assert result.returncode == 0, result.stderr
        return [line.split()[0] for line in result.stdout.splitlines() if "@1" in line.split()[0]]

    assert keys("--tenant", "acme") == ["acme@1", "pub@1"]
    assert keys("--container", "a", "--state", "ready") == ["acme@1"]
    assert keys("--state", "assigned") == ["pub@1"]
    assert keys("--state", "none") == ["zeta@1"]
