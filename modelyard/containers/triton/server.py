"""Starting and stopping a real `tritonserver` process: the CPU build bundled in the nvidia-pytriton wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from modelyard.containers.process import ServerProcess, free_port
from modelyard.fleet_secret import FLEET_SECRET_HEADER, FLEET_SECRET_KEY
from modelyard.grpc_options import MIN_PING_INTERVAL_MS

# Every gRPC protocol Triton 2.51 can restrict (`tritonserver --help`): a caller without the secret gets
# nothing (UNAVAILABLE), not even liveness or grpc.health.v1 (our readiness check below sends the header;
# on Kubernetes, whose gRPC probes send no header, deploy/ leaves `health` open).
RESTRICTED_PROTOCOLS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
INSTALL_HINT = (
    "install it with: pip install 'modelyard[triton]' (the nvidia-pytriton wheel bundles tritonserver)"
)


class TritonNotInstalled(RuntimeError):
    """The tritonserver binary or its python backend is not installed."""


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready in time."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled tritonserver and the python backend pieces for this interpreter live."""

    binary: Path
    library_dir: Path
    python_backend_dir: Path
    stub: Path

    @classmethod
    def find(cls) -> TritonInstall:
        site = Path(sysconfig.get_paths()["purelib"])
        root = site / "pytriton" / "tritonserver"
        binary = root / "bin" / "tritonserver"
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
        backend = root / "backends" / "python"
        for path in (binary, stub, backend / "libtriton_python.so"):
            if not path.exists():
                raise TritonNotInstalled(f"{path} is missing; {INSTALL_HINT}")
        return cls(binary, site / "nvidia_pytriton.libs", backend, stub)

    def backend_directory(self, into: Path) -> Path:
        """A --backend-directory whose python/ holds the backend and the stub matching this Python."""
        python_dir = into / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in (
            self.python_backend_dir / "libtriton_python.so",
            self.python_backend_dir / "triton_python_backend_utils.py",
            self.stub,
        ):
            target = python_dir / source.name
            if not target.exists():
                shutil.copy2(source, target)
        return into


class TritonServer(ServerProcess):
    """One tritonserver process on loopback, explicit model control, CPU only."""

    PORTS = ("grpc_port",)

    def __init__(
        self,
        workdir: Path,
        *,
        grpc_port: int | None = None,
        host: str = "127.0.0.1",
        fleet_secret: str | None = None,
    ) -> None:
        """`fleet_secret`: every gRPC call must carry it (restricted protocols). Triton 2.51 has no
        gRPC message-size option (it takes up to 2 GiB); the router in front bounds what reaches it."""
        self.fleet_secret = fleet_secret
        self.workdir = workdir.resolve()  # tritonserver runs in it: every path it gets must be absolute
        self.repository = self.workdir / "repository"
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "tritonserver.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        command, env = self.command(), self.environment()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout_s)

    def environment(self) -> dict[str, str]:
        """The environment tritonserver runs in: the bundled libraries and this interpreter's."""
        install = TritonInstall.find()
        env = dict(os.environ)
        # The bundled libraries, and this interpreter's libpython for the python backend stub.
        python_libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.library_dir), python_libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The python backend stub runs `python` models with the interpreter found first on PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def command(self) -> list[str]:
        """The tritonserver command line (run in `workdir`)."""
        install = TritonInstall.find()
        backends = install.backend_directory(self.workdir / "backends")
        command = [
            str(install.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--disable-auto-complete-config",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            # Routers ping their connections every second or two while calls are in flight, to notice a
            # container that went silent (grpc_options.py); gRPC's default would answer that with GOAWAY.
            f"--grpc-http2-min-recv-ping-interval-without-data={MIN_PING_INTERVAL_MS}",
            "--grpc-http2-max-ping-strikes=0",
        ]
        if self.fleet_secret:
            # On the command line (Triton reads it nowhere else): visible to this machine's users in ps.
            command.append(
                f"--grpc-restricted-protocol={','.join(RESTRICTED_PROTOCOLS)}:"
                f"{FLEET_SECRET_KEY}={self.fleet_secret}"
            )
        return command

    def _wait_ready(self, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.address)
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {self.process.returncode}; log: {self.log_path}\n"
                        + self.log_tail()
                    )
                try:
                    if client.is_server_ready(headers=self.headers, client_timeout=1):
                        return
                except Exception:
                    pass
                time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise TritonStartError(f"tritonserver not ready within {timeout_s:.0f} s; log: {self.log_path}")

    @property
    def headers(self) -> dict[str, str] | None:
        """The headers a call to this Triton needs (tritonclient's `headers=`)."""
        return {FLEET_SECRET_HEADER: self.fleet_secret} if self.fleet_secret else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
