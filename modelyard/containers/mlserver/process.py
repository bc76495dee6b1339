"""Starting and stopping an MLServer (Seldon's KServe v2 server, 1.7) as a multi-model container process.

`mlserver start WORKDIR` with WORKDIR/settings.json: no model loaded at startup, its own repository
folder (the agent writes one model-settings.json per version there and loads it over the repository
API), gRPC and HTTP on loopback ports, models loaded in the server process itself (parallel_workers 0:
one process to measure and supervise), and its Prometheus endpoint off (metrics come from the router).
Measured on this machine: live ~1 s after exec with a warm page cache, a scikit-learn load ~0.6 s.

MLServer has no way to require the fleet secret on calls: bind it to loopback (or a pod's localhost) and
let only the router and the agent reach it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelyard.containers.process import ServerProcess, free_port


class MLServerStartError(RuntimeError):
    pass


def mlserver_command() -> list[str]:
    """The `mlserver` entry point of this Python environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "mlserver"
    if local.exists():
        return [str(local)]
    found = shutil.which("mlserver")
    if found is None:
        raise MLServerStartError("mlserver is not installed: pip install 'modelyard[mlserver]' (./dev does)")
    return [found]


class MLServerProcess(ServerProcess):
    PORTS = ("grpc_port", "http_port")

    def __init__(
        self,
        workdir: Path,
        memory_bytes: int,
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.repository = self.workdir / "models"
        self.memory_bytes = memory_bytes
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mlserver.log"
        self.started_in_s = 0.0  # how long the last start took until MLServer was live

    @property
    def address(self) -> str:
        """The gRPC address (KServe v2): what the router and the agent use."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _write_settings(self) -> None:
        settings = {
            "debug": False,
            "host": self.host,
            "grpc_port": self.grpc_port,
            "http_port": self.http_port,
            "metrics_endpoint": None,
            "parallel_workers": 0,
            "load_models_at_startup": False,
            "model_repository_root": str(self.repository),
        }
        (self.workdir / "settings.json").write_text(json.dumps(settings, indent=2))

    def start(self, timeout_s: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Models it held before a restart are not its to keep: the agent loads what the map assigns.
        shutil.rmtree(self.repository, ignore_errors=True)
        self.repository.mkdir()
        self._write_settings()
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*mlserver_command(), "start", str(self.workdir)],
                cwd=self.workdir,  # where MLServer puts its own scratch files
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise MLServerStartError(f"mlserver exited ({self.process.returncode}): {tail}")
                try:
                    if stub.ServerLive(pb.ServerLiveRequest(), timeout=1).live:
                        self.started_in_s = time.monotonic() - started
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        self.stop()
        raise MLServerStartError(f"mlserver not live within {timeout_s:.0f} s; log: {self.log_path}")
