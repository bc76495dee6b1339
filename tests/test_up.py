"""`modelyard up` as a user runs it: a real process, its printed example call, and Ctrl-C."""

from __future__ import annotations

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

from backends.triton_server import free_port
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


def test_up_serves_the_printed_example_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    require_triton()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "up", "--port", str(port)],  # the default, relative ./.modelyard
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not any("press Ctrl-C" in line for line in output):
            assert time.monotonic() < deadline, "modelyard up did not become ready:\n" + "".join(output)
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, "modelyard up exited early:\n" + "".join(output)
            output.append(line)
        text = "".join(output)
        assert f"router ready on 127.0.0.1:{port}" in text
        pids = [int(m) for m in re.findall(r"^(?:triton|custom)-\d+\s+\S+\s+(\d+)", text, re.MULTILINE)]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)

        example = output[output.index("try it:\n") + 1].strip()
        result = subprocess.run(example, shell=True, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        printed = np.array([float(v) for v in re.findall(r"-?\d+\.?\d*", result.stdout)])
        np.testing.assert_allclose(printed, np.array([1, 2, 3]) * 2.0)

        os.kill(process.pid, signal.SIGINT)
        assert process.wait(60) == 0
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "Triton processes outlived modelyard up"
        rest = []
        while (line := lines.get(timeout=10)) != "":
            rest.append(line)
        assert "stopped" in "".join(rest)
    finally:
        if process.poll() is None:
            stop_process(process)  # type: ignore[arg-type]


def test_up_on_a_busy_port_fails_with_one_clear_line(tmp_path: Path) -> None:
    require_triton()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "modelyard", "up", "--port", str(port), "--workdir", str(tmp_path / "f")],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
