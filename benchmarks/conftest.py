"""Benchmark plumbing: quick mode, figures with their targets and verdicts, and the dated results table.

- `--quick` (or MODELYARD_BENCH_QUICK=1): every benchmark runs once with tiny counts so none rots; its
  figures print but mean nothing and no verdict is given (`.ci/run` runs this).
- `verdict(what, figure, target, ok)` records one line: the figure, its target and PASS / FALLS SHORT
  (or "quick" in quick mode); `record(line)` records a figure without a target.
- `--results DIR` writes every recorded line as a dated Markdown table DIR/YYYY-MM-DD-HHMM.md, and replaces
  the table between docs/benchmarks.md's `<!-- bench-results -->` markers with it (`./dev bench` does both).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MARKERS = ("<!-- bench-results:start -->", "<!-- bench-results:end -->")
_ROWS: list[tuple[str, str, str, str, str]] = []  # test, what, figure, target, verdict


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelyard benchmarks")
    group.addoption("--quick", action="store_true", help="run every benchmark once with tiny counts")
    group.addoption(
        "--results",
        metavar="DIR",
        help="write the dated results table into DIR and docs/benchmarks.md",
    )


def is_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--quick")) or os.environ.get("MODELYARD_BENCH_QUICK") == "1"


@pytest.fixture(scope="session")
def quick(pytestconfig: pytest.Config) -> bool:
    return is_quick(pytestconfig)


Verdict = Callable[[str, str, str, bool], None]


@pytest.fixture
def verdict(request: pytest.FixtureRequest, quick: bool) -> Verdict:
    """`verdict("router 1 MiB added", "+2.1 ms (0.93x proxy)", "<= proxy's added", ok)` records and prints."""

    def add(what: str, figure: str, target: str, ok: bool) -> None:
        judged = "quick" if quick else ("PASS" if ok else "FALLS SHORT")
        _ROWS.append((request.node.name, what, figure, target, judged))
        print(f"  {what}: {figure}  target {target}  {judged}")

    return add


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """`record("10k x 200: 0.21 s ...")` adds a figure without a target under this test's name."""

    def add(line: str) -> None:
        _ROWS.append((request.node.name, line, "", "", ""))

    return add


def _markdown(started: datetime.datetime) -> str:
    lines = [
        f"# Benchmarks {started:%Y-%m-%d %H:%M}",
        "",
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        "ratios are measured side by side in one run, absolute times depend on the machine.",
        "",
        "| benchmark | what | figure | target | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in _ROWS]
    return "\n".join(lines) + "\n"


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = datetime.datetime.now()


_STARTED = pytest.StashKey[datetime.datetime]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not _ROWS:
        return
    terminalreporter.section("benchmark figures")
    width = max(len(row[0]) for row in _ROWS)
    for name, what, figure, target, judged in _ROWS:
        tail = f"  {figure}  target {target}  {judged}" if target else ""
        terminalreporter.write_line(f"{name:<{width}}  {what}{tail}")
    results = config.getoption("--results")
    if not results or is_quick(config):
        return
    started = config.stash.get(_STARTED, datetime.datetime.now())
    table = _markdown(started)
    out = Path(results).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started:%Y-%m-%d-%H%M}.md"
    path.write_text(table)
    terminalreporter.write_line(f"results: {path}")
    readme = ROOT / "docs" / "benchmarks.md"  # the README links there
    text = readme.read_text()
    start, end = README_MARKERS
    if start in text and end in text:
        body = table.split("\n", 2)[2]  # without the title
        link = f"Latest run ([{path.relative_to(ROOT)}](../{path.relative_to(ROOT)})):\n\n"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        readme.write_text(pattern.sub(lambda _: f"{start}\n{link}{body}{end}", text))
