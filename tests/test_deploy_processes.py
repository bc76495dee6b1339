"""The rendered workloads' real command lines, run as processes: each pod in a network namespace of its own
(only its loopback, like a pod's network without the cluster), its containers started as the image would
(the image's entrypoint `modelyard`, or the manifest's command) with the manifest's args and env, and its
probes run as the kubelet would until they pass.

What stands in for the cluster: Secrets and ConfigMaps mounted as volumes become temporary folders holding
their keys as files and emptyDirs empty temporary folders (their mount paths rewritten in args, env and
mounted files); the names in MODELYARD_STORE (etcd-0.etcd, ...) resolve, through the namespace's own hosts
file, to an etcd started on its loopback; POD_IP is 127.0.0.1. Needs root (network namespaces: CI and
./dev test run as root); skipped otherwise. Triton's image is NVIDIA's GPU one: the CPU tritonserver the
nvidia-pytriton wheel bundles stands in for it, with the backend folder and libraries that image has in
place (TritonInstall). Not run: the etcd StatefulSet (not modelyard's image; its three members only elect
a leader together).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing, require_triton
from tests.deploy_render import SAMPLE_SECRETS, pod_template, render, workloads

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0


PROBE = r"""
import sys, urllib.request
kind, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "httpGet":
    urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3)  # raises on a non-2xx status
else:
    import grpc
    from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
    status = g.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Check(h.HealthCheckRequest(), timeout=3)
    sys.exit(0 if status.status == h.HealthCheckResponse.SERVING else 1)
