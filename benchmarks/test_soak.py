"""Soak: mixed unary and stream calls from a separate process (tests/faultload.py) through the router, for
10 minutes, while a container is killed (kill -9) or `modelyard placement rebalance` runs every 30 s.

Prints calls, failures by status, wrong answers, recovery times (fault -> map, containers and registry
consistent again) and the RSS of each long-lived process, with targets: 0 failed calls, 0 wrong answers,
RSS growth <= 5% after the warm-up; a full run fails on any of them. RSS is read at every fault (every 15 s
in a full run): a process's growth is its highest reading in the last quarter of the run over its highest
in the first quarter after the warm-up, peak against peak, so a leak shows and one garbage collector's
sawtooth does not (etcd's Go heap swings 1-2 MiB of its ~28 MiB between its collections; a leak raises
every peak). The single first-to-last figure is printed beside it. etcd runs with periodic
auto-compaction as deploy/k8s/etcd.yaml runs it, with a retention short enough that it compacts during
the run, and the run checks that it did.
`--quick`: ~20 s, one fault of each kind, printed, not judged (wrong answers still fail it).
MODELYARD_SOAK_S sets another duration (seconds).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelyard.memory import freeze_long_lived_objects
from tests.conftest import EtcdServer
from tests.faultload import Loader
from tests.fleet import FleetThread
from tests.test_faults import FACTORS, converged_within, kill_container, start_fault_fleet

ROOT = Path(__file__).resolve().parents[1]
FULL_S, QUICK_S = 600.0, 20.0
FULL_PERIOD_S, QUICK_PERIOD_S = 30.0, 8.0
RSS_GROWTH_MAX = 0.05
# deploy/k8s/etcd.yaml keeps 1 h of history; the soak keeps a tenth of its duration (1 min in the full run,
# at least 5 s), so that etcd compacts about ten times while it runs.
COMPACTIONS = 10


def soak_duration_s(quick: bool) -> float:
    return float(os.environ.get("MODELYARD_SOAK_S", QUICK_S if quick else FULL_S))


def retention(duration_s: float) -> str:
    """etcd's --auto-compaction-retention for a soak of `duration_s`."""
    return f"{max(5, int(duration_s / COMPACTIONS))}s"


Verdict = Callable[[str, str, str, bool], None]
KILLED = ("custom-0", "custom-1")  # custom-2 is never killed: its RSS is the containers' leak check


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _etcdctl(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("etcdctl")
    assert binary is not None, "etcdctl is not installed (Debian's etcd-client package)"
    endpoint = f"--endpoints=http://127.0.0.1:{etcd.client_port}"
    return subprocess.run([binary, endpoint, *args], capture_output=True, text=True, timeout=30)


def etcd_revision(etcd: EtcdServer) -> int:
    result = _etcdctl(etcd, "endpoint", "status", "-w", "json")
    assert result.returncode == 0, result.stderr
    revision: int = json.loads(result.stdout)[0]["Status"]["header"]["revision"]
    return revision


def etcd_raft_index(etcd: EtcdServer) -> int:
    result = _etcdctl(etcd, "endpoint", "status", "-w", "json")
    assert result.returncode == 0, result.stderr
    index: int = json.loads(result.stdout)[0]["Status"]["raftIndex"]
    return index


def compacted_past(etcd: EtcdServer, revision: int) -> bool:
    """Whether etcd has compacted away `revision` (reading at it is refused)."""
    result = _etcdctl(etcd, "get", "--rev", str(revision), "/")
    return result.returncode != 0 and "compacted" in result.stderr


@pytest.fixture
def soak_fleet(tmp_path: Path, quick: bool) -> Iterator[tuple[FleetThread, EtcdServer]]:
    # The fleet's process keeps its fleet view out of the collector's walks, as `modelyard up`, `serve`,
    # `controller` and `agent` do (modelyard/memory.py): its RSS growth is judged with that on.
    freeze_long_lived_objects()
    (tmp_path / "etcd").mkdir()
    etcd = EtcdServer(tmp_path / "etcd", compaction_retention=retention(soak_duration_s(quick)))
    etcd.start()
    try:
        fleet = start_fault_fleet(tmp_path, etcd.url)
        try:
            yield fleet, etcd
        finally:
            fleet.stop()
    finally:
        etcd.stop()
        freeze_long_lived_objects(None)
        gc.unfreeze()


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
    duration_s = soak_duration_s(quick)
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
        trajectory: list[dict[str, int]] = []  # every process's RSS at every fault, from the warm-up on
        warm_revision = 0
        events = 0
        while time.monotonic() - started < duration_s:
            # The schedule: one fault per period (a length of time, not a condition to wait for).
            next_at = started + (events + 1) * period_s / 2
            time.sleep(max(0.0, min(next_at, started + duration_s) - time.monotonic()))
            if time.monotonic() - started >= duration_s:
                break
            trajectory.append({name: rss_bytes(pid) for name, pid in pids.items()})
            if not baseline:  # after the warm-up: the first half-period of load
                baseline = trajectory[0]
                warm_revision = etcd_revision(etcd)
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
        compacted = bool(baseline) and compacted_past(etcd, warm_revision)
        last_revision = etcd_revision(etcd)
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
        steps = " ".join(f"{sample[name] / 2**20:.1f}" for sample in trajectory)
        print(f"  RSS of {name} (MiB) at each fault, then at the end: {steps} {final[name] / 2**20:.1f}")
    print(f"  etcd raft index at the end: {etcd_raft_index(etcd)}")
    growths = {}
    readings = [*trajectory, final]
    quarter = max(1, len(readings) // 4)
    for name in pids:
        first = max(sample[name] for sample in readings[:quarter])
        last = max(sample[name] for sample in readings[-quarter:])
        growth = growths[name] = last / first - 1 if baseline else 0.0
        single = final[name] / baseline[name] - 1 if baseline else 0.0
        figure = (
            f"peak {first / 2**20:.1f} -> {last / 2**20:.1f} MiB ({growth:+.1%}; first reading to last "
            f"{baseline.get(name, 0) / 2**20:.1f} -> {final[name] / 2**20:.1f} MiB, {single:+.1%})"
        )
        verdict(f"RSS {name}", figure, f"<= +{RSS_GROWTH_MAX:.0%}", growth <= RSS_GROWTH_MAX)
    verdict(
        "etcd auto-compaction during the run",
        f"revision {warm_revision} after the warm-up "
        f"{'compacted' if compacted else 'still readable'} at the end (revision {last_revision})",
        "compacted",
        compacted,
    )
    assert figures["wrong"] == 0, figures["failures"]
    if quick:
        return  # a few seconds of load: figures printed, not judged
    assert failed == 0, f"{failed} failed calls ({by_status}): {figures['failures'][:10]}"
    grown = {name: f"{growth:+.1%}" for name, growth in growths.items() if growth > RSS_GROWTH_MAX}
    assert not grown, f"RSS grew more than {RSS_GROWTH_MAX:.0%} after the warm-up: {grown}"
    assert compacted, "etcd never compacted during the soak: the run did not test what it claims"
