"""deploy/k8s as a cluster would receive it: rendered by kustomize (`kubectl kustomize`), every object checked
against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail), and the NetworkPolicies
evaluated against the rendered pods' labels and ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy_render import pod_template, render, workloads

# The oldest Kubernetes release the manifests promise to work on (autoscaling/v2 and policy/v1 are GA there;
# grpc probes are GA from 1.27), and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
ROOT = Path(__file__).resolve().parents[1]
PART_OF = {"app.kubernetes.io/part-of": "modelyard"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("render"))


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("render"), "monitoring")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(
    rendered: list[dict[str, Any]], version: str
) -> None:
    kinds = set()
    for obj in rendered:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")
        kinds.add(obj["kind"])
    expected = {"Deployment", "StatefulSet", "CronJob", "Service", "ConfigMap", "Secret", "NetworkPolicy"}
    assert expected | {"PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_monitoring_objects_select_the_pods_metrics_ports_and_carry_the_alert_rules(
    rendered: list[dict[str, Any]], monitoring: list[dict[str, Any]]
) -> None:
    # PodMonitor and PrometheusRule are the Prometheus Operator's CRDs: kubernetes-validate has no schema for
    # them and this repository vendors none of the operator's (its CRD files live in its own repository, on
    # no package registry), so they get no schema check; this test checks what the operator acts on instead.
    by_kind = {o["kind"]: o for o in monitoring}
    assert set(by_kind) == {"PodMonitor", "PrometheusRule"}
    for obj in monitoring:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["metadata"]["namespace"] == "modelyard"
    monitor = by_kind["PodMonitor"]["spec"]
    selector = monitor["selector"]["matchLabels"]
    scraped: set[tuple[str, str]] = set()
    for name, obj in workloads(rendered).items():
        template = pod_template(obj)
        if selector.items() <= template["metadata"]["labels"].items():
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            scraped |= {(name, e["port"]) for e in monitor["podMetricsEndpoints"] if e["port"] in ports}
    for component in ("router", "controller", "triton", "custom", "mlserver"):
        assert (component, "metrics") in scraped, component
    assert ("custom", "metrics-custom") in scraped and ("triton", "triton-metrics") in scraped
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert by_kind["PrometheusRule"]["spec"]["groups"] == alerts["groups"]


def test_every_pod_template_carries_the_part_of_label_the_store_policy_admits(
    rendered: list[dict[str, Any]],
) -> None:
    for name, obj in workloads(rendered).items():
        assert PART_OF.items() <= pod_template(obj)["metadata"]["labels"].items(), name


def test_the_router_replica_count_is_left_to_its_autoscaler(rendered: list[dict[str, Any]]) -> None:
    router = workloads(rendered)["router"]
    hpa = next(o for o in rendered if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "router"
    assert "replicas" not in router["spec"]  # apply would reset the HPA's count to it


def test_controller_and_every_container_statefulset_have_a_disruption_budget(
    rendered: list[dict[str, Any]],
) -> None:
    budgets = [o["spec"]["selector"]["matchLabels"] for o in rendered if o["kind"] == "PodDisruptionBudget"]
    for name in ("router", "controller", "triton", "custom", "mlserver", "etcd"):
        labels = pod_template(workloads(rendered)[name])["metadata"]["labels"]
        assert any(b.items() <= labels.items() for b in budgets), name


# -- NetworkPolicies -----------------------------------------------------------------------------------------


class Pod:
    """A pod as NetworkPolicies see it: namespace, labels and its containers' named ports."""

    def __init__(self, name: str, namespace: str, labels: dict[str, str], ports: dict[str, int]) -> None:
        self.name, self.namespace, self.labels, self.ports = name, namespace, labels, ports


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the evaluator reads matchLabels only: {selector}"
    return dict(selector.get("matchLabels", {})).items() <= labels.items()


