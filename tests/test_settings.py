"""Settings are read in one place: every MODELYARD_* variable is listed in modelyard/settings.py with its
default and meaning, and no module below the applications reads the environment for one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from modelyard import settings
from tests.test_layers import ROOT, layer, modules

NAME = re.compile(r"MODELYARD_[A-Z0-9_]+")


def _is_environ(node: ast.expr) -> bool:
    return ast.unparse(node) in ("os.environ", "environ")


def variables_read(source: str) -> set[str]:
    """The MODELYARD_* names `source` reads from the environment (os.environ[...], .get, os.getenv), as
    literals, f-strings or module-level constants."""
    tree = ast.parse(source)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, str)
    }

    def named(arg: ast.expr) -> set[str]:
        if isinstance(arg, ast.Name):
            return set(NAME.findall(constants.get(arg.id, "")))
        return set(NAME.findall(ast.unparse(arg))) | (
            {"MODELYARD_*"} if isinstance(arg, ast.JoinedStr) and "MODELYARD_" in ast.unparse(arg) else set()
        )

    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            found |= named(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value)) or (
                ast.unparse(func) in ("os.getenv", "getenv")
            ):
                found |= named(node.args[0])
    return found


def test_the_scan_finds_literal_constant_and_formatted_reads() -> None:
    source = (
        "import os\n"
        'PERIOD_ENV = "MODELYARD_RATE_PERIOD_S"\n'
        "def f(name):\n"
        '    os.environ.get("MODELYARD_TRACES")\n'
        "    os.environ.get(PERIOD_ENV)\n"
        '    os.getenv(f"MODELYARD_ETCD_{name}")\n'
        '    os.environ["MODELYARD_METRICS_PORT"]\n'
        '    os.environ.get("HOME")\n'
    )
    assert variables_read(source) == {
        "MODELYARD_TRACES",
        "MODELYARD_RATE_PERIOD_S",
        "MODELYARD_ETCD_",
        "MODELYARD_*",
        "MODELYARD_METRICS_PORT",
    }


def test_no_module_below_the_applications_reads_a_modelyard_variable() -> None:
    readers = {
        name: sorted(read)
        for name, path in modules().items()
        if layer(name) < 6 and (read := variables_read(path.read_text()))
    }
    assert not readers, f"read these in modelyard/settings.py and pass the values down: {readers}"


def test_every_variable_the_code_names_is_listed_with_a_default_and_a_meaning() -> None:
    named = {
        match
        for path in (ROOT / "modelyard").rglob("*.py")
        for match in NAME.findall(path.read_text())
        if not match.endswith("_")
    }
    assert named - set(settings.BY_NAME) == set()
    assert all(setting.meaning for setting in settings.SETTINGS)
    assert len(settings.BY_NAME) == len(settings.SETTINGS)  # each listed once


def test_a_variable_counts_when_set_and_its_default_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELYARD_STORE", raising=False)
    assert settings.store_url() == ".modelyard/store"
    monkeypatch.setenv("MODELYARD_STORE", "etcd://10.0.0.1:2379")
    assert settings.store_url() == "etcd://10.0.0.1:2379"
    assert settings.store_url("other/dir") == "other/dir"  # --store wins
    monkeypatch.setenv("MODELYARD_ETCD_USER", "root")
    assert settings.etcd_access().username == "root"
    monkeypatch.setenv("MODELYARD_RATE_PERIOD_S", "0.5")
    assert settings.rate_period_s() == 0.5
    monkeypatch.setenv("MODELYARD_ARTIFACT_CACHE", "/tmp/cache")
    assert settings.artifact_cache_dir() == Path("/tmp/cache")
