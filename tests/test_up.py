"""`modelyard up` as a user runs it: a real process, its printed example call, and Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from modelyard.containers.triton.server import free_port
from tests.conftest import require_triton, stop_process


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited but is not yet reaped; /proc tells.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def read_lines(stream, sink: queue.Queue[str]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        sink.put(line)
    sink.put("")


class Up:
    """`modelyard up` as a real process in `cwd`, its output read line by line."""

    def __init__(self, cwd: Path, port: int, *options: str, http_port: int | None = None) -> None:
        self.http_port = free_port() if http_port is None else http_port
        self.process = subprocess.Popen(
            # The default workdir, relative: ./.modelyard
            [
                sys.executable,
                "-m",
                "modelyard",
                "up",
                "--port",
                str(port),
                "--http-port",
                str(self.http_port),
                *options,
            ],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=read_lines, args=(self.process.stdout, self.lines), daemon=True).start()

    def read_until(self, text: str, timeout_s: float) -> str:
        """Reads output until a line containing `text`; returns that line."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline, f"no {text!r} from modelyard up:\n" + "".join(self.output)
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, "modelyard up exited early:\n" + "".join(self.output)
            self.output.append(line)
            if text in line:
                return line

    def ctrl_c(self, timeout_s: float = 60.0) -> tuple[int, str]:
        """SIGINT, as Ctrl-C sends; the exit status and all output after it (read until the pipe closes)."""
        os.kill(self.process.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        rest: list[str] = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line == "":
                break
            rest.append(line)
        tail = "".join(rest)
        assert time.monotonic() < deadline, f"modelyard up still running after Ctrl-C:\n{tail}"
        return self.process.wait(10), tail

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process)  # type: ignore[arg-type]


def run_example(example: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(example, shell=True, capture_output=True, text=True, timeout=60)


def test_up_serves_the_printed_example_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    require_triton()
    port = free_port()
    up = Up(tmp_path, port)
    try:
        up.read_until("press Ctrl-C", 180)
        text = "".join(up.output)
        assert f"router ready on 127.0.0.1:{port}" in text
        assert f"router REST on 127.0.0.1:{up.http_port}" in text
        pids = [int(m) for m in re.findall(r"^(?:triton|custom)-\d+\s+\S+\s+(\d+)", text, re.MULTILINE)]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        router_pid = re.search(r"^router ready on .* pid (\d+)\)$", text, re.MULTILINE)
        assert router_pid is not None, text  # the router runs in a process of its own
        pids.append(int(router_pid.group(1)))
        assert alive(pids[-1]) and pids[-1] != up.process.pid

        example = up.output[up.output.index("try it:\n") + 1].strip()
        result = run_example(example)
        assert result.returncode == 0, result.stderr
        printed = np.array([float(v) for v in re.findall(r"-?\d+\.?\d*", result.stdout)])
        np.testing.assert_allclose(printed, np.array([1, 2, 3]) * 2.0)
        curl = up.output[up.output.index("try it:\n") + 2].strip()
        assert curl.startswith(f"curl -s http://127.0.0.1:{up.http_port}/v2/models/scale/infer"), curl
        answer = json.loads(run_example(curl).stdout)
        assert answer["outputs"][0]["data"] == [2.0, 4.0, 6.0]

        status, rest = up.ctrl_c()
        assert status == 0, rest
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "containers or the router outlived modelyard up"
        assert rest.splitlines()[-1] == "stopped", rest
    finally:
        up.stop()


def test_up_restarts_a_killed_triton_and_serves_again_within_30_s(tmp_path: Path) -> None:
    require_triton()
    up = Up(tmp_path, free_port())
    try:
        up.read_until("press Ctrl-C", 180)
        text = "".join(up.output)
        holder = re.search(r"^model scale@1\s+ready on (triton-\d+)$", text, re.MULTILINE)
        assert holder is not None, text
        name = holder.group(1)
        row = re.search(rf"^{name}\s+\S+\s+(\d+)", text, re.MULTILINE)
        assert row is not None
        pid = int(row.group(1))
        example = up.output[up.output.index("try it:\n") + 1].strip()

        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while (result := run_example(example)).returncode != 0:
            assert time.monotonic() - killed_at < 30, "scale not served again within 30 s:\n" + result.stderr
            time.sleep(0.2)
        printed = np.array([float(v) for v in re.findall(r"-?\d+\.?\d*", result.stdout)])
        np.testing.assert_allclose(printed, np.array([1, 2, 3]) * 2.0)

        restart = up.read_until(
            f"container {name} (pid {pid}) killed by SIGKILL", 30 - (time.monotonic() - killed_at)
        )
        assert time.monotonic() - killed_at < 30
        new_pid = re.search(r"as pid (\d+)", restart)
        assert new_pid is not None and alive(int(new_pid.group(1))), restart

        status, rest = up.ctrl_c()
        assert status == 0 and rest.splitlines()[-1] == "stopped", rest
        deadline = time.monotonic() + 15
        while alive(int(new_pid.group(1))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(int(new_pid.group(1))), "the restarted Triton outlived modelyard up"
    finally:
        up.stop()


def test_up_on_a_busy_port_fails_with_one_clear_line(tmp_path: Path) -> None:
    require_triton()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelyard",
                "up",
                "--port",
                str(port),
                "--http-port",
                "0",
                "--workdir",
                str(tmp_path / "f"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_restarts_a_killed_router_process_on_its_port_and_logs_it(tmp_path: Path) -> None:
    require_triton()
    port = free_port()
    up = Up(tmp_path, port, "--containers", "1", "--custom-containers", "0")
    try:
        up.read_until("press Ctrl-C", 180)
        text = "".join(up.output)
        found = re.search(r"^router ready on .* pid (\d+)\)$", text, re.MULTILINE)
        assert found is not None, text
        pid = int(found.group(1))
        example = up.output[up.output.index("try it:\n") + 1].strip()

        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        restart = up.read_until(f"the router process (pid {pid}) killed by SIGKILL; started again", 30)
        new_pid = int(re.search(r"as pid (\d+) on 127.0.0.1:(\d+)", restart).group(1))  # type: ignore[union-attr]
        assert new_pid != pid and alive(new_pid)
        assert f"on 127.0.0.1:{port}" in restart  # the port users were given still serves
        result = run_example(example)
        assert result.returncode == 0, result.stderr
        printed = np.array([float(v) for v in re.findall(r"-?\d+\.?\d*", result.stdout)])
        np.testing.assert_allclose(printed, np.array([1, 2, 3]) * 2.0)
        print(f"\nrouter killed: serving again after {time.monotonic() - killed_at:.1f} s")
        command = [sys.executable, "-m", "modelyard", "logs", "router"]
        logs = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert logs.stdout.count(f"router listening on 127.0.0.1:{port} ") == 2, logs.stdout

        status, rest = up.ctrl_c()
        assert status == 0 and rest.splitlines()[-1] == "stopped", rest
        assert not alive(new_pid), "the restarted router outlived modelyard up"
    finally:
        up.stop()
