"""Deployment artefacts checked for structure: Kubernetes manifests, alert rules, Dockerfile, dashboard.

The images cannot be built on these machines (no Docker engine) and no cluster is at hand, so these tests
check what can be checked without them: the objects parse and reference each other consistently, use the
ports the code serves on, pass command lines the real CLI parser accepts, and alert on metrics the code
exports.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from modelyard import metric_names
from modelyard.cli import main
from modelyard.placement.store.etcd import EtcdStore
from modelyard.telemetry import DURATION_BUCKETS_S

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOCKERFILE = ROOT / "Dockerfile"
WORKLOADS = ("Deployment", "StatefulSet")
POD_OWNERS = (*WORKLOADS, "CronJob")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")

# -- reading the manifests -------------------------------------------------------------------------------


def objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return pod_template(obj)["spec"]


def pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects():
        if obj["kind"] in POD_OWNERS:
            yield f"{obj['kind']}/{obj['metadata']['name']}", pod_spec(obj)


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def container_ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def resolve_port(port: int | str, c: dict[str, Any]) -> int:
    """A probe's or Service's port, named or numbered, as the number the container declares."""
    ports = container_ports(c)
    if isinstance(port, str):
        assert port in ports, f"{c['name']} declares no port named {port!r}"
        return ports[port]
    assert port in ports.values(), f"{c['name']} declares no port {port}"
    return port


def option(args: list[str], name: str) -> str:
    """The value of `--name V` or `--name=V` in a command line."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {args}")


def uid(pod: dict[str, Any], c: dict[str, Any]) -> int:
    return int(c.get("securityContext", {}).get("runAsUser", pod["securityContext"]["runAsUser"]))


def default_of(command: str, param: str) -> Any:
    return next(p.default for p in main.commands[command].params if p.name == param)


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)([KMGT]i)?", quantity)
    assert match, quantity
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def configmap() -> dict[str, str]:
    return by_kind("ConfigMap")["modelyard"]["data"]


# -- the CLI parser ----------------------------------------------------------------------------------------


def parse(args: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """Parses a `modelyard ...` command line with the real CLI, without running it: raises on an unknown
    command or option, a bad value or a missing required option; returns the leaf command and its values."""
    command: click.Command = main
    rest = list(args)
    while isinstance(command, click.Group):
        name = rest.pop(0)
        found = command.get_command(click.Context(command), name)  # groups are imported on demand
        assert found is not None, f"no command {name!r} in {args}"
        command = found
    with command.make_context(str(command.name), rest) as context:
        return command, dict(context.params)


def substituted(c: dict[str, Any]) -> list[str]:
    """The container's args with Kubernetes' $(VAR) references replaced, as the kubelet would; a reference
    to a variable the container does not declare would be passed literally, so it fails the test."""
    declared = {e["name"] for e in c.get("env", [])}
    sample = {"POD_NAME": "pod-0", "POD_IP": "10.1.2.3"}

    def value(match: re.Match[str]) -> str:
        assert match.group(1) in declared, f"{c['name']}: $({match.group(1)}) is not in its env"
        return sample.get(match.group(1), "x")

    return [re.sub(r"\$\((\w+)\)", value, arg) for arg in c["args"]]


def modelyard_command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for obj in objects():
        if obj["kind"] in POD_OWNERS:
            for c in pod_spec(obj)["containers"]:
                if c["image"].startswith("modelyard") and c.get("command", ["modelyard"]) == ["modelyard"]:
                    lines.append((f"{obj['metadata']['name']}/{c['name']}", substituted(c)))
    return lines


COMMAND_LINES = modelyard_command_lines()

# -- manifests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_manifest_holds_objects_with_api_version_kind_and_name(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_every_namespaced_object_is_in_the_modelyard_namespace() -> None:
    for obj in objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "modelyard", obj["metadata"]["name"]


def test_kustomization_lists_exactly_the_manifests_present() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in MANIFESTS]