def peer_admits(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"the evaluator reads no ipBlock: {peer}"
    if "namespaceSelector" in peer:
        # Namespaces carry only kubernetes.io/metadata.name here: {} admits every namespace.
        namespace_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        namespace_ok = source.namespace == policy_namespace
    return namespace_ok and selects(peer.get("podSelector", {}), source.labels)


def port_admits(rule_ports: list[dict[str, Any]] | None, target: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        assert p.get("protocol", "TCP") == "TCP"
        number = target.ports.get(p["port"]) if isinstance(p["port"], str) else p["port"]
        if number == port:
            return True
    return False


def ingress_allowed(policies: list[dict[str, Any]], source: Pod, target: Pod, port: int) -> bool:
    """Kubernetes' rule: traffic between two containers of one pod is not filtered; a pod no Ingress policy
    selects accepts everything; otherwise some rule of a policy selecting it must admit source and port."""
    if source is target:
        return True
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            from_ok = not peers or any(peer_admits(p, target.namespace, source) for p in peers)
            if from_ok and port_admits(rule.get("ports"), target, port):
                return True
    return False


@pytest.fixture(scope="module")
def fleet(rendered: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Pod]]:
    pods = {}
    for name, obj in workloads(rendered).items():
        template = pod_template(obj)
        ports = {
            p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
        }
        pods[name] = Pod(name, obj["metadata"]["namespace"], template["metadata"]["labels"], ports)
    policies = [o for o in rendered if o["kind"] == "NetworkPolicy"]
    assert not any("Egress" in p["spec"].get("policyTypes", []) for p in policies)  # egress is not limited
    return policies, pods


CONTAINER_PODS = ("triton", "custom", "mlserver")


def test_routers_reach_every_containers_serving_port(
    fleet: tuple[list[dict[str, Any]], dict[str, Pod]],
) -> None:
    policies, pods = fleet
    for name in CONTAINER_PODS:
        assert ingress_allowed(policies, pods["router"], pods[name], pods[name].ports["grpc"]), name


def test_each_agent_reaches_its_own_container_over_the_pods_loopback(
    rendered: list[dict[str, Any]], fleet: tuple[list[dict[str, Any]], dict[str, Pod]]
) -> None:
    policies, pods = fleet
    for name in CONTAINER_PODS:
        agent = next(
            c for c in pod_template(workloads(rendered)[name])["spec"]["containers"] if c["name"] == "agent"
        )
        address = next(a.split("=", 1)[1] for a in agent["args"] if a.startswith("--address="))
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) == pods[name].ports["grpc"], name  # same pod: unfiltered
        assert ingress_allowed(policies, pods[name], pods[name], int(port))


def test_every_modelyard_pod_reaches_the_store(fleet: tuple[list[dict[str, Any]], dict[str, Pod]]) -> None:
    policies, pods = fleet
    client = pods["etcd"].ports["client"]
    for name, pod in pods.items():
        assert ingress_allowed(policies, pod, pods["etcd"], client), name
    peer = pods["etcd"].ports["peer"]
    assert ingress_allowed(policies, pods["etcd"], pods["etcd"], peer)


def test_nothing_else_reaches_the_containers_or_the_store(
    fleet: tuple[list[dict[str, Any]], dict[str, Pod]],
) -> None:
    policies, pods = fleet
    strangers = [
        Pod("other-app", "modelyard", {"app": "other"}, {}),
        Pod("elsewhere", "default", {"app.kubernetes.io/part-of": "modelyard"}, {}),
    ]
    # Pods of modelyard that do not route: the controller, the rebalance job, the store, other containers.
    not_routers = [pods[n] for n in ("controller", "rebalance", "etcd")]
    for target in (pods[n] for n in CONTAINER_PODS):
        for source in [*strangers, *not_routers, *(pods[n] for n in CONTAINER_PODS if pods[n] is not target)]:
            assert not ingress_allowed(policies, source, target, target.ports["grpc"]), (
                source.name,
                target.name,
            )
    etcd = pods["etcd"]
    for source in strangers:
        assert not ingress_allowed(policies, source, etcd, etcd.ports["client"]), source.name
    for source in (*strangers, pods["router"], pods["controller"]):
        assert not ingress_allowed(policies, source, etcd, etcd.ports["peer"]), source.name


def test_a_labelled_zero_hop_client_in_any_namespace_reaches_the_containers(
    fleet: tuple[list[dict[str, Any]], dict[str, Pod]],
) -> None:
    policies, pods = fleet
    client = Pod("client", "apps", {"modelyard.io/zero-hop": "true"}, {})
    for name in CONTAINER_PODS:
        assert ingress_allowed(policies, client, pods[name], pods[name].ports["grpc"]), name
