"""A modelyard fleet across hosts (network namespaces, tests/cluster/net.py), every part a real process.

    h1, h2   etcd member, Triton + its agent
    h3       etcd member, our container + its agent
    h4, h5   a router (`modelyard serve`) and a placement controller
    client   the load (tests/cluster/load.py) and the probe (tests/cluster/probe.py)

Every modelyard process gets all three etcd endpoints. Each process runs in its own process group, so a
host's processes can be killed (a lost host) and started again on the same addresses.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelyard.catalog.examples import EXAMPLES_DIR, install_model_dir
from modelyard.containers.triton.server import TritonServer
from modelyard.numpy_container.numpy_model import write_model_dir
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from tests.cluster.net import Network

ROOT = Path(__file__).resolve().parents[2]
ETCD_HOSTS = ("h1", "h2", "h3")
TRITON_HOSTS = ("h1", "h2")
CUSTOM_HOST = "h3"
ROUTER_HOSTS = ("h4", "h5")
PORT = 8001  # routers and containers, each on its host's data address
START_S = 120.0  # ceiling for any process to start on a busy 2-core machine
MEMORY_BYTES = 4 * 1024**3
# The models under load: OUTPUT = INPUT * factor, a different factor each, so an answer from the wrong model
# is caught. `trep` has a copy on each Triton, `tone` one copy (re-placed on the other Triton when its host
# goes), `cone` one copy on the only container of ours.
FACTORS = {"trep": 2.0, "tone": 3.0, "cone": 5.0}
REPLICATED = "trep"


@dataclass
class Proc:
    name: str
    host: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path = ROOT
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True,
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signals the process's whole group (Triton's python stubs go with it)."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.popen.wait(10)
        # Whatever else is left in its group (children that outlived it).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ProbeProcess:
    """tests/cluster/probe.py on the client host, asked over its stdin/stdout."""

    def __init__(self, prefix: list[str], args: list[str], log: Path) -> None:
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.cluster.probe", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"), cwd=ROOT,
            start_new_session=True, text=True,
        )  # fmt: skip
        assert self.ask_raw(None, 60) == "ready"

    def ask_raw(self, request: dict[str, Any] | None, timeout_s: float) -> Any:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        if request is not None:
            self.popen.stdin.write(json.dumps(request) + "\n")
            self.popen.stdin.flush()
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"the probe did not answer {request} within {timeout_s} s")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"the probe exited ({self.popen.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"probe {request}: {answer['error']}")
        return answer["ok"]

    def ask(self, op: str, timeout_s: float = 30.0, **fields: Any) -> Any:
        return self.ask_raw({"op": op, **fields}, timeout_s)

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait(10)


@dataclass
class Cluster:
    workdir: Path
    net: Network = field(default_factory=lambda: Network(["h1", "h2", "h3", "h4", "h5", "client"]))
    procs: dict[str, Proc] = field(default_factory=dict)
    probe: ProbeProcess | None = None
    models: list[ModelVersion] = field(default_factory=list)

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def store_url(self) -> str:
        return "etcd://" + ",".join(f"{self.net.address(h, 'store')}:2379" for h in ETCD_HOSTS)

    def data_address(self, host: str) -> str:
        return f"{self.net.address(host, 'data')}:{PORT}"

    @property
    def routers(self) -> list[str]:
        return [self.data_address(h) for h in ROUTER_HOSTS]

    @property
    def secret_file(self) -> Path:
        return self.workdir / "fleet-secret"

    def etcd_endpoints(self) -> str:
        return ",".join(f"http://{self.net.address(h, 'store')}:2379" for h in ETCD_HOSTS)

    # -- starting --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.secret_file.write_text("cluster-fleet-secret-0123456789\n")
        self.net.start()
        for host in ETCD_HOSTS:
            self._etcd(host, new=True).start()
        self.probe = ProbeProcess(
            self.net.exec_prefix("client"),
            [self.store_url, self.secret_file.read_text().strip(), *self.routers],
            self.workdir / "logs" / "probe.log",
        )
        self.wait_for(lambda: self.etcd_leader() is not None, "an etcd leader", START_S)
        self.models = self._write_models()
        for model in self.models:
            self.probe.ask("put", key=registry.MODELS + model.key, value=model.to_json().decode())
        for host in TRITON_HOSTS:
            self._triton(host).start()
        self._custom(CUSTOM_HOST).start()
        for host in (*TRITON_HOSTS, CUSTOM_HOST):
            self.wait_listening(self.data_address(host))
            self._agent(host).start()
        for host in ROUTER_HOSTS:
            self._controller(host).start()
            self._router(host).start()
        for router in self.routers:
            self.wait_listening(router)
        self.wait_converged(START_S)

    def _add(self, proc: Proc) -> Proc:
        self.procs[proc.name] = proc
        return proc

    def _modelyard(self, name: str, host: str, *args: str) -> Proc:
        argv = [*self.net.exec_prefix(host), sys.executable, "-m", "modelyard", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return self._add(Proc(name, host, argv, self.workdir / "logs" / f"{name}.log", env))

    def _etcd(self, host: str, *, new: bool) -> Proc:
        peers = ",".join(f"{h}=http://{self.net.address(h, 'peer')}:2380" for h in ETCD_HOSTS)
        peer = f"http://{self.net.address(host, 'peer')}:2380"
        client = f"http://{self.net.address(host, 'store')}:2379"
        binary = shutil.which("etcd")
        assert binary is not None
        argv = [
            *self.net.exec_prefix(host), binary, f"--name={host}",
            f"--data-dir={self.workdir / 'etcd' / host}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--initial-cluster={peers}", f"--initial-cluster-token=myc-{self.net.token}",
            f"--initial-cluster-state={'new' if new else 'existing'}", "--log-level=warn",
        ]  # fmt: skip
        return self._add(Proc(f"etcd-{host}", host, argv, self.workdir / "logs" / f"etcd-{host}.log"))

    def _triton(self, host: str) -> Proc:
        server = TritonServer(self.workdir / f"triton-{host}", host=self.net.address(host, "data"),
                              grpc_port=PORT, fleet_secret=self.secret_file.read_text().strip())  # fmt: skip
        server.repository.mkdir(parents=True, exist_ok=True)
        argv = [*self.net.exec_prefix(host), *server.command()]
        log = self.workdir / "logs" / f"triton-{host}.log"
        return self._add(Proc(f"container-{host}", host, argv, log, server.environment(), server.workdir))

    def _custom(self, host: str) -> Proc:
        return self._modelyard(
            f"container-{host}", host, "container", "--host", self.net.address(host, "data"),
            "--port", str(PORT), "--memory-bytes", str(MEMORY_BYTES),
            "--fleet-secret-file", str(self.secret_file), "--model-store", str(self.workdir / "artifacts"),
        )  # fmt: skip

    def _agent(self, host: str) -> Proc:
        backend = "custom" if host == CUSTOM_HOST else "triton"
        args = [
            "--log-level", "INFO", "agent", "--store", self.store_url, "--id", f"{backend}-{host}",
            "--backend", backend, "--address", self.data_address(host),
            "--memory-bytes", str(MEMORY_BYTES), "--fleet-secret-file", str(self.secret_file),
            "--artifact-cache", str(self.workdir / f"cache-{host}"),
        ]  # fmt: skip
        if backend == "triton":
            args += ["--repository", str((self.workdir / f"triton-{host}" / "repository").resolve())]
        return self._modelyard(f"agent-{host}", host, *args)

    def _router(self, host: str) -> Proc:
        return self._modelyard(
            f"router-{host}", host, "serve", "--store", self.store_url,
            "--host", self.net.address(host, "data"), "--port", str(PORT),
            "--insecure-trust-tenant-header", "--fleet-secret-file", str(self.secret_file),
        )  # fmt: skip

    def _controller(self, host: str) -> Proc:
        return self._modelyard(
            f"controller-{host}", host, "--log-level", "INFO", "controller", "--store", self.store_url
        )

    def _write_models(self) -> list[ModelVersion]:
        artifacts = self.workdir / "artifacts"
        sources = self.workdir / "sources"
        tone = sources / "tone"
        shutil.copytree(EXAMPLES_DIR / "scale", tone, ignore=shutil.ignore_patterns("__pycache__"))
        config = tone / "config.pbtxt"
        config.write_text(config.read_text().replace('string_value: "2.0"', 'string_value: "3.0"'))
        path = write_model_dir(
            artifacts / "cone", "scale", {"factor": np.array([FACTORS["cone"]], dtype=np.float32)},
            inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
            outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
        )  # fmt: skip
        return [
            install_model_dir(EXAMPLES_DIR / "scale", artifacts, name="trep", replicas=2),
            install_model_dir(tone, artifacts, name="tone"),
            ModelVersion(
                "cone", "1", backend="custom", memory_bytes=1024, artifact_uri=path.resolve().as_uri()
            ),
        ]

    # -- looking -------------------------------------------------------------------------------------

    def ask(self, op: str, timeout_s: float = 30.0, **fields: Any) -> Any:
        assert self.probe is not None
        return self.probe.ask(op, timeout_s, **fields)

    def wait_for(self, condition: Any, what: str, timeout_s: float) -> float:
        """Polls `condition()` every 0.2 s; seconds it took."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
            time.sleep(0.2)
        return time.monotonic() - started

    def wait_listening(self, address: str, timeout_s: float = START_S) -> None:
        self.wait_for(
            lambda: self.ask("tcp", address=address), f"something listening on {address}", timeout_s
        )

    def problems(self) -> list[str]:
        containers = [f"triton-{h}" for h in TRITON_HOSTS] + [f"custom-{CUSTOM_HOST}"]
        return list(self.ask("problems", timeout_s=30, containers=containers))

    def wait_converged(self, timeout_s: float, since: float | None = None) -> float:
        """Waits until map, registry and both routers' tables agree; seconds from `since` (default: now)."""
        since = time.monotonic() if since is None else since
        found: list[str] = []
        while time.monotonic() - since < timeout_s:
            found = self.problems()
            if not found:
                return time.monotonic() - since
            time.sleep(0.2)
        raise AssertionError(f"not converged {timeout_s:.0f} s after the fault: {found}")

    def etcdctl(self, *args: str, endpoints: str | None = None) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("etcdctl")
        assert binary is not None
        return subprocess.run(
            [*self.net.exec_prefix("client"), binary, f"--endpoints={endpoints or self.etcd_endpoints()}",
             "--command-timeout=2s", "--dial-timeout=1s", *args],
            capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        )  # fmt: skip

    def etcd_leader(self) -> str | None:
        """The host whose member leads the etcd cluster, as the reachable members say."""
        result = self.etcdctl("endpoint", "status", "-w", "json")
        try:
            statuses = json.loads(result.stdout or "[]")
        except json.JSONDecodeError:
            return None
        for status in statuses:
            header = status["Status"]["header"]
            if header["member_id"] == status["Status"]["leader"]:
                endpoint = status["Endpoint"]
                return next(h for h in ETCD_HOSTS if self.net.address(h, "store") in endpoint)
        return None

    def move_etcd_leader(self, host: str) -> None:
        """Makes `host`'s member the etcd leader (etcdctl move-leader, asked of the current leader)."""
        leader = self.etcd_leader()
        if leader == host:
            return
        assert leader is not None, "no etcd leader"
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json").stdout)
        member = next(
            s["Status"]["header"]["member_id"]
            for s in status
            if self.net.address(host, "store") in s["Endpoint"]
        )
        moved = self.etcdctl(
            "move-leader", f"{member:x}", endpoints=f"http://{self.net.address(leader, 'store')}:2379"
        )
        assert moved.returncode == 0, moved.stderr
        self.wait_for(lambda: self.etcd_leader() == host, f"{host}'s etcd member leads", 30)

    def controller_leader(self) -> str | None:
        """The host of the leading placement controller, from the store's leader key (holder names pid)."""
        holder = self.ask("leader") or ""
        for host in ROUTER_HOSTS:
            proc = self.procs[f"controller-{host}"]
            if proc.popen is not None and f":{proc.popen.pid}:" in holder:
                return host
        return None

    # -- faults and repairs ------------------------------------------------------------------------------

    def processes_on(self, host: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.host == host]

    def restart(self, name: str) -> None:
        """Starts a process that was stopped or killed again, as it was started."""
        proc = self.procs[name]
        if name.startswith("etcd-"):
            proc = self._etcd(proc.host, new=False)
        proc.start()

    def restore(self) -> None:
        """Heals every link and starts whatever is not running: the cluster as `start` left it."""
        self.net.heal()
        for name in sorted(
            self.procs, key=lambda n: (not n.startswith("etcd"), not n.startswith("container"))
        ):
            if not self.procs[name].alive:
                self.restart(name)
                if name.startswith("container"):
                    self.wait_listening(self.data_address(self.procs[name].host))

    def close(self) -> None:
        for proc in sorted(self.procs.values(), key=lambda p: p.name.startswith("etcd")):  # etcd last
            proc.stop(5)
        if self.probe is not None:
            self.probe.close()
        self.net.close()


