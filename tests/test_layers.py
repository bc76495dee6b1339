"""The package's layers, read from the source: every module imports only from its own layer or below, and
imports form no cycle, counting imports inside functions too (and, for the layer order, under TYPE_CHECKING).
The wheel claims one top-level name, `modelyard`, and no module still imports the old top-level names
(`router`, `placement`, `backends`), which would load a second copy.

Layers, from the foundations up (a module's layer is the first rule that names it):
  0 foundations: generated protos, telemetry, metric names, TLS, logs, gRPC options,
    the fleet secret's header, the error family, the data model and store client of placement;
  1 placement; 2 catalog (registration, import, model stores, pipelines' registration);
  3 our numpy container's server; 4 the container side (agent, process supervision, a subpackage per
  backend); 5 router;
  6 applications: the command line (`cli`, `commands`, its console helpers and `settings`, the one reader
    of MODELYARD_* variables), `up` (local), the client.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modelyard"
OLD_NAMES = ("router", "placement", "backends")

LAYERS: tuple[tuple[int, re.Pattern[str]], ...] = (
    (6, re.compile(r"^modelyard\.(cli|commands(\..*)?|console|settings|local|client|__main__)$")),
    (
        0,
        re.compile(
            r"^modelyard\.(v1(\..*)?|telemetry|metric_names|tls|logs|grpc_options|datatypes|memory|fleet_secret|errors|__init__)$"
        ),
    ),
    (0, re.compile(r"^modelyard\.placement\.(model|units|store(\..*)?)$")),
    (1, re.compile(r"^modelyard\.placement(\..*)?$")),
    (2, re.compile(r"^modelyard\.catalog(\..*)?$")),
    (3, re.compile(r"^modelyard\.numpy_container(\..*)?$")),
    (4, re.compile(r"^modelyard\.containers(\..*)?$")),
    (5, re.compile(r"^modelyard\.router(\..*)?$")),
    (0, re.compile(r"^modelyard$")),
)


def layer(module: str) -> int:
    for number, pattern in LAYERS:
        if pattern.search(module):
            return number
    raise AssertionError(f"{module}: no layer; add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    paths = [
        Path(folder) / file
        for folder, _, files in os.walk(PACKAGE)
        for file in files
        if file.endswith(".py") and not file.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]
    for path in paths:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str, known: set[str], *, type_checking: bool = True) -> set[str]:
    """Our modules `path` imports anywhere: at module level and inside functions and classes (a
    function-level import is a dependency all the same: it runs when the function does); under
    TYPE_CHECKING too unless `type_checking` is False."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != name}


def test_imports_are_found_inside_functions_and_under_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from modelyard.router import errors\n"
        "def load():\n"
        "    from ..containers import agent\n"
        "class Lazy:\n"
        "    def run(self):\n"
        "        import modelyard.local\n"
    )
    known = {"modelyard.router.errors", "modelyard.containers.agent", "modelyard.local"}
    assert imports(source, "modelyard.catalog.probe", known) == known
    assert imports(source, "modelyard.catalog.probe", known, type_checking=False) == known - {
        "modelyard.router.errors"
    }


def test_the_wheel_claims_only_the_modelyard_name() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["modelyard*"]' in text
    links = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_symlink()]
    assert not links, f"links inside the package hide the real tree from tools: {links}"
    for old in OLD_NAMES:
        assert not (ROOT / old).exists(), f"{old}/ at the top level: the layers live under modelyard/"


@pytest.mark.parametrize("old", OLD_NAMES)
def test_no_file_imports_an_old_top_level_name(old: str) -> None:
    pattern = re.compile(rf"^\s*(from|import) {old}(\.|\s|$)", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in (ROOT / "modelyard", ROOT / "tests", ROOT / "benchmarks")
        for path in folder.rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert not offenders, f"import modelyard.{old} instead of {old} in {sorted(set(offenders))}"


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    found = modules()
    known = set(found)
    upward = [
        f"{name} (layer {layer(name)}) imports {imported} (layer {layer(imported)})"
        for name, path in found.items()
        for imported in imports(path, name, known)
        if layer(imported) > layer(name)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_imports_form_no_cycle() -> None:
    found = modules()
    known = set(found)
    # TYPE_CHECKING imports are left out here (not from the layer order): they never run, so they cannot
    # make import order matter, and they let a helper name its owner in annotations (the Router's stream
    # pool and pipeline runner name the Router that creates them) while the code depends one way only.
    graph = {name: imports(path, name, known, type_checking=False) for name, path in found.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


LAYER_NAMES = {
    0: "foundations",
    1: "placement",
    2: "catalog",
    3: "our numpy container",
    4: "container side",
    5: "router",
    6: "applications",
}


def summary(path: Path) -> str:
    """The first sentence of a module's docstring: what the module holds."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    end = first.find(". ")
    return first if end < 0 else first[: end + 1]


def layout_document() -> str:
    """docs/layout.md: every module, by layer, with what it owns (its docstring's first sentence)."""
    lines = [
        "# Layout: what each module owns",
        "",
        "Generated from the modules' docstrings by `tests/test_layers.py`, which fails when this file is",
        "stale (regenerate: `python -m tests.test_layers > docs/layout.md`). Layers import only downward.",
    ]
    found = modules()
    for number, title in LAYER_NAMES.items():
        lines += ["", f"## {number}. {title}", "", "| module | owns |", "| --- | --- |"]
        for name in sorted(n for n in found if layer(n) == number):
            owns = summary(found[name]).replace("|", "\\|")
            lines.append(f"| `{name}` | {owns} |")
    return "\n".join(lines) + "\n"


def test_every_module_says_what_it_owns() -> None:
    missing = sorted(name for name, path in modules().items() if not summary(path))
    assert not missing, f"modules without a docstring: {missing}"


def test_docs_layout_lists_every_module_as_it_is() -> None:
    assert (ROOT / "docs" / "layout.md").read_text() == layout_document(), (
        "docs/layout.md is stale: python -m tests.test_layers > docs/layout.md"
    )


if __name__ == "__main__":
    print(layout_document(), end="")