def test_kustomization_retags_exactly_the_modelyard_images_the_pods_use() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    used = {
        c["image"].split(":")[0]
        for _, spec in pods()
        for c in spec["containers"]
        if c["image"].startswith("modelyard")
    }
    assert {i["name"] for i in kustomization["images"]} == used == {"modelyard", "modelyard-triton"}


def test_workload_selectors_match_their_pod_labels() -> None:
    for obj in objects():
        if obj["kind"] in WORKLOADS:
            selector = obj["spec"]["selector"]["matchLabels"]
            labels = pod_template(obj)["metadata"]["labels"]
            assert selector.items() <= labels.items(), obj["metadata"]["name"]


def test_every_service_and_disruption_budget_selects_the_pods_of_a_workload() -> None:
    workloads = [pod_template(o)["metadata"]["labels"] for o in objects() if o["kind"] in WORKLOADS]
    for obj in objects():
        if obj["kind"] in ("Service", "PodDisruptionBudget"):
            spec = obj["spec"]
            selector = spec["selector"] if obj["kind"] == "Service" else spec["selector"]["matchLabels"]
            assert any(selector.items() <= labels.items() for labels in workloads), obj["metadata"]["name"]


def test_every_container_has_an_image_and_resource_requests_and_a_memory_limit() -> None:
    for where, spec in pods():
        for c in spec["containers"]:
            assert c["image"], where
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
            assert c["resources"]["limits"]["memory"], where


def test_every_pod_runs_as_a_non_root_user_without_privilege_escalation() -> None:
    for where, spec in pods():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for c in spec["containers"]:
            assert uid(spec, c) > 0, f"{where}/{c['name']}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"


def test_modelyard_pods_run_as_the_images_user_and_triton_as_its_own() -> None:
    for where, spec in pods():
        for c in spec["containers"]:
            if c.get("command") == ["tritonserver"]:
                assert uid(spec, c) == 1000, where  # the `triton-server` user of NVIDIA's image
            elif c["image"].startswith("modelyard"):
                assert uid(spec, c) == 10001, where  # the Dockerfile's modelyard user


def test_artifacts_live_in_s3_with_credentials_from_irsa_or_an_optional_secret_and_no_shared_volume() -> None:
    from modelyard.catalog.s3store import parse_s3_uri

    bucket, prefix = parse_s3_uri(configmap()["MODELYARD_MODEL_STORE"])  # the code's own parser
    assert bucket and prefix
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects()}  # no RWX volume any more
    account = by_kind("ServiceAccount")["modelyard-artifacts"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
    )
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    s3_secret = next(g for g in kustomization["secretGenerator"] if g["name"] == "modelyard-s3")
    assert sorted(f.split("=", 1)[0] for f in s3_secret["files"]) == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    readers = set()
    for obj in objects():
        if obj["kind"] not in WORKLOADS:
            continue
        for c in pod_spec(obj)["containers"]:
            args = c.get("args", [])
            if c.get("command", ["modelyard"]) == ["modelyard"] and args[:1] in (["agent"], ["controller"]):
                where = f"{obj['metadata']['name']}/{c['name']}"
                readers.add(where)
                assert pod_spec(obj)["serviceAccountName"] == "modelyard-artifacts", where
                # The Secret is optional: with IRSA it does not exist and the pod still starts.
                assert {"secretRef": {"name": "modelyard-s3", "optional": True}} in c["envFrom"], where
    assert readers == {"triton/agent", "custom/agent", "mlserver/agent", "controller/controller"}