"""


class Netns:
    """A network namespace with its loopback up, an /etc/hosts of its own and an etcd on its loopback."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"modelyard-test-{uuid.uuid4().hex[:10]}"
        self.etc = Path("/etc/netns") / self.name  # `ip netns exec` bind-mounts these over /etc
        self.workdir = workdir
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> Netns:
        try:
            self._setup()
        except BaseException:
            self.__exit__()  # the namespace, its /etc folder and etcd go even when setting up failed
            raise
        return self

    def _setup(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.etc.mkdir(parents=True)
        (self.etc / "hosts").write_text("127.0.0.1 localhost etcd-0.etcd etcd-1.etcd etcd-2.etcd\n")
        subprocess.run(self.exec("ip", "link", "set", "lo", "up"), check=True)
        etcd = self.workdir / "etcd"
        self.start(
            "etcd",
            ["etcd", f"--data-dir={etcd}", "--listen-client-urls=http://127.0.0.1:2379",
             "--advertise-client-urls=http://127.0.0.1:2379", "--listen-peer-urls=http://127.0.0.1:2380"],
            env=dict(os.environ),
            cwd=self.workdir,
        )  # fmt: skip
        self.wait("etcd store", lambda: self.probe("httpGet", 2379, "/health"))

    def exec(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.exec(*command),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append((name, process, log))
        return process

    def probe(self, kind: str, port: int, path: str = "") -> bool:
        result = subprocess.run(
            self.exec(sys.executable, "-c", PROBE, kind, str(port), path), capture_output=True, timeout=30
        )
        return result.returncode == 0

    def wait(
        self, what: str, condition: Any, timeout_s: float = START_TIMEOUT_S, period_s: float = 1.0
    ) -> None:
        """Runs `condition` every `period_s` (a probe's period) until it holds; fails with the logs of a
        process that exited or of all of them at the deadline."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            for name, process, log in self.processes:
                if process.poll() is not None:
                    pytest.fail(
                        f"{name} exited with {process.returncode} before {what}:\n{log.read_text()[-3000:]}"
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(f"== {n}\n{log.read_text()[-2000:]}" for n, _, log in self.processes)
                pytest.fail(f"{what}: not within {timeout_s:.0f} s\n{logs}")
            time.sleep(period_s)

    def __exit__(self, *exc: object) -> None:
        for _, process, _ in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for _, process, _ in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("render"))


def objects_by(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in rendered if o["kind"] == kind}


def data_of(obj: dict[str, Any]) -> dict[str, str]:
    import base64

    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    return dict(obj.get("data", {}))


class PodRun:
    """One pod's containers as processes in one network namespace, as the kubelet would start them."""

    def __init__(self, rendered: list[dict[str, Any]], workload: str, netns: Netns, workdir: Path) -> None:
        self.rendered = rendered
        self.template = pod_template(workloads(rendered)[workload])
        self.pod_name = f"{workload}-0"
        self.netns = netns
        self.workdir = workdir
        self.mounts = self._volumes()

    def _volumes(self) -> dict[str, Path]:
        """Each volume as a temporary folder, by name (Secrets and ConfigMaps hold their keys as files)."""
        secrets, configmaps = objects_by(self.rendered, "Secret"), objects_by(self.rendered, "ConfigMap")
        folders = {}
        for volume in self.template["spec"].get("volumes", []):
            folder = self.workdir / "volumes" / volume["name"]
            folder.mkdir(parents=True)
            source = None
            if "secret" in volume:
                source = secrets[volume["secret"]["secretName"]]
            elif "configMap" in volume:
                source = configmaps[volume["configMap"]["name"]]
            for key, value in data_of(source).items() if source else ():
                (folder / key).write_text(value)
            folders[volume["name"]] = folder
        return folders

    def rewrite(self, text: str, container: dict[str, Any]) -> str:
        """`text` with the container's mount paths replaced by the temporary folders standing in for them."""
        folders = {m["mountPath"]: str(self.mounts[m["name"]]) for m in container.get("volumeMounts", [])}
        if not folders:
            return text
        # One pass, longest path first: a replaced path is never rewritten again (/tmp holds the folders).
        paths = "|".join(re.escape(p) for p in sorted(folders, key=len, reverse=True))
        return re.sub(rf"(?<![\w/.-])({paths})(?=/|\"|$|[,:\s])", lambda m: folders[m.group(1)], text)

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        secrets, configmaps = objects_by(self.rendered, "Secret"), objects_by(self.rendered, "ConfigMap")
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            objs = configmaps if "configMapRef" in source else secrets
            if ref["name"] in objs:
                env.update(data_of(objs[ref["name"]]))
            else:
                assert ref.get("optional"), f"{ref['name']} is neither rendered nor optional"
        fields = {"metadata.name": self.pod_name, "status.podIP": "127.0.0.1"}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "fieldRef" in var["valueFrom"]:
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = data_of(secrets[ref["name"]])[ref["key"]]
        env = {k: self.rewrite(v, container) for k, v in env.items()}
        env.update(PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(self.workdir))
        if container.get("command") == ["tritonserver"]:  # the libraries NVIDIA's image has installed
            install = require_triton()
            libdir = sysconfig.get_config_var("LIBDIR") or ""
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.library_dir), libdir) if p)
        if os.environ.get("PYTHONPATH"):  # this checkout's modelyard (the image has its own installed)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def command(self, container: dict[str, Any], env: dict[str, str]) -> list[str]:
        entrypoint = container.get("command", ["modelyard"])  # the image's ENTRYPOINT
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container.get("args", [])]
        args = [self.rewrite(a, container) for a in args]
        if entrypoint == ["tritonserver"]:  # NVIDIA's image: the bundled CPU build, its backends in place
            install = require_triton()
            backends = install.backend_directory(self.workdir / "triton-backends")
            return [str(install.binary), *args, f"--backend-directory={backends}"]
        program = shutil.which(entrypoint[0], path=str(BIN)) or entrypoint[0]
        return [program, *entrypoint[1:], *args]

    def start(self) -> None:
        for container in self.template["spec"]["containers"]:
            env = self.env(container)
            working_dir = container.get("workingDir")
            cwd = Path(self.rewrite(working_dir, container)) if working_dir else self.workdir
            self.netns.start(container["name"], self.command(container, env), env, cwd)

    def probes(self) -> list[tuple[str, str, dict[str, Any]]]:
        found = []
        for container in self.template["spec"]["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    found.append((container["name"], kind, container))
        return found

    def probe_passes(self, container: dict[str, Any], kind: str) -> bool:
        probe = container[kind]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        handler = "httpGet" if "httpGet" in probe else "grpc"
        port = probe[handler]["port"]
        number = ports[port] if isinstance(port, str) else port
        return self.netns.probe(handler, number, probe[handler].get("path", ""))


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Netns]:
    if os.geteuid() != 0:
        missing("root", "network namespaces need it: run as root (CI does)")
    if shutil.which("ip") is None:
        missing("ip (iproute2)", "apt-get install iproute2")
    if shutil.which("etcd") is None:
        missing("etcd", "apt-get install etcd-server (./dev test does)")
    with Netns(tmp_path) as namespace:
        yield namespace


