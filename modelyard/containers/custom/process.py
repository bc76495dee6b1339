"""Starting and stopping our own container (`modelyard container`) as a process on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelyard.containers.process import ServerProcess, free_port
from modelyard.fleet_secret import FLEET_SECRET_HEADER


class ContainerStartError(RuntimeError):
    pass


class CustomContainerProcess(ServerProcess):
    def __init__(
        self,
        workdir: Path,
        memory_bytes: int,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        fleet_secret_file: Path | None = None,
        model_store: Path | None = None,
    ):
        """`fleet_secret_file`: the container refuses calls without its secret; `model_store`: it loads
        models only from inside this directory."""
        self.fleet_secret_file = fleet_secret_file
        self.model_store = model_store
        self.workdir = workdir.resolve()
        self.memory_bytes = memory_bytes
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "container.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        command = [
            sys.executable,
            "-m",
            "modelyard",
            "container",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.fleet_secret_file is not None:
            command += ["--fleet-secret-file", str(self.fleet_secret_file)]
        if self.model_store is not None:
            command += ["--model-store", str(self.model_store)]
        secret = self.fleet_secret_file.read_text().strip() if self.fleet_secret_file else ""
        metadata = ((FLEET_SECRET_HEADER, secret),) if secret else None
        self.process = subprocess.Popen(
            [*command, "--memory-bytes", str(self.memory_bytes)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    log_tail = self.log_path.read_text()[-2000:]
                    raise ContainerStartError(
                        f"modelyard container exited ({self.process.returncode}): {log_tail}"
                    )
                try:
                    if stub.ServerLive(pb.ServerLiveRequest(), timeout=1, metadata=metadata).live:
                        return
                except grpc.RpcError:
                    time.sleep(0.05)
        self.stop()
        raise ContainerStartError(
            f"modelyard container not live within {timeout_s:.0f} s; log: {self.log_path}"
        )