@pytest.mark.parametrize(("workload", "server"), [("custom", "container"), ("mlserver", "mlserver")])
def test_a_container_reads_its_agents_artifact_cache_at_the_same_path_read_only(
    workload: str, server: str
) -> None:
    obj = by_kind("StatefulSet")[workload]
    _, agent = parse(substituted(container(obj, "agent")))
    cache = str(agent["artifact_cache"])
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    mounts = {
        name: {m["mountPath"]: m for m in container(obj, name)["volumeMounts"]} for name in ("agent", server)
    }
    assert mounts["agent"][cache]["name"] == mounts[server][cache]["name"]
    assert "emptyDir" in volumes[mounts["agent"][cache]["name"]]
    assert mounts[server][cache].get("readOnly") is True and not mounts["agent"][cache].get("readOnly")
    limit = memory_bytes(volumes[mounts["agent"][cache]["name"]]["emptyDir"]["sizeLimit"])
    assert agent["artifact_cache_bytes"] < limit  # evicts before the kubelet would evict the pod
    if workload == "custom":  # our container loads only from that cache when the store is s3://
        _, values = parse(substituted(container(obj, server)))
        assert str(values["artifact_cache"]) == cache


def test_mlserver_runs_multi_model_from_the_agents_repository_with_no_models_at_startup() -> None:
    obj = by_kind("StatefulSet")["mlserver"]
    server, agent = container(obj, "mlserver"), container(obj, "agent")
    assert server["command"] == ["mlserver"] and server["args"][0] == "start"
    assert pod_spec(obj)["shareProcessNamespace"] is True  # the agent measures MLServer's memory
    settings_dir = server["args"][1]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    configmap_name = next(
        v["configMap"]["name"] for v in pod_spec(obj)["volumes"] if v["name"] == mounts[settings_dir]
    )
    settings = json.loads(by_kind("ConfigMap")[configmap_name]["data"]["settings.json"])
    assert settings["load_models_at_startup"] is False and settings["parallel_workers"] == 0
    _, values = parse(substituted(agent))
    assert values["backend"] == "mlserver"
    assert str(values["repository"]) == settings["model_repository_root"]
    assert mounts[settings["model_repository_root"]] in {m["name"] for m in agent["volumeMounts"]}
    assert (
        values["address"]
        == f"127.0.0.1:{settings['grpc_port']}"
        == f"127.0.0.1:{container_ports(server)['grpc']}"
    )
    for kind in PROBES:
        assert resolve_port(server[kind]["httpGet"]["port"], server) == settings["http_port"]
    policy = by_kind("NetworkPolicy")["containers-from-routers"]
    router_ports = {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
    assert settings["grpc_port"] in router_ports and settings["http_port"] not in router_ports


def test_every_probe_points_at_a_port_its_container_declares() -> None:
    probed = 0
    for where, spec in pods():
        for c in spec["containers"]:
            for kind in PROBES:
                if kind in c:
                    probe = c[kind]
                    handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
                    assert handler, f"{where}/{c['name']} {kind}"
                    resolve_port(handler["port"], c)
                    probed += 1
    assert probed >= 10


def test_every_service_port_targets_a_port_the_selected_pods_declare() -> None:
    workloads = [o for o in objects() if o["kind"] in WORKLOADS]
    for service in by_kind("Service").values():
        selector = service["spec"]["selector"]
        workload = next(
            w for w in workloads if selector.items() <= pod_template(w)["metadata"]["labels"].items()
        )
        declared = {n: p for c in pod_spec(workload)["containers"] for n, p in container_ports(c).items()}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = declared.get(target) if isinstance(target, str) else target
            assert number == port["port"] and number in declared.values(), service["metadata"]["name"]


def test_ports_are_unique_within_each_pod() -> None:
    for where, spec in pods():
        numbers = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])]
        names = [p["name"] for c in spec["containers"] for p in c.get("ports", [])]
        assert len(set(numbers)) == len(numbers) and len(set(names)) == len(names), where


