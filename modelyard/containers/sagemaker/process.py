"""Starting and stopping a real SageMaker multi-model container on loopback: AWS's multi-model-server
(MMS, a Java front end with Python workers) configured as `sagemaker-inference` configures it for
multi-model endpoints, with our handler service (containers/sagemaker/handler.py).

What `sagemaker_inference.model_server.start_model_server` does, and why this does not call it:
- with SAGEMAKER_MULTI_MODEL=true it uses the toolkit's `etc/mme-mms.properties` (no model at start,
  `default_service_handler=$$SAGEMAKER_HANDLER$$` read from the environment) and sets SAGEMAKER_HANDLER
  to the handler service. We do the same: that file's lines, then our own (addresses, handler, workers);
- but it writes its config to /etc/sagemaker-mms.properties, binds 0.0.0.0:8080, and refuses to run when
  another MMS runs on the machine (it finds the JVM by class name). A fleet runs several on one machine.
So the config goes to the container's workdir and the JVM is started the way `multi-model-server --start`
starts it (its launcher keeps one pid file per temp dir and exits at once, leaving nobody to supervise),
but with our own process as its parent: the supervisor's kill or restart then reaches the JVM and, through
its process group, its Python workers. Temp files (the workers' Unix sockets), logs and metrics go under
the workdir, never the current directory.

The JVM's start is slow: measured on this machine (2 shared cores, C1 compiler only, warm page cache)
0.5-0.9 s from exec to a first `/ping` answered, plus ~0.2 s per model load (its Python worker starting).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from modelyard.containers.process import ServerProcess, port_is_free

HANDLER_SERVICE = "modelyard.containers.sagemaker.handler:handle"
INSTALL_HINT = (
    "install it with: pip install 'modelyard[sagemaker]' (multi-model-server and sagemaker-inference) "
    "and a Java runtime (Debian: apt-get install openjdk-17-jre-headless)"
)


# MMS refuses ports above a signed short ("Invalid port number" for 32768 and up, measured on 1.1.11), and
# Linux hands out ephemeral ports from 32768: port 0 cannot be used, so a free port is drawn below that.
MAX_PORT = 32767


def free_port(host: str = "127.0.0.1", low: int = 20000) -> int:
    """A port MMS accepts that nothing listens on now."""
    for _ in range(1000):
        port = random.randint(low, MAX_PORT)
        if port_is_free(host, port):
            return port
    raise SageMakerStartError(f"no free port between {low} and {MAX_PORT} on {host}")


class SageMakerNotInstalled(RuntimeError):
    """multi-model-server, sagemaker-inference or Java is missing."""


class SageMakerStartError(RuntimeError):
    """The model server exited or did not answer /ping in time."""


def _repo_root() -> Path:
    """The directory holding the `backends` package, for the workers' PYTHONPATH."""
    return Path(__file__).resolve().parent.parent


def java_binary() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home, "bin", "java") if java_home else None
    if java is not None and java.exists():
        return str(java)
    for candidate in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(candidate, "java")
        if path.exists():
            return str(path)
    raise SageMakerNotInstalled(f"no java on PATH or in JAVA_HOME; {INSTALL_HINT}")


def mme_defaults() -> str:
    """sagemaker-inference's own multi-model MMS properties (etc/mme-mms.properties)."""
    try:
        import sagemaker_inference
    except ImportError as exc:
        raise SageMakerNotInstalled(f"sagemaker-inference is not installed; {INSTALL_HINT}") from exc
    path = Path(sagemaker_inference.__file__).parent / "etc" / "mme-mms.properties"
    return path.read_text()


def mms_home() -> Path:
    try:
        import mms
    except ImportError as exc:
        raise SageMakerNotInstalled(f"multi-model-server is not installed; {INSTALL_HINT}") from exc
    return Path(mms.__file__).resolve().parent.parent


class SageMakerProcess(ServerProcess):
    """One multi-model-server in SageMaker multi-model mode, on `host:port` (inference and management on
    one port, as SageMaker binds them)."""

    def new_port(self) -> int:
        return free_port(self.host)  # below 32768: MMS refuses higher ones

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        workers_per_model: int = 1,
        response_timeout_s: int = 60,
        heap: str = "256m",
    ) -> None:
        self.workdir = workdir.resolve()
        self.host = host
        self.port = port or free_port(host)
        self.workers_per_model = workers_per_model
        self.response_timeout_s = response_timeout_s
        self.heap = heap
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mms.log"
        self.model_store = self.workdir / "models"  # where the adapter unpacks archives
        self.start_s = 0.0  # seconds the last start took to a first /ping

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def config(self) -> str:
        """The MMS properties: the toolkit's multi-model defaults, then this container's own settings."""
        own = {
            "inference_address": self.url,
            "management_address": self.url,
            "model_store": str(self.model_store),
            # The toolkit's default reads SAGEMAKER_HANDLER from the environment; naming it here too keeps
            # the config self-contained (the environment is set as well, below).
            "default_service_handler": HANDLER_SERVICE,
            "default_workers_per_model": str(self.workers_per_model),
            "default_response_timeout": str(self.response_timeout_s),
            "unregister_model_timeout": str(self.response_timeout_s),
        }
        lines = [line for line in mme_defaults().splitlines() if line.split("=", 1)[0] not in own]
        return "\n".join([*lines, *(f"{k}={v}" for k, v in own.items())]) + "\n"

    def command(self, config_path: Path) -> list[str]:
        home = mms_home()
        tmp = self.workdir / "tmp"
        return [
            java_binary(),
            f"-Dmodel_server_home={home}",
            f"-Djava.io.tmpdir={tmp}",
            f"-DLOG_LOCATION={self.workdir / 'logs'}",
            f"-DMETRICS_LOCATION={self.workdir / 'logs'}",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # the C1 compiler only: a faster start, enough for an HTTP front
            "-XX:-UseContainerSupport",
            "-XX:-UsePerfData",  # else the JVM writes /tmp/hsperfdata_USER, outside the workdir
            "-cp",
            f".:{home / 'mms' / 'frontend' / '*'}",
            "com.amazonaws.ml.mms.ModelServer",
            "--python",
            sys.executable,
            "-f",
            str(config_path),
            "-s",
            str(self.model_store),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SAGEMAKER_MULTI_MODEL"] = "true"
        env["SAGEMAKER_HANDLER"] = HANDLER_SERVICE
        env["TEMP"] = env["TMPDIR"] = str(self.workdir / "tmp")
        root = str(_repo_root())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env

    def start(self, timeout_s: float = 120.0) -> None:
        for folder in (self.workdir, self.model_store, self.workdir / "tmp", self.workdir / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "mms.properties"
        config_path.write_text(self.config())
        command = self.command(config_path)
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.environment(),
                start_new_session=True,
            )
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise SageMakerStartError(
                    f"multi-model-server exited ({self.process.returncode}) at start; log: {tail}"
                )
            if self.ping():
                self.start_s = time.monotonic() - started
                return
            time.sleep(0.1)
        self.stop()
        raise SageMakerStartError(
            f"multi-model-server did not answer /ping within {timeout_s:.0f} s; log: {self.log_path}"
        )

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False
