"""`modelyard serve --workers N`: N router processes on one port (SO_REUSEPORT; the kernel spreads
connections across them). Python routes one call at a time per process, so processes scale the router on a
multi-core machine; each follows the store on its own.

The parent supervises: a worker that dies is started again (with backoff) while the others keep serving;
SIGTERM or SIGINT to the parent drains and stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time

from modelyard.containers.process import backoff_s, describe_exit

log = logging.getLogger(__name__)

STABLE_S = 60.0  # a worker that ran this long before dying starts its backoff over
PR_SET_PDEATHSIG = 1  # prctl(2)
STOP_MARGIN_S = 5.0  # past the workers' drain period, before they are killed


def run_workers(
    store_url: str,
    host: str,
    port: int,
    workers: int,
    metrics_port: int | None = None,
    *,
    default_deadline_s: float | None = None,
    drain_s: float | None = None,
) -> int:
    """Runs the workers until SIGINT/SIGTERM, restarting any that dies; returns the exit status (0).

    With `metrics_port`, worker i serves /metrics on metrics_port + i (each process has its own counters).
    """
    command = [sys.executable, "-m", "modelyard", "serve", "--workers", "1", "--store", store_url]
    command += ["--host", host, "--port", str(port)]
    if default_deadline_s is not None:
        command += ["--default-deadline-s", str(default_deadline_s)]
    if drain_s is not None:
        command += ["--drain-s", str(drain_s)]
    commands = [
        [*command, *(["--metrics-port", str(metrics_port + i)] if metrics_port is not None else [])]
        for i in range(workers)
    ]
    return asyncio.run(_supervise_all(commands, drain_s))


async def _supervise_all(commands: list[list[str]], drain_s: float | None) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    running: dict[int, asyncio.subprocess.Process] = {}
    tasks = [asyncio.create_task(_supervise(i, c, running, stopping)) for i, c in enumerate(commands)]
    await stopping.wait()
    for process in running.values():
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # each drains its calls in flight, then exits
    grace_s = (drain_s if drain_s is not None else 10.0) + STOP_MARGIN_S
    _, late = await asyncio.wait(tasks, timeout=grace_s)
    for process in running.values():
        if process.returncode is None:
            log.warning("router worker pid %d did not stop within %.0f s; killing it", process.pid, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    if late:
        await asyncio.wait(late, timeout=STOP_MARGIN_S)
    return 0


def _stop_with_parent() -> None:
    """In the worker before it runs: SIGTERM (a drain) when the parent dies, even by SIGKILL (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _supervise(
    slot: int, command: list[str], running: dict[int, asyncio.subprocess.Process], stopping: asyncio.Event
) -> None:
    """Keeps worker `slot` running until `stopping`; returns once its last process has exited."""
    failures = 0
    while not stopping.is_set():
        process = await asyncio.create_subprocess_exec(
            *command, start_new_session=True, preexec_fn=_stop_with_parent
        )
        running[slot] = process
        if stopping.is_set():  # the signal came while it started: it missed the parent's SIGTERM
            process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        status = await process.wait()
        if stopping.is_set():
            return
        failures = 1 if time.monotonic() - started >= STABLE_S else failures + 1
        delay_s = backoff_s(failures)
        log.warning(
            "router worker %d (pid %d) %s; restarting it in %.1f s",
            slot,
            process.pid,
            describe_exit(status),
            delay_s,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await stopping.wait()
