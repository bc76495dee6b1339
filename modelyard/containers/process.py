"""Supervising what modelyard starts: child processes (Triton, our container, router workers) and
long-running tasks (agents, the controller)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM to the process's group (started with start_new_session), then SIGKILL to what lingers.

    The group matters: Triton's python backend stubs are its children and must not outlive it.
    """
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


async def wait_for_exit(process: subprocess.Popen[bytes]) -> int:
    """Waits for `process` to exit and returns its status, holding no thread: the kernel makes a pidfd
    readable when the process exits."""
    if process.returncode is not None:
        return process.returncode
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # already reaped by someone else
        return process.wait()
    try:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()  # it has exited: this only reaps it


def describe_exit(status: int) -> str:
    """`exit code 1`, or `killed by SIGKILL` (Popen's negative status)."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit code {status}"


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as servers do, with SO_REUSEADDR: connections of
    the previous listener still in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel hands out now (nothing listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server modelyard starts as a child in its own process group, on loopback ports (the attributes
    named in PORTS). `stop` ends the whole group (Triton's python stubs, MMS's JVM go with it); `restart`
    starts it again after it died, on each port if that is still free, else on a new one."""

    PORTS: tuple[str, ...] = ("port",)
    host: str
    process: subprocess.Popen[bytes] | None

    def start(self) -> None:  # each server's own, with its own start-up timeout
        raise NotImplementedError

    def new_port(self) -> int:
        return free_port(self.host)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout_s)
            self.process = None

    def restart(self) -> None:
        self.stop()
        for name in self.PORTS:
            if not port_is_free(self.host, getattr(self, name)):
                setattr(self, name, self.new_port())
        self.start()


def backoff_s(failures: int, base_s: float = 0.5, max_s: float = 30.0) -> float:
    """Exponential backoff: base_s after the first failure, doubling up to max_s."""
    return min(max_s, base_s * 2 ** max(0, failures - 1))


async def restart_on_failure(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    base_s: float = 0.5,
    max_s: float = 30.0,
    stable_s: float = 60.0,
) -> None:
    """Runs `run()` until cancelled, starting it again (with backoff) whenever it raises or returns.

    The backoff starts over once a run has lasted `stable_s`: a crash an hour after the last one is not
    a crash loop.
    """
    failures = 0
    while True:
        started = time.monotonic()
        crash: Exception | None = None
        try:
            await run()
        except Exception as exc:
            crash = exc
        failures = 1 if time.monotonic() - started >= stable_s else failures + 1
        delay = backoff_s(failures, base_s, max_s)
        log.error(
            "%s %s; restarting it in %.1f s (restart %d)",
            name,
            "stopped" if crash is None else f"crashed ({type(crash).__name__}: {crash})",
            delay,
            failures,
            exc_info=crash,  # a crash is a bug: its traceback says where
        )
        await asyncio.sleep(delay)