class ClusterLoader:
    """tests/cluster/load.py on the client host: started, waited for every model, stopped for its figures."""

    def __init__(self, cluster: Cluster) -> None:
        self.stop_file = cluster.workdir / f"stop-{time.monotonic_ns()}"
        models = [f"{m}={f}" for m, f in FACTORS.items()]
        self.process = subprocess.Popen(
            [*cluster.net.exec_prefix("client"), sys.executable, "-m", "tests.cluster.load",
             ",".join(cluster.routers), str(self.stop_file), str(cluster.secret_file), *models],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.figures: dict[str, Any] | None = None
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 90)
        line = self.process.stdout.readline().strip() if ready else "(nothing)"
        if line != "ready":
            self.process.kill()
            raise AssertionError(f"the load never had an answer from every model: {line}")

    def calls(self) -> int:
        path = Path(str(self.stop_file) + ".calls")
        return int(path.read_text()) if path.exists() else 0

    def wait_for_more_calls(self, count: int, ceiling_s: float = 60.0) -> None:
        target = self.calls() + count
        started = time.monotonic()
        while self.calls() < target:
            assert self.process.poll() is None, "the load process exited"
            assert time.monotonic() - started < ceiling_s, f"fewer than {count} calls in {ceiling_s:.0f} s"
            time.sleep(0.1)

    def stop(self) -> dict[str, Any]:
        if self.figures is None:
            self.stop_file.touch()
            try:
                out, _ = self.process.communicate(timeout=60)
            finally:
                self.process.kill()
            self.figures = json.loads(out.strip().splitlines()[-1])
        return self.figures

    def __enter__(self) -> ClusterLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def upload(cluster: Cluster, name: str, factor: float, memory_bytes: int = 1024) -> ModelVersion:
    """A new model of ours (a `scale` by `factor`) in the artifacts folder, registered through the probe."""
    path = write_model_dir(
        cluster.workdir / "artifacts" / name, "scale", {"factor": np.array([factor], dtype=np.float32)},
        inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
        outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
    )  # fmt: skip
    uri = path.resolve().as_uri()
    model = ModelVersion(name, "1", backend="custom", memory_bytes=memory_bytes, artifact_uri=uri)
    cluster.ask("put", key=registry.MODELS + model.key, value=model.to_json().decode())
    return model
