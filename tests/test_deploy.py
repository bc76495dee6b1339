"""Deployment artefacts checked for structure: Kubernetes manifests, alert rules, Dockerfile.

The image cannot be built on these machines (no Docker engine) and no cluster is at hand, so these tests
check what can be checked without them: the objects parse, reference each other consistently, use the
ports the code serves on, pass arguments the real CLI accepts, and alert on metrics the code exports.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from modelyard import metric_names
from modelyard.cli import main

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
WORKLOADS = ("Deployment", "StatefulSet")


def objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def default_of(command: str, option: str) -> Any:
    cmd = main.commands[command]
    return next(p.default for p in cmd.params if p.name == option)


def test_every_object_has_api_version_kind_and_a_name() -> None:
    for obj in objects():
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj


def test_kustomization_lists_exactly_the_manifests_present() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_workload_selectors_match_their_pod_labels() -> None:
    for obj in objects():
        if obj["kind"] in WORKLOADS:
            selector = obj["spec"]["selector"]["matchLabels"]
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), obj["metadata"]["name"]


def test_containers_have_images_resources_and_run_as_non_root() -> None:
    for obj in objects():
        if obj["kind"] in (*WORKLOADS, "CronJob"):
            spec = pod_spec(obj)
            assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
            for container in spec["containers"]:
                assert container["image"], container["name"]
                assert container["resources"]["requests"] and container["resources"]["limits"]
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_router_service_and_probes_use_the_routers_default_port() -> None:
    port = default_of("serve", "port")
    assert port == 8001
    router = by_kind("Deployment")["router"]
    container = pod_spec(router)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    assert container["readinessProbe"]["grpc"]["port"] == port
    service = by_kind("Service")["router"]
    assert service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["grpc"] in ("grpc", port)


def test_our_container_listens_on_its_default_port() -> None:
    port = default_of("container", "port")
    custom = by_kind("StatefulSet")["custom"]
    container = next(c for c in pod_spec(custom)["containers"] if c["name"] == "container")
    assert container["ports"][0]["containerPort"] == port == 8101
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert "--port" in container["args"] and str(port) in container["args"]


def test_the_hpa_scales_the_router_deployment() -> None:
    hpa = next(iter(by_kind("HorizontalPodAutoscaler").values()))
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "router")


def _substituted(args: list[str]) -> list[str]:
    return [
        re.sub(r"\$\((\w+)\)", lambda m: {"POD_NAME": "pod-0", "POD_IP": "10.0.0.1"}[m.group(1)], a)
        for a in args
    ]


def command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for obj in objects():
        if obj["kind"] in (*WORKLOADS, "CronJob"):
            for container in pod_spec(obj)["containers"]:
                if container.get("command", ["modelyard"])[0] == "modelyard" and container[
                    "image"
                ].startswith("modelyard"):
                    lines.append(
                        (f"{obj['metadata']['name']}/{container['name']}", _substituted(container["args"]))
                    )
    return lines


@pytest.mark.parametrize("where, args", command_lines(), ids=[w for w, _ in command_lines()])
def test_every_modelyard_command_line_is_accepted_by_the_cli(where: str, args: list[str]) -> None:
    command: click.Command = main
    rest = list(args)
    while isinstance(command, click.Group):
        name = rest.pop(0)
        assert name in command.commands, f"{where}: no command {name!r}"
        command = command.commands[name]
    # Parsing raises on an unknown option, a bad value or a missing required one.
    with command.make_context(str(command.name), rest) as context:
        assert context.params, where


def test_agents_use_the_pod_name_and_advertise_the_pod_ip() -> None:
    for name in ("triton", "custom"):
        agent = next(c for c in pod_spec(by_kind("StatefulSet")[name])["containers"] if c["name"] == "agent")
        assert "--id=$(POD_NAME)" in agent["args"]
        assert any(a.startswith("--advertise=$(POD_IP):") for a in agent["args"])
        assert {e["name"] for e in agent["env"]} == {"POD_NAME", "POD_IP"}
    triton = by_kind("StatefulSet")["triton"]
    assert pod_spec(triton)["shareProcessNamespace"] is True  # the agent measures Triton's stub processes


ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_have_the_required_fields() -> None:
    for rule in alert_rules():
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in ("page", "warn")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_expressions_name_only_metrics_the_code_exports() -> None:
    exported = set(metric_names.ALL)
    for rule in alert_rules():
        used = set(re.findall(r"\bmodelyard_[a-z_]+", rule["expr"]))
        assert used, rule["alert"]
        for name in used:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in exported, f"{rule['alert']}: {name} is not exported"


def test_each_alert_subject_is_covered() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for metric in (
        metric_names.REQUESTS,
        metric_names.REQUEST_DURATION + "_bucket",
        metric_names.UNPLACED_MODELS,
        metric_names.CONTAINER_MEMORY_USED,
        metric_names.STORE_REACHABLE,
        metric_names.WATCH_LAG,
    ):
        assert metric in exprs


def test_dockerfile_has_both_targets_a_non_root_user_and_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.MULTILINE)
    assert stages == ["build", "triton", "modelyard"]
    assert re.search(r"^USER 10001$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and re.search(r"^EXPOSE .*\b8001\b", text, re.MULTILINE)
    assert 'ENTRYPOINT ["modelyard"]' in text


def test_the_dashboard_queries_only_exported_metrics_and_covers_the_fleet() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "modelyard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bmodelyard_[a-z_]+", e)
    }
    assert used <= set(metric_names.ALL)
    assert used >= set(metric_names.ALL) - {metric_names.LAZY_LOAD_DURATION, metric_names.AGENT_LOADS}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
