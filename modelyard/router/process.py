"""The router as a child process of `modelyard up` (`modelyard serve`), as a deployment runs it.

In its own process the data path keeps its event loop to itself: a bulk import, 100k loads by the agents and
the controller's planning run in `up`'s process and cannot hold a warm call up behind them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.containers.process import ServerProcess, free_port, port_is_free
from modelyard.router.server import RouterStartError

LISTENING = re.compile(r"^router listening on (\S+):(\d+) ")
REST = re.compile(r"^router REST on (\S+):(\d+)$")


class RouterProcess(ServerProcess):
    PORTS = ("port",)

    def __init__(
        self,
        log_path: Path,
        store_url: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        http_port: int | None = None,
        metrics_port: int | None = None,
        fleet_secret_file: Path | None = None,
        drain_s: float = 2.0,
    ) -> None:
        """`port` / `http_port` 0: any free port (the one the router took is read from its log);
        `http_port` None: no REST; `metrics_port` None: no /metrics, 0: a free one."""
        self.log_path = log_path
        self.store_url = store_url
        self.host = host
        self.port = port
        self.http_port = http_port
        self.metrics_port = free_port(host) if metrics_port == 0 else metrics_port
        self.fleet_secret_file = fleet_secret_file
        self.drain_s = drain_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def rest_address(self) -> str | None:
        return None if self.http_port is None else f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "modelyard", "serve", "--store", self.store_url]
        command += ["--host", self.host, "--port", str(self.port), "--drain-s", str(self.drain_s)]
        if self.http_port is not None:
            command += ["--http-port", str(self.http_port)]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port)]
        if self.fleet_secret_file is not None:
            command += ["--fleet-secret-file", str(self.fleet_secret_file)]
        return command

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts `modelyard serve` and returns once it listens and has read the store (its gRPC health
        says SERVING: at 100k models that takes seconds); raises RouterStartError with the router's last
        words if it exits first."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = self._lines_since(offset)
            if self.process.poll() is not None:
                said = [line for line in lines if line.startswith("error: ")] or lines[-1:]
                raise RouterStartError(
                    said[-1].removeprefix("error: ")
                    if said
                    else f"the router exited ({self.process.returncode})"
                )
            if self._listening(lines) and self._serving():
                return
            time.sleep(0.05)  # its log and its health are the only words it gives of having started
        self.stop()
        raise RouterStartError(f"the router did not start within {timeout_s:.0f} s; see {self.log_path}")

    def _serving(self) -> bool:
        """Whether the router's gRPC health (overall) says SERVING: its routing table is loaded."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def _lines_since(self, offset: int) -> list[str]:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").splitlines()

    def _listening(self, lines: list[str]) -> bool:
        """Takes the ports the router reports; whether it listens (and serves REST, if asked) yet."""
        grpc_port = rest_port = None
        for line in lines:
            if match := LISTENING.match(line):
                grpc_port = int(match.group(2))
            elif match := REST.match(line):
                rest_port = int(match.group(2))
        if grpc_port is None or (self.http_port is not None and rest_port is None):
            return False
        self.port = grpc_port
        if rest_port is not None:
            self.http_port = rest_port
        return True

    def restart(self) -> None:
        """Starts it again after it died: on its ports if they are still free, else on new ones."""
        self.stop()
        if self.http_port is not None and not port_is_free(self.host, self.http_port):
            self.http_port = 0
        if self.metrics_port is not None and not port_is_free(self.host, self.metrics_port):
            self.metrics_port = free_port(self.host)
        super().restart()
