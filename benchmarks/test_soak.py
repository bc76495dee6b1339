"""Soak: mixed unary and stream calls from a separate process (tests/faultload.py) through the router, for
10 minutes, while a container is killed (kill -9) or `modelyard placement rebalance` runs every 30 s.

Prints calls, failures by status, wrong answers, recovery times (fault -> map, containers and registry
consistent again) and the RSS of each long-lived process, with targets: 0 failed calls, 0 wrong answers,
RSS growth <= 5% from the end of the warm-up. `--quick`: ~20 s, one fault of each kind, not judged.
MODELYARD_SOAK_S sets another duration (seconds).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import EtcdServer
from tests.faultload import Loader
from tests.fleet import FleetThread
from tests.test_faults import FACTORS, converged_within, kill_container, start_fault_fleet

ROOT = Path(__file__).resolve().parents[1]
FULL_S, QUICK_S = 600.0, 20.0
FULL_PERIOD_S, QUICK_PERIOD_S = 30.0, 8.0
RSS_GROWTH_MAX = 0.05
Verdict = Callable[[str, str, str, bool], None]
KILLED = ("custom-0", "custom-1")  # custom-2 is never killed: its RSS is the containers' leak check


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture
def soak_fleet(tmp_path: Path) -> Iterator[tuple[FleetThread, EtcdServer]]:
    (tmp_path / "etcd").mkdir()
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    try:
        fleet = start_fault_fleet(tmp_path, etcd.url)
        try:
            yield fleet, etcd
        finally:
            fleet.stop()
    finally:
        etcd.stop()


def rebalance(store_url: str) -> int:
    command = ["placement", "rebalance", "--store", store_url, "--timeout", "60"]
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", *command], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if result.returncode != 0:
        print(f"  rebalance exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return result.returncode


# The soak runs for minutes: pytest-timeout's default (300 s, pyproject.toml) would end it half way.
@pytest.mark.timeout(float(os.environ.get("MODELYARD_SOAK_S", FULL_S)) + 600)
def test_soak_under_kills_and_rebalances(
    soak_fleet: tuple[FleetThread, EtcdServer], tmp_path: Path, quick: bool, verdict: Verdict
) -> None:
    fleet, etcd = soak_fleet
    duration_s = float(os.environ.get("MODELYARD_SOAK_S", QUICK_S if quick else FULL_S))
    period_s = QUICK_PERIOD_S if quick else FULL_PERIOD_S
    local = fleet.fleet
    assert etcd.process is not None
    with Loader(fleet.address, tmp_path, FACTORS, streams=True) as load:
        pids = {
            "fleet (router, agents, controller)": os.getpid(),
            "etcd": etcd.process.pid,
            "caller": load.process.pid,
        }
        kept = local.customs[[a.container.id for a in local.agents].index("custom-2")].process
        assert kept is not None
        pids["custom-2 (never killed)"] = kept.pid
        started = time.monotonic()
        kill_recovery_s: list[float] = []
        rebalance_recovery_s: list[float] = []
        rebalance_exits: list[int] = []
        baseline: dict[str, int] = {}
        events = 0
        while time.monotonic() - started < duration_s:
            # The schedule: one fault per period (a length of time, not a condition to wait for).
            next_at = started + (events + 1) * period_s / 2
            time.sleep(max(0.0, min(next_at, started + duration_s) - time.monotonic()))
            if time.monotonic() - started >= duration_s:
                break
            if not baseline:  # after the warm-up: the first half-period of load
                baseline = {name: rss_bytes(pid) for name, pid in pids.items()}
            if events % 2 == 0:
                victim = KILLED[(events // 2) % len(KILLED)]
                kill_recovery_s.append(converged_within(fleet, kill_container(fleet, victim)))
            else:
                at = time.monotonic()
                rebalance_exits.append(rebalance(etcd.url))
                rebalance_recovery_s.append(converged_within(fleet, at))
            events += 1
        final = {name: rss_bytes(pid) for name, pid in pids.items()}
        ran_s = time.monotonic() - started
    figures = load.stop()
    calls = sum(figures["calls"].values())
    failed = sum(figures["failed"].values())
    by_status = ", ".join(f"{s} {n}" for s, n in sorted(figures["failed"].items())) or "none"
    print(f"\nsoak {ran_s:.0f} s: {calls} calls ({figures['calls']}), failed by status: {by_status}")
    for failure in figures["failures"][:10]:
        print(f"  {failure}")
    verdict("failed calls", f"{failed} of {calls} ({by_status})", "0", failed == 0)
    verdict("wrong answers", str(figures["wrong"]), "0", figures["wrong"] == 0)
    for what, times in (("kill -9", kill_recovery_s), ("rebalance", rebalance_recovery_s)):
        if times:
            figure = f"{len(times)}x: median {statistics.median(times):.1f} s, max {max(times):.1f} s"
            verdict(f"recovery after {what}", figure, "<= 10 s (the calls' deadline)", max(times) <= 10)
    verdict(
        "rebalances exited 0",
        f"{rebalance_exits.count(0)} of {len(rebalance_exits)}",
        "all",
        all(code == 0 for code in rebalance_exits),
    )
    for name in pids:
        growth = final[name] / baseline[name] - 1 if baseline else 0.0
        figure = f"{baseline.get(name, 0) / 2**20:.1f} -> {final[name] / 2**20:.1f} MiB ({growth:+.1%})"
        verdict(f"RSS {name}", figure, f"<= +{RSS_GROWTH_MAX:.0%}", growth <= RSS_GROWTH_MAX)
    assert figures["wrong"] == 0, figures["failures"]
