"""`placement plan`: files in, MAP.json out, and one clear line for every input mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from modelyard.commands.placement import placement

REPO = Path(__file__).resolve().parents[2]

MODELS = [
    {"name": "resnet", "memory_bytes": 400, "replicas": 2, "kind": "gpu"},
    {"name": "bert", "memory_bytes": 300, "kind": "any"},
    {"name": "tiny", "memory_bytes": 50, "replicas": 1, "kind": "cpu", "owner": "team-a"},
    {"name": "huge", "memory_bytes": 5000, "replicas": 1, "kind": "cpu"},
]
CONTAINERS = [
    {"id": "gpu-1", "memory_bytes": 1000, "kind": "gpu"},
    {"id": "gpu-2", "memory_bytes": 1000, "kind": "gpu", "zone": "b"},
    {"id": "cpu-1", "memory_bytes": 800, "kind": "cpu"},
]


def jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    return jsonl(tmp_path / "models.jsonl", MODELS), jsonl(tmp_path / "containers.jsonl", CONTAINERS)


def run_plan(*args: str | Path) -> Result:
    return CliRunner().invoke(placement, ["plan", *map(str, args)])


def test_plan_writes_a_map_of_version_1_with_assignments_and_unplaced(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    models, containers = inputs
    out = tmp_path / "map.json"
    result = run_plan("--models", models, "--containers", containers, "--out", out)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["version"] == 1
    assert sorted(document["assignments"]["resnet"]) == ["gpu-1", "gpu-2"]
    assert set(document["assignments"]) == {"resnet", "bert", "tiny"}
    assert document["unplaced"] == ["huge"]
    assert "5000" in document["reasons"]["huge"]
    assert list(document) == sorted(document)
    assert list(document["assignments"]) == sorted(document["assignments"])
    summary = result.stderr.strip().splitlines()
    assert len(summary) == 1 and "placed 4 copies" in summary[0] and "1 models unplaced" in summary[0]


def test_plan_with_previous_keeps_its_copies_and_increments_its_version(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    models, containers = inputs
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({"version": 41, "assignments": {"bert": ["cpu-1"], "gone": ["gpu-1"]}}))
    out = tmp_path / "map.json"
    result = run_plan("--models", models, "--containers", containers, "--previous", previous, "--out", out)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["version"] == 42
    assert document["assignments"]["bert"] == ["cpu-1"]
    assert "gone" not in document["assignments"]


def test_plan_can_update_its_previous_map_in_place(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    models, containers = inputs
    current = tmp_path / "map.json"
    assert run_plan("--models", models, "--containers", containers, "--out", current).exit_code == 0
    first = json.loads(current.read_text())
    args = ("--models", models, "--containers", containers, "--previous", current, "--out", current)
    assert run_plan(*args, "--rebalance").exit_code == 0
    second = json.loads(current.read_text())
    assert second["version"] == first["version"] + 1
    assert second["assignments"] == first["assignments"]


def test_plan_in_separate_processes_writes_byte_identical_maps(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Run as the real command would be, with different string-hash seeds: nothing may depend on hash()."""
    models, containers = inputs
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"map-{seed}.json"
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelyard",
                "placement",
                "plan",
                "--models",
                str(models),
                "--containers",
                str(containers),
                "--out",
                str(out),
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("placed ")
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path: Path) -> None:
    models = tmp_path / "models.jsonl"
    models.write_text('\n{"name": "a", "memory_bytes": 1}\n   \n{"name": "b", "memory_bytes": 0}\n')
    containers = jsonl(tmp_path / "containers.jsonl", CONTAINERS)
    result = run_plan("--models", models, "--containers", containers, "--out", tmp_path / "map.json")
    assert result.exit_code == 2
    assert result.stderr == f"error: {models}:4: memory_bytes must be > 0, got 0\n"