def test_router_listens_probes_and_is_served_on_the_routers_default_port() -> None:
    port = default_of("serve", "port")
    assert port == 8001
    router = by_kind("Deployment")["router"]
    c = container(router, "router")
    assert int(option(c["args"], "--port")) == port
    assert option(c["args"], "--host") == "0.0.0.0"
    assert container_ports(c)["grpc"] == port
    # Probes on the plaintext metrics port: the kubelet's gRPC probe presents no client certificate.
    metrics = int(option(c["args"], "--metrics-port"))
    for kind in PROBES:
        assert resolve_port(c[kind]["httpGet"]["port"], c) == metrics
        assert c[kind]["httpGet"]["path"] == ("/healthz" if kind == "livenessProbe" else "/readyz")
    service = by_kind("Service")["router"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == port and resolve_port(grpc_port["targetPort"], c) == port
    metrics_port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert resolve_port(metrics_port["targetPort"], c) == int(option(c["args"], "--metrics-port")) == 9464


def test_router_runs_at_least_two_replicas_scaled_on_cpu_by_the_hpa() -> None:
    router = by_kind("Deployment")["router"]
    hpa = by_kind("HorizontalPodAutoscaler")["router"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "router")
    assert "replicas" not in router["spec"] and hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # CPU utilization is measured against the request.
    assert container(router, "router")["resources"]["requests"]["cpu"]


def test_our_container_listens_and_is_probed_on_its_default_port() -> None:
    port = default_of("container", "port")
    assert port == 8101
    c = container(by_kind("StatefulSet")["custom"], "container")
    assert int(option(c["args"], "--port")) == port == container_ports(c)["grpc"]
    assert c["readinessProbe"]["grpc"]["port"] == c["livenessProbe"]["grpc"]["port"] == port


def test_every_modelyard_process_declares_its_metrics_port_and_agents_and_routers_use_9464() -> None:
    for obj in objects():
        if obj["kind"] in WORKLOADS:
            for c in pod_spec(obj)["containers"]:
                if c["image"].startswith("modelyard") and "--metrics-port" in " ".join(c["args"]):
                    metrics = int(option(c["args"], "--metrics-port"))
                    assert metrics in container_ports(c).values(), c["name"]
                    if c["name"] in ("agent", "router"):
                        assert metrics == 9464


@pytest.mark.parametrize("where, args", COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_every_modelyard_command_line_is_accepted_by_the_cli(where: str, args: list[str]) -> None:
    command, values = parse(args)
    # Every option on the line was understood and given a value.
    for param in command.params:
        if any(arg == o or arg.startswith(o + "=") for o in param.opts for arg in args):
            assert values.get(param.name or "") is not None, f"{where}: {param.name}"


def test_every_workload_that_runs_modelyard_has_a_command_line_checked() -> None:
    assert {w for w, _ in COMMAND_LINES} == {
        "router/router",
        "triton/agent",
        "custom/container",
        "custom/agent",
        "mlserver/agent",
        "controller/controller",
        "rebalance/rebalance",
    }


def test_agents_register_under_the_pod_name_and_advertise_the_pod_ip_and_their_containers_port() -> None:
    for name, backend, serving in (
        ("triton", "triton", "triton"),
        ("custom", "custom", "container"),
        ("mlserver", "mlserver", "mlserver"),
    ):
        workload = by_kind("StatefulSet")[name]
        agent = container(workload, "agent")
        server = container(workload, serving)
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
        assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
        _, values = parse(substituted(agent))
        grpc_port = container_ports(server)["grpc"]
        assert values["container_id"] == "pod-0"  # the sample pod name
        assert values["backend"] == backend
        assert values["address"] == f"127.0.0.1:{grpc_port}"
        assert values["advertise"] == f"10.1.2.3:{grpc_port}"  # the sample pod IP
        # The budget the planner fills fits in the serving container's memory.
        assert values["memory_bytes"] < memory_bytes(server["resources"]["limits"]["memory"])
        assert workload["spec"]["serviceName"] in by_kind("Service")
        assert by_kind("Service")[workload["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def test_our_container_and_its_agent_agree_on_the_memory_budget() -> None:
    custom = by_kind("StatefulSet")["custom"]
    _, agent = parse(substituted(container(custom, "agent")))
    _, server = parse(substituted(container(custom, "container")))
    assert agent["memory_bytes"] == server["memory_bytes"]


def test_triton_and_its_agent_share_the_model_repository_and_the_process_namespace() -> None:
    triton = by_kind("StatefulSet")["triton"]
    spec = pod_spec(triton)
    assert spec["shareProcessNamespace"] is True  # the agent measures Triton's python-backend stubs
    server, agent = container(triton, "triton"), container(triton, "agent")
    assert server["command"] == ["tritonserver"]
    repository = option(server["args"], "--model-repository")
    assert option(server["args"], "--model-control-mode") == "explicit"
    grpc_port = int(option(server["args"], "--grpc-port"))
    assert grpc_port == container_ports(server)["grpc"] == 8001
    _, values = parse(substituted(agent))
    # The agent finds stubs by their script path, so both containers see the repository at the same path.
    assert str(values["repository"]) == repository
    assert values["kind"] == "gpu"
    volumes = {v["name"]: v for v in spec["volumes"]}
    shared = [{m["name"] for m in c["volumeMounts"] if m["mountPath"] == repository} for c in (server, agent)]
    assert shared[0] == shared[1] and len(shared[0]) == 1
    assert "emptyDir" in volumes[shared[0].pop()]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_modelyard_pod_reads_the_store_url_from_the_shared_config() -> None:
    etcd = by_kind("StatefulSet")["etcd"]
    members = [
        f"{etcd['metadata']['name']}-{i}.{etcd['spec']['serviceName']}"
        for i in range(etcd["spec"]["replicas"])
    ]
    client_port = container_ports(container(etcd, "etcd"))["client"]
    store = EtcdStore.from_url(configmap()["MODELYARD_STORE"])  # the code's own parser
    assert store.endpoints == [(member, client_port) for member in members]
    for where, spec in pods():
        for c in spec["containers"]:
            if c["image"].startswith("modelyard") and c.get("command") not in (
                ["tritonserver"],
                ["mlserver"],
            ):
                assert {"configMapRef": {"name": "modelyard"}} in c["envFrom"], f"{where}/{c['name']}"


def test_etcd_runs_three_members_behind_a_headless_service_that_publishes_unready_pods() -> None:
    etcd = by_kind("StatefulSet")["etcd"]
    service = by_kind("Service")[etcd["spec"]["serviceName"]]
    assert etcd["spec"]["replicas"] == 3
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    args = container(etcd, "etcd")["args"]
    initial = option(args, "--initial-cluster").split(",")
    assert len(initial) == etcd["spec"]["replicas"]


def test_two_controllers_run_for_failover_and_a_rebalance_runs_every_hour() -> None:
    controller = by_kind("Deployment")["controller"]
    assert controller["spec"]["replicas"] == 2  # one leads via its lease (tests/placement/test_controller.py)
    c = container(controller, "controller")
    assert c["args"][0] == "controller"
    assert resolve_port(c["readinessProbe"]["httpGet"]["port"], c) == int(option(c["args"], "--metrics-port"))
    cron = by_kind("CronJob")["rebalance"]
    minute, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and rest == ["*", "*", "*", "*"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert container(cron, "rebalance")["args"][:2] == ["placement", "rebalance"]


# -- alert rules -----------------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_have_a_name_expression_duration_severity_and_text() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_expressions_name_only_metrics_the_code_exports() -> None:
    exported = set(metric_names.ALL)
    for rule in alert_rules():
        used = set(re.findall(r"\bmodelyard_[a-z_]+", rule["expr"]))
        assert used, rule["alert"]
        for name in used:
            assert re.sub(r"_(bucket|sum|count)$", "", name) in exported, f"{rule['alert']}: {name}"


# One rule per subject: the metric it reads, a pattern its expression matches, and its `for`.
SUBJECTS = {
    "router error ratio over 5m above 5%": (
        metric_names.REQUESTS,
        r'sum\(rate\(modelyard_router_requests_total\{code!="OK"\}\[5m\]\)\)\s*/\s*'
        r"sum\(rate\(modelyard_router_requests_total\[5m\]\)\)\s*>\s*0\.05",
        None,
    ),
    "p99 latency per model above 1 s": (
        metric_names.REQUEST_DURATION,
        r"histogram_quantile\(0\.99,\s*sum by \(model, le\) \(\s*rate\("
        r"modelyard_router_request_duration_seconds_bucket\b.*\)\s*>\s*1$",
        None,
    ),
    "under-replicated models for 5m": (
        metric_names.UNPLACED_MODELS,
        r"modelyard_unplaced_models\)?\s*>\s*0",
        "5m",
    ),
    "copies failed for 5m": (metric_names.COPIES, r'modelyard_copies\{state="failed"\}\)?\s*>\s*0', "5m"),
    "containers near their budget": (
        metric_names.CONTAINER_MEMORY,
        r'modelyard_container_memory_bytes\{kind="used"\}\)\s*/\s*max by \(container\) \('
        r'modelyard_container_memory_bytes\{kind="capacity"\}\)\s*>\s*0\.9',
        None,
    ),
    "no leading controller": (
        metric_names.CONTROLLER_LEADER,
        r"^max\(modelyard_controller_leader\) < 1$",
        None,
    ),
    "cold-call wait p99 high": (
        metric_names.COLD_CALL_WAIT,
        r"histogram_quantile\(0\.99, sum by \(le\) \("
        r"rate\(modelyard_cold_call_wait_seconds_bucket\[5m\]\)\)\) > 10",
        None,
    ),
    "evictions per minute high": (
        metric_names.EVICTIONS,
        r"sum\(rate\(modelyard_evictions_total\[\d+m\]\)\) \* 60 > \d+",
        None,
    ),
    "store unreachable for 1m": (metric_names.STORE_REACHABLE, r"modelyard_store_reachable\s*==\s*0", "1m"),
    "watch lag above 5 s": (metric_names.WATCH_LAG, r"modelyard_watch_lag_seconds\s*>\s*5", None),
    "etcd above 80% of its space quota for 5m": (
        metric_names.STORE_DB_BYTES,
        r"max\(modelyard_store_db_bytes\) / max\(modelyard_store_quota_bytes\) > 0\.8",
        "5m",
    ),
    "etcd refusing writes (NOSPACE) for 1m": (
        metric_names.STORE_FULL,
        r"modelyard_store_full\)\s*>\s*0",
        "1m",
    ),
}


@pytest.mark.parametrize("subject", SUBJECTS)
def test_each_alert_subject_has_a_rule_with_its_threshold(subject: str) -> None:
    metric, pattern, duration = SUBJECTS[subject]
    rules = [r for r in alert_rules() if metric in r["expr"] and not r["expr"].startswith("absent(")]
    assert len(rules) == 1, subject
    assert re.search(pattern, " ".join(rules[0]["expr"].split()), re.DOTALL), rules[0]["expr"]
    if duration:
        assert rules[0]["for"] == duration


@pytest.mark.parametrize(
    ("component", "metric"),
    [
        ("router", metric_names.STORE_REACHABLE),
        ("controller", metric_names.CONTROLLER_LEADER),
        ("agents", metric_names.AGENT_REGISTERED),
    ],
)
def test_an_alert_fires_when_a_component_reports_no_metrics(component: str, metric: str) -> None:
    # Each is a gauge its component always exports (not a counter that appears on first use).
    assert any(" ".join(r["expr"].split()) == f"absent({metric})" for r in alert_rules()), component


def prometheus_rule_document() -> str:
    """deploy/k8s/monitoring/prometheusrule.yaml: alerts.yml's groups as a PrometheusRule."""

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "modelyard", "namespace": "modelyard"},
        "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]},
    }
    return (
        "# deploy/prometheus/alerts.yml as a PrometheusRule: the same groups (tests/test_deploy.py fails "
        "when they differ).\n# After editing alerts.yml: python -m tests.test_deploy > "
        "deploy/k8s/monitoring/prometheusrule.yaml\n"
        + yaml.dump(rule, Dumper=Dumper, sort_keys=False, width=110)
    )


def test_the_prometheus_rule_is_the_alert_file_as_written() -> None:
    assert (K8S / "monitoring" / "prometheusrule.yaml").read_text() == prometheus_rule_document(), (
        "stale: python -m tests.test_deploy > deploy/k8s/monitoring/prometheusrule.yaml"
    )


def test_the_latency_threshold_is_a_bucket_boundary_of_the_duration_histogram() -> None:
    # histogram_quantile interpolates inside a bucket: with 1 s a boundary, "above 1 s" is exact.
    assert 1 in DURATION_BUCKETS_S and max(DURATION_BUCKETS_S) > 1


# -- Dockerfile ------------------------------------------------------------------------------------------


def stages() -> dict[str, list[str]]:
    """Each stage's instructions (continuation lines joined), by stage name, in file order."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"FROM (\S+) AS (\w+)$", line):
            current = result[match.group(2)] = [line]
        elif line and not line.startswith("#"):
            current.append(line)
    return result


def instruction(stage: list[str], name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0] == name]


def test_dockerfile_builds_a_wheel_then_the_triton_target_and_the_default_modelyard_target() -> None:
    built = stages()
    assert list(built) == ["build", "triton", "modelyard"]  # the last stage is what `docker build` builds
    assert any("pip wheel" in run and "/wheels" in run for run in instruction(built["build"], "RUN"))
    assert re.search(r"ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", DOCKERFILE.read_text())
    assert built["triton"][0] == "FROM ${TRITON_IMAGE} AS triton"
    for runtime in ("triton", "modelyard"):
        assert any(c.startswith("--from=build /") for c in instruction(built[runtime], "COPY")), runtime


def test_dockerfile_runtime_targets_end_as_non_root_users_the_manifests_use() -> None:
    built = stages()
    assert instruction(built["modelyard"], "USER")[-1] == "10001"
    assert instruction(built["triton"], "USER")[-1] == "1000"
    assert "--uid 10001" in " ".join(instruction(built["modelyard"], "RUN"))


def test_dockerfile_default_target_runs_the_router_on_its_default_port_with_a_health_check() -> None:
    stage = stages()["modelyard"]
    assert instruction(stage, "ENTRYPOINT") == ['["modelyard"]']
    cmd = json.loads(instruction(stage, "CMD")[-1])
    command, values = parse(cmd)
    assert command.name == "serve"
    assert values["port"] == default_of("serve", "port") == 8001 and values["host"] == "0.0.0.0"
    exposed = {int(p) for line in instruction(stage, "EXPOSE") for p in line.split()}
    assert {8001, default_of("container", "port"), values["metrics_port"]} <= exposed
    healthcheck = instruction(stage, "HEALTHCHECK")[-1]
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe[:2] == ["python", "-c"]
    compile(
        probe[2], "HEALTHCHECK", "exec"
    )  # the check is valid Python (tests/test_deploy_processes.py runs it)
    assert f"'http://127.0.0.1:{values['metrics_port']}/readyz'" in probe[2]


def test_dockerfile_build_stage_copies_every_file_the_wheel_is_built_from() -> None:
    copied = {source for line in instruction(stages()["build"], "COPY") for source in line.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "setup.py", "protos", project["project"]["readme"]} <= copied


# -- Grafana dashboard -----------------------------------------------------------------------------------


def test_the_dashboard_queries_only_exported_metrics_and_covers_the_fleet() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "modelyard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bmodelyard_[a-z_]+", e)
    }
    assert used <= set(metric_names.ALL)
    assert used >= set(metric_names.ALL) - {metric_names.LAZY_LOAD_DURATION, metric_names.AGENT_LOADS}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


if __name__ == "__main__":
    print(prometheus_rule_document(), end="")