@pytest.mark.parametrize("workload", ["router", "controller", "custom", "mlserver", "triton"])
def test_each_workloads_command_line_starts_and_its_probes_pass(
    rendered: list[dict[str, Any]], workload: str, netns: Netns, tmp_path: Path
) -> None:
    pod = PodRun(rendered, workload, netns, tmp_path)
    probes = pod.probes()
    assert probes, f"{workload} declares no probe"
    pod.start()
    for name, kind, container in probes:
        netns.wait(f"{workload}/{name} {kind}", lambda c=container, k=kind: pod.probe_passes(c, k))


def test_the_rebalance_jobs_command_line_completes(
    rendered: list[dict[str, Any]], netns: Netns, tmp_path: Path
) -> None:
    pod = PodRun(rendered, "rebalance", netns, tmp_path)
    (container,) = pod.template["spec"]["containers"]
    env = pod.env(container)
    result = subprocess.run(
        netns.exec(*pod.command(container, env)),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_default() -> tuple[list[str], list[str], dict[str, str], list[str]]:
    """The default target's ENTRYPOINT, CMD, ENV and HEALTHCHECK command, as the image would run them."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stage = text[text.rindex("FROM ") :]
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.+)$", stage, re.M)[-1])
    cmd = json.loads(re.findall(r"^CMD (\[.+\])$", stage, re.M)[-1])
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", stage, re.M):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    healthcheck = json.loads(re.findall(r"^HEALTHCHECK .*? CMD (\[.+\])$", stage, re.M)[-1])
    return entrypoint, cmd, env, healthcheck


def test_the_images_default_command_starts_and_its_healthcheck_passes(netns: Netns, tmp_path: Path) -> None:
    entrypoint, cmd, image_env, healthcheck = dockerfile_default()
    assert entrypoint == ["modelyard"]
    # The tenant-token file the deployment mounts (a Secret), here a temporary file at the path it names.
    tokens = tmp_path / "tenants" / "tokens"
    tokens.parent.mkdir()
    tokens.write_text(SAMPLE_SECRETS["tenant-tokens"])
    env = {k: v.replace("$PATH", os.environ["PATH"]) for k, v in image_env.items()}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if "MODELYARD_TENANT_TOKENS" in env:  # the path the Secret is mounted at, here the temporary file
        env["MODELYARD_TENANT_TOKENS"] = str(tokens)
    home = tmp_path / "home"  # WORKDIR: the default embedded store (.modelyard/store) lives there
    home.mkdir()
    netns.start("image", [str(BIN / entrypoint[0]), *cmd], env, home)
    check = [str(BIN / "python") if healthcheck[0] == "python" else healthcheck[0], *healthcheck[1:]]

    def healthy() -> bool:
        return subprocess.run(netns.exec(*check), env=env, capture_output=True, timeout=30).returncode == 0

    netns.wait("the image's HEALTHCHECK", healthy)