GOOD_MODEL = '{"name": "ok", "memory_bytes": 10}'
GOOD_CONTAINER = '{"id": "ok", "memory_bytes": 10, "kind": "cpu"}'


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"name": "m", "memory_bytes": 10', "not valid JSON"),
        ('["m", 10]', 'expected a JSON object, got ["m", 10]'),
        ('{"memory_bytes": 10}', "name must be a non-empty string, got nothing"),
        ('{"name": 7, "memory_bytes": 10}', "name must be a non-empty string, got 7"),
        ('{"name": "m"}', "missing memory_bytes"),
        ('{"name": "m", "memory_bytes": true}', "memory_bytes must be an integer, got true"),
        ('{"name": "m", "memory_bytes": 1.5}', "memory_bytes must be an integer, got 1.5"),
        ('{"name": "m", "memory_bytes": -3}', "memory_bytes must be > 0, got -3"),
        ('{"name": "m", "memory_bytes": 10, "replicas": 0}', "replicas must be >= 1, got 0"),
        ('{"name": "m", "memory_bytes": 10, "replicas": false}', "replicas must be an integer, got false"),
        ('{"name": "m", "memory_bytes": 10, "replicas": "2"}', 'replicas must be an integer, got "2"'),
        ('{"name": "m", "memory_bytes": 10, "kind": "tpu"}', 'kind must be one of gpu, cpu, any, got "tpu"'),
        ('{"name": "ok", "memory_bytes": 20}', 'duplicate model name "ok" (first on line 1)'),
    ],
)
def test_a_bad_models_line_fails_with_its_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    models = tmp_path / "models.jsonl"
    models.write_text(f"{GOOD_MODEL}\n{bad_line}\n{GOOD_MODEL.replace('ok', 'later')}\n")
    containers = jsonl(tmp_path / "containers.jsonl", CONTAINERS)
    result = run_plan("--models", models, "--containers", containers, "--out", tmp_path / "map.json")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {models}:2: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "map.json").exists()


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "c", "memory_bytes": 10}', "kind must be one of gpu, cpu, got nothing"),
        ('{"id": "c", "memory_bytes": 10, "kind": "any"}', 'kind must be one of gpu, cpu, got "any"'),
        ('{"id": "c", "memory_bytes": 0, "kind": "gpu"}', "memory_bytes must be > 0, got 0"),
        ('{"id": "c", "memory_bytes": "80GB", "kind": "gpu"}', 'memory_bytes must be an integer, got "80GB"'),
        ('{"id": "", "memory_bytes": 10, "kind": "gpu"}', 'id must be a non-empty string, got ""'),
        ('{"id": "ok", "memory_bytes": 10, "kind": "gpu"}', 'duplicate container id "ok" (first on line 1)'),
        ("not json", "not valid JSON"),
    ],
)
def test_a_bad_containers_line_fails_with_its_file_and_line(
    tmp_path: Path, bad_line: str, message: str
) -> None:
    models = jsonl(tmp_path / "models.jsonl", MODELS)
    containers = tmp_path / "containers.jsonl"
    containers.write_text(f"{GOOD_CONTAINER}\n{bad_line}\n")
    result = run_plan("--models", models, "--containers", containers, "--out", tmp_path / "map.json")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {containers}:2: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("previous_text", "message"),
    [
        ('{"version": 1,\n "assignments": {"m": ["c"]\n', ":3: not valid JSON"),
        ('["not", "a", "map"]', ':1: expected a JSON object with "assignments"'),
        ('{"version": 1,\n "assignments": ["m"]}', ":2: assignments must be an object"),
        ('{"version": -1, "assignments": {}}', ":1: version must be an integer >= 0, got -1"),
        (
            '{"assignments": {\n "a": ["c"],\n "b": "c"}}',
            ':3: assignments["b"] must be a list of container ids',
        ),
    ],
)
def test_a_bad_previous_map_fails_with_its_file_and_line(
    inputs: tuple[Path, Path], tmp_path: Path, previous_text: str, message: str
) -> None:
    models, containers = inputs
    previous = tmp_path / "previous.json"
    previous.write_text(previous_text)
    result = run_plan(
        "--models", models, "--containers", containers, "--previous", previous, "--out", tmp_path / "map.json"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {previous}{message}")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("missing", ["--models", "--containers", "--previous"])
def test_a_missing_input_file_fails_with_one_line(
    inputs: tuple[Path, Path], tmp_path: Path, missing: str
) -> None:
    models, containers = inputs
    previous = tmp_path / "previous.json"
    previous.write_text('{"version": 1, "assignments": {}}')
    paths = {"--models": models, "--containers": containers, "--previous": previous}
    paths[missing] = tmp_path / "nowhere.jsonl"
    result = run_plan(
        *[part for flag, path in paths.items() for part in (flag, path)], "--out", tmp_path / "m.json"
    )
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'nowhere.jsonl'}: no such file\n"


def test_an_unwritable_output_fails_with_one_line(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    models, containers = inputs
    out = tmp_path / "no-such-dir" / "map.json"
    result = run_plan("--models", models, "--containers", containers, "--out", out)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot write {out}: ")
    assert result.stderr.count("\n") == 1
