"""The command line's conventions, through the real `modelyard` process: `-o table|json|yaml` on every
list and show, plain columns when piped and boxes on a terminal, `--version`, read-only commands that refuse
a store that does not exist, `--log-level` before and after the subcommand, one verb family with the older
verbs still working, and click's shell completion."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

PACK = """
import json, numpy as np
np.savez("weights.npz", factor=np.array([2.0], dtype=np.float32))
json.dump({"backend": "custom", "framework": "numpy", "format": 1, "op": "scale",
           "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
           "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}]}, open("manifest.json", "w"))
"""
FLEET = """
models:
  - {name: double, version: 1, archive: double}
  - {name: double, version: 2, archive: double, tenants: [acme]}
pipelines:
  - name: quad
    version: 1
    inputs: [{name: X, datatype: FP32, shape: [-1]}]
    outputs: [{name: Z, datatype: FP32, shape: [-1]}]
    steps:
      - {name: a, model: double@1, inputs: {INPUT: X}, outputs: {OUTPUT: Y}}
      - {name: b, model: double@1, inputs: {INPUT: Y}, outputs: {OUTPUT: Z}}
routes:
  - {model: double, default: 1, pins: {acme: 2}}
"""
BOX = set("─│┃━┏┓┗┛┡┩└┘┌┐├┤┬┴┼╭╮╯╰═║")
# Every list and show command, with the arguments it needs.
LISTS_AND_SHOWS = {
    "models list": ("models", "list"),
    "models show": ("models", "show", "double"),
    "pipelines list": ("pipelines", "list"),
    "pipelines show": ("pipelines", "show", "quad"),
    "routes show": ("routes", "show"),
    "placement show": ("placement", "show"),
}
READ_ONLY = {**LISTS_AND_SHOWS, "export": ("export",)}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
    return env


def modelyard(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env or clean_env(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose default store (.modelyard/store) holds two model versions, a pipeline and a rule."""
    work = tmp_path_factory.mktemp("conventions")
    (work / "double").mkdir()
    subprocess.run([sys.executable, "-c", PACK], cwd=work / "double", check=True, timeout=60)
    (work / "fleet.yaml").write_text(FLEET)
    done = modelyard("apply", "-f", "fleet.yaml", cwd=work)
    assert done.returncode == 0, done.stderr
    return work


@pytest.mark.parametrize("command", LISTS_AND_SHOWS)
def test_every_list_and_show_speaks_json_yaml_and_plain_table(fleet: Path, command: str) -> None:
    args = LISTS_AND_SHOWS[command]
    as_json = modelyard(*args, "-o", "json", cwd=fleet)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data  # something was listed
    as_yaml = modelyard(*args, "-o", "yaml", cwd=fleet)
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == data
    table = modelyard(*args, "-o", "table", cwd=fleet)
    assert table.returncode == 0, table.stderr
    assert table.stdout == modelyard(*args, cwd=fleet).stdout  # table is the default
    assert table.stdout.strip() and not BOX & set(table.stdout), table.stdout  # piped: no box drawing


@pytest.mark.parametrize("command", ["models list", "placement show"])
def test_the_old_json_flag_still_works(fleet: Path, command: str) -> None:
    args = LISTS_AND_SHOWS[command]
    old = modelyard(*args, "--json", cwd=fleet)
    assert old.returncode == 0, old.stderr
    assert json.loads(old.stdout) == json.loads(modelyard(*args, "-o", "json", cwd=fleet).stdout)


def test_a_list_is_plain_columns_when_piped_and_boxed_on_a_terminal(fleet: Path) -> None:
    piped = modelyard("models", "list", cwd=fleet)
    lines = piped.stdout.splitlines()
    assert lines[0].split() == ["model", "backend", "kind", "memory", "replicas", "ready", "tenants"]
    assert lines[1].split() == ["double@1", "custom", "cpu", "4", "B", "1", "0", "public"]
    primary, replica = pty.openpty()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "modelyard", "models", "list"],
            stdout=replica, stderr=subprocess.PIPE, cwd=fleet, env=clean_env(), timeout=60,
        )  # fmt: skip
        os.close(replica)
        out = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal's other end closed: everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(primary)
    assert process.returncode == 0, process.stderr
    assert BOX & set(out.decode(errors="replace")), out


