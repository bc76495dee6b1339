"""`modelyard serve --workers N`: N router processes share one port; a dead one is restarted while the
others serve; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.containers.triton.server import free_port
from tests.conftest import stop_process
from tests.fleet import FleetThread, start_custom_fleet
from tests.test_failover import steady_calls
from tests.test_lazy_load import scale_model
from tests.test_up import alive


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    """One of our containers with a model ready; its in-process router is not used here."""
    thread = start_custom_fleet(tmp_path / "fleet", [scale_model(tmp_path / "models", "m", 5.0)])
    yield thread
    thread.stop()


def worker_pids(parent: int) -> list[int]:
    """Children of `parent` running `serve --workers`, read from /proc (ps cuts long lines at 80 columns)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b"--workers" in args and b"serve" in args:
            pids.append(int(entry.name))
    return pids


def ready(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return bool(client.is_server_ready())
    except InferenceServerException:  # not listening yet
        return False


def test_two_workers_share_the_port_and_stop_on_sigterm(fleet: FleetThread) -> None:
    port = free_port()
    command = [sys.executable, "-m", "modelyard", "serve", "--workers", "2", "--port", str(port)]
    secret = ["--fleet-secret-file", str(fleet.fleet.fleet_secret_file)]  # the workers call the containers
    process = subprocess.Popen([*command, "--store", fleet.fleet.store_url, *secret], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(worker_pids(process.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        pids = worker_pids(process.pid)
        tensor = grpcclient.InferInput("INPUT", [2], "FP32")
        tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
        answers = []
        for _ in range(8):  # fresh connections, which the kernel spreads over the workers
            with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                deadline = time.monotonic() + 20
                while not ready(client):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                answers.append(client.infer("m", [tensor], client_timeout=20).as_numpy("OUTPUT"))
        assert all(np.allclose(a, [5.0, 10.0]) for a in answers)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
        assert not any(alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            stop_process(process)  # type: ignore[arg-type]


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "modelyard", "serve", "--workers", "2", "--port", "0"]
    result = subprocess.run(
        [*command, "--store", str(tmp_path / "s")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "needs a fixed --port" in result.stderr


def listeners(port: int) -> int:
    """Sockets listening on `port` (each worker has its own, SO_REUSEPORT), from /proc/net/tcp and tcp6 (gRPC
    listens on 127.0.0.1 through an IPv6 socket, as ::ffff:127.0.0.1)."""
    rows = [
        row.split() for f in ("tcp", "tcp6") for row in Path(f"/proc/net/{f}").read_text().splitlines()[1:]
    ]
    return sum(1 for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A")


def test_a_killed_worker_is_restarted_while_the_others_serve(fleet: FleetThread, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "modelyard", "serve", "--workers", "2", "--port", str(port)]
    command += ["--store", fleet.fleet.store_url, "--fleet-secret-file", str(fleet.fleet.fleet_secret_file)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(worker_pids(process.pid)) < 2 or listeners(port) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        recoveries_s = []
        # The client keeps one connection, on one worker: kill both original workers in turn, so one kill
        # surely hits it (its calls then go over a new connection to a live worker). Its reconnect can race
        # the kernel closing the dead worker's socket and be reset; a client that fails calls at once
        # while it backs off (1 s) would count that second of its own waiting, not of the workers', so
        # the load waits for its connection within each call's deadline (a call already sent to the
        # killed worker still fails: nothing resends it).
        with steady_calls(f"127.0.0.1:{port}", "m", 5.0, tmp_path, wait_for_ready=True) as figures:
            for victim in worker_pids(process.pid):
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                while not (
                    len(pids := worker_pids(process.pid)) == 2 and victim not in pids and listeners(port) == 2
                ):
                    assert process.poll() is None, "the parent exited"
                    assert time.monotonic() < killed_at + 30, "the worker was not restarted"
                    time.sleep(0.05)
                recoveries_s.append(time.monotonic() - killed_at)
        print(f"2 workers again after {recoveries_s} s; client: {figures}")
        assert figures["wrong"] == 0
        # A worker killed mid-call takes that call with it (UNAVAILABLE: its connection reset); the kernel
        # hands new connections only to listening sockets, so at most the call in flight per kill fails.
        assert set(figures["failed"]) <= {"UNAVAILABLE"}, figures["failures"]
        assert sum(figures["failed"].values()) <= 2, figures["failures"]
        assert figures["calls"] > sum(figures["failed"].values())
        restarts = [line for line in log.read_text().splitlines() if "killed by SIGKILL" in line]
        assert len(restarts) == 2, log.read_text()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            stop_process(process)  # type: ignore[arg-type]


def test_workers_stop_when_their_parent_is_killed(fleet: FleetThread) -> None:
    port = free_port()
    command = [sys.executable, "-m", "modelyard", "serve", "--workers", "2", "--port", str(port)]
    command += ["--store", fleet.fleet.store_url, "--fleet-secret-file", str(fleet.fleet.fleet_secret_file)]
    process = subprocess.Popen(command, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(pids := worker_pids(process.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            stop_process(process)  # type: ignore[arg-type]
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_the_router_runs_on_uvloop_unless_told_otherwise(
    tmp_path: Path, setting: str | None, loop: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODELYARD_EVENT_LOOP"}
    if setting:
        env["MODELYARD_EVENT_LOOP"] = setting
    command = [sys.executable, "-m", "modelyard", "serve", "--store", str(tmp_path / "s"), "--port", "0"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # its first line, once it listens (the pipe closes if it dies)
        assert line.startswith("router listening on 127.0.0.1:"), line
        assert line.rstrip().endswith(f"event loop: {loop})"), line
        client = grpcclient.InferenceServerClient(line.split()[3])
        assert client.is_server_live()  # it serves on that loop
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0  # and stops on SIGTERM, as on asyncio's loop
    finally:
        stop_process(process)  # type: ignore[arg-type]
