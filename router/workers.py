"""`modelyard serve --workers N`: N router processes on one port (SO_REUSEPORT; the kernel spreads
connections across them). Python routes one call at a time per process, so processes scale the router on a
multi-core machine; each follows the store on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def run_workers(
    store_url: str,
    host: str,
    port: int,
    workers: int,
    metrics_port: int | None = None,
    *,
    default_deadline_s: float | None = None,
) -> int:
    """Starts the workers, forwards SIGINT/SIGTERM to them, and returns when all have exited.

    With `metrics_port`, worker i serves /metrics on metrics_port + i (each process has its own counters).
    """
    command = [sys.executable, "-m", "modelyard", "serve", "--workers", "1", "--store", store_url]
    command += ["--host", host, "--port", str(port)]
    if default_deadline_s is not None:
        command += ["--default-deadline-s", str(default_deadline_s)]
    children = [
        subprocess.Popen(
            [*command, *(["--metrics-port", str(metrics_port + i)] if metrics_port is not None else [])],
            start_new_session=True,
        )
        for i in range(workers)
    ]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(child.poll() is None for child in children):
            if not stopping and any(child.poll() is not None for child in children):
                # One worker died: stop the rest, so a supervisor restarts the whole set.
                forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    return 0 if stopping else 1