def test_version_names_the_installed_release(tmp_path: Path) -> None:
    result = modelyard("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"modelyard {importlib.metadata.version('modelyard')}"


@pytest.mark.parametrize("command", READ_ONLY)
def test_read_only_commands_refuse_a_store_that_does_not_exist(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "typo-store"
    result = modelyard(*READ_ONLY[command], "--store", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: no store at {missing}: give --store (or $MODELYARD_STORE) naming an existing store"
    )
    assert not missing.exists()  # not created either


def test_the_default_store_is_refused_too_when_absent(tmp_path: Path) -> None:
    result = modelyard("models", "list", cwd=tmp_path)
    assert result.returncode == 2 and "no store at .modelyard/store" in result.stderr
    assert not (tmp_path / ".modelyard").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("--log-level", "DEBUG", "models", "list"),
        ("models", "list", "--log-level", "DEBUG"),
        ("models", "--log-level", "debug", "list"),
        ("placement", "show", "--log-level", "debug"),
    ],
    ids=["before", "after", "between", "after-nested"],
)
def test_log_level_is_accepted_before_and_after_the_subcommand(fleet: Path, args: tuple[str, ...]) -> None:
    result = modelyard(*args, cwd=fleet)
    assert result.returncode == 0, result.stderr
    assert " DEBUG asyncio: Using selector" in result.stderr  # the level took effect
    quiet = modelyard(*[a for a in args if a.lower() != "debug" and a != "--log-level"], cwd=fleet)
    assert " DEBUG " not in quiet.stderr


def test_a_bad_log_level_is_one_usage_error_not_a_traceback(fleet: Path) -> None:
    result = modelyard("models", "list", "--log-level", "LOUD", cwd=fleet)
    assert result.returncode == 2
    assert "Invalid value for '--log-level'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("group", "verbs", "hidden"),
    [
        ("models", {"add", "list", "show", "set", "remove"}, "upload"),
        ("pipelines", {"add", "list", "show", "remove"}, "register"),
        ("routes", {"set", "show", "remove"}, "clear"),
    ],
)
def test_one_verb_family_with_the_old_verbs_hidden(
    tmp_path: Path, group: str, verbs: set[str], hidden: str
) -> None:
    shown = modelyard(group, "--help", cwd=tmp_path).stdout
    listed = set(shown.split("Commands:")[1].split()[0::1])
    assert verbs <= listed
    assert hidden not in {
        line.split()[0] for line in shown.split("Commands:")[1].splitlines() if line.strip()
    }
    assert modelyard(group, hidden, "--help", cwd=tmp_path).returncode == 0  # still there


def test_old_and_new_verbs_both_work(fleet: Path, tmp_path: Path) -> None:
    store = ("--store", str(tmp_path / "store"), "--model-store", str(tmp_path / "artifacts"))
    new = modelyard("models", "add", "double", "--name", "d", "--version", "1", *store, cwd=fleet)
    assert new.returncode == 0 and new.stdout.startswith("registered d@1"), new.stderr
    old = modelyard("models", "upload", "double", "--name", "d", "--version", "2", *store, cwd=fleet)
    assert old.returncode == 0 and old.stdout.startswith("registered d@2"), old.stderr
    for verb in ("remove", "clear"):
        assert modelyard("routes", "set", "d", "--default", "1", *store[:2], cwd=fleet).returncode == 0
        removed = modelyard("routes", verb, "d", *store[:2], cwd=fleet)
        assert removed.returncode == 0 and removed.stdout.strip() == "route rule for d removed"


