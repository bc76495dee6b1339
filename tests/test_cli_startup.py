"""`modelyard placement ...` and `modelyard models ...` import only what they use: a plan of 10k models takes
a few tenths of a second, and gRPC, numpy, the Triton client and OpenTelemetry alone cost more.

The one exception: `placement plan` runs the planner, whose sorts and ring searches are numpy's (0.1-0.15 s to
import, 3 s less at 1M models x 10k containers: issue 30)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("grpc", "tritonclient", "numpy", "opentelemetry", "google.protobuf", "aetcd", "rich", "asyncio")


def imported_modules(args: list[str], cwd: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "modelyard", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def heavy(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        m for m in modules if (m.split(".")[0] in HEAVY or m in HEAVY) and m.split(".")[0] not in allowed
    )


def test_placement_plan_imports_no_grpc_triton_client_or_telemetry(tmp_path: Path) -> None:
    (tmp_path / "models.jsonl").write_text(
        json.dumps({"name": "m", "memory_bytes": 10, "replicas": 1}) + "\n"
    )
    (tmp_path / "containers.jsonl").write_text(
        json.dumps({"id": "c", "memory_bytes": 100, "kind": "cpu"}) + "\n"
    )
    modules = imported_modules(
        [
            "placement",
            "plan",
            "--models",
            "models.jsonl",
            "--containers",
            "containers.jsonl",
            "--out",
            "map.json",
        ],
        tmp_path,
    )
    assert "modelyard.placement.planner" in modules  # the measurement saw the command run
    assert heavy(modules, allowed=("numpy",)) == []
    assert json.loads((tmp_path / "map.json").read_text())["assignments"] == {"m": ["c"]}


@pytest.mark.parametrize("group", ["models", "placement"])
def test_a_group_help_imports_no_grpc_numpy_or_triton_client(tmp_path: Path, group: str) -> None:
    modules = imported_modules([group, "--help"], tmp_path)
    # the group's own imports were measured (importlib.import_module itself is not logged by -X importtime)
    assert (
        "modelyard.catalog.registration" if group == "models" else "modelyard.placement.inputs"
    ) in modules
    assert heavy(modules) == []