def test_shell_completion_completes_the_commands(tmp_path: Path) -> None:
    env = {**clean_env(), "_MODELYARD_COMPLETE": "bash_source"}
    script = subprocess.run(["modelyard"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert "_modelyard_completion" in script.stdout
    env = {
        **clean_env(),
        "_MODELYARD_COMPLETE": "bash_complete",
        "COMP_WORDS": "modelyard mo",
        "COMP_CWORD": "1",
    }
    words = subprocess.run(["modelyard"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert "plain,models" in words.stdout.splitlines()
    env["COMP_WORDS"], env["COMP_CWORD"] = "modelyard models a", "2"
    words = subprocess.run(["modelyard"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert "plain,add" in words.stdout.splitlines()


def test_commands_as_users_run_them(fleet: Path) -> None:
    """The whole `modelyard` process, as a shell starts it (the installed script); -s shows the numbers."""
    timings = {}
    for args in (("--version",), ("models", "list"), ("export",), ("apply", "-f", "fleet.yaml", "--dry-run")):
        start = time.perf_counter()
        result = subprocess.run(
            ["modelyard", *args], capture_output=True, text=True, cwd=fleet, env=clean_env(), timeout=60
        )
        timings[" ".join(args)] = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
    print("; ".join(f"modelyard {name}: {seconds:.2f} s" for name, seconds in timings.items()))
    assert timings["--version"] < 5  # a shared 2-core machine; about 0.2 s when idle


UP_LOG_LINES = """\
2026-12-07 13:00:00,001 WARNING modelyard.router.lazy: scale@1: no copy ready, loading
2026-12-07 13:00:00,002 ERROR modelyard.containers.agent: triton-0: load failed
Traceback (most recent call last):
  ValueError: bad
2026-12-07 13:00:00,003 WARNING modelyard.router.routing: second router line
2026-12-07 13:00:00,004 WARNING modelyard.placement.controller: placed 3 copies
"""


def test_logs_prints_a_component_of_up_by_its_logger_or_a_container_file(tmp_path: Path) -> None:
    (tmp_path / "up.log").write_text(UP_LOG_LINES)
    (tmp_path / "containers" / "triton-0").mkdir(parents=True)
    (tmp_path / "containers" / "triton-0" / "tritonserver.log").write_text("one\ntwo\nthree\n")
    workdir = ("--workdir", str(tmp_path))
    router = modelyard("logs", "router", *workdir, cwd=tmp_path)
    assert router.returncode == 0, router.stderr
    assert [line.split()[3] for line in router.stdout.splitlines()] == [
        "modelyard.router.lazy:",
        "modelyard.router.routing:",
    ]
    agents = modelyard("logs", "agents", *workdir, cwd=tmp_path)
    assert agents.stdout.splitlines()[1:] == ["Traceback (most recent call last):", "  ValueError: bad"]
    assert modelyard("logs", "up", *workdir, cwd=tmp_path).stdout == UP_LOG_LINES
    assert modelyard("logs", "triton-0", "-n", "2", *workdir, cwd=tmp_path).stdout == "two\nthree\n"
    unknown = modelyard("logs", "triton-9", *workdir, cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("(known: up, router, controller, agents, triton-0)")
    nowhere = modelyard("logs", "router", "--workdir", str(tmp_path / "nope"), cwd=tmp_path)
    assert nowhere.returncode == 2 and "no " + str(tmp_path / "nope") in nowhere.stderr


def test_infer_calls_a_model_through_a_running_up_whose_logs_are_readable(tmp_path: Path) -> None:
    from modelyard.containers.triton.server import free_port
    from tests.conftest import require_triton
    from tests.test_up import Up

    require_triton()
    port = free_port()
    up = Up(tmp_path, port)
    router = ("--router", f"127.0.0.1:{port}")
    try:
        up.read_until("press Ctrl-C", 180)
        table = modelyard("infer", "scale", "-i", "INPUT=[1, 2, 3]", *router, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines() == [
            "output  datatype  shape  data",
            "OUTPUT  FP32      [3]    [2.0, 4.0, 6.0]",
        ]
        answer = json.loads(
            modelyard("infer", "scale", "-i", "INPUT=[4]", "-o", "json", *router, cwd=tmp_path).stdout
        )
        assert answer == {
            "model": "scale",
            "version": "1",
            "outputs": {"OUTPUT": {"datatype": "FP32", "shape": [1], "data": [8.0]}},
        }
        missing = modelyard("infer", "nosuch", "-i", "INPUT=[1]", *router, cwd=tmp_path)
        assert (missing.returncode, missing.stderr.strip()) == (
            1,
            "error: nosuch: NOT_FOUND: model 'nosuch' is not registered",
        )
        for bad, why in (("INPUT=[1,", "input INPUT: not JSON"), ("WRONG=[1]", "scale has no input WRONG")):
            refused = modelyard("infer", "scale", "-i", bad, *router, cwd=tmp_path)
            assert refused.returncode == 2 and refused.stderr.startswith(f"error: {why}"), refused.stderr
        holder = re.search(r"^model scale@1\s+ready on (triton-\d+)", "".join(up.output), re.MULTILINE)
        assert holder is not None, "".join(up.output)
        logs = modelyard("logs", holder.group(1), cwd=tmp_path)
        assert logs.returncode == 0 and "successfully loaded 'scale@1'" in logs.stdout, logs.stderr
        assert modelyard("logs", "router", cwd=tmp_path).returncode == 0  # up.log exists (maybe empty)
    finally:
        up.stop()
    unreachable = modelyard("infer", "scale", "-i", "INPUT=[1]", *router, cwd=tmp_path)
    assert (
        unreachable.returncode == 2 and f"cannot reach the router at 127.0.0.1:{port}" in unreachable.stderr
    )


def test_up_refuses_a_workdir_where_it_cannot_keep_its_log(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = modelyard("up", "--workdir", str(tmp_path / "a-file" / "w"), "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: cannot write {tmp_path / 'a-file' / 'w' / 'up.log'}: Not a directory"
    )
