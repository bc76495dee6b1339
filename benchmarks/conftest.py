"""Benchmark plumbing: quick mode, figures with their targets and verdicts, and the dated results table.

- `--quick` (or MODELYARD_BENCH_QUICK=1): every benchmark runs once with tiny counts so none rots; its
  figures print but mean nothing and no verdict is given (`.ci/run` runs this).
- `verdict(what, figure, target, ok)` records one line: the figure, its target and PASS / FALLS SHORT
  (or "quick" in quick mode); `record(line)` records a figure without a target.
- `--results DIR` writes every recorded line as a dated Markdown table DIR/YYYY-MM-DD-HHMM.md, and, when
  every benchmark ran (no -k, -m or single file), replaces the table between docs/benchmarks.md's
  `<!-- bench-results -->` markers with it (`./dev bench` does both).
- Outside quick mode a figure that FALLS SHORT of its target fails the run (exit status 1), so `./dev bench`
  exits non-zero, even where the test itself passed (most benchmarks record figures, few assert them).
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
    session.config.stash[_DESELECTED] = 0


_STARTED = pytest.StashKey[datetime.datetime]()
_DESELECTED = pytest.StashKey[int]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        config = items[0].config
        config.stash[_DESELECTED] = config.stash.get(_DESELECTED, 0) + len(items)


def _every_benchmark_ran(config: pytest.Config) -> bool:
    """No benchmark left out by -k / -m, and the whole benchmarks/ folder asked for (not one file)."""
    folder = Path(__file__).resolve().parent
    asked = {Path(arg.split("::")[0]).resolve() for arg in config.args}
    return config.stash.get(_DESELECTED, 0) == 0 and asked == {folder}


def _short(config: pytest.Config) -> list[tuple[str, str, str, str, str]]:
    return [] if is_quick(config) else [row for row in _ROWS if row[4] == "FALLS SHORT"]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _short(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not _ROWS:
        return
    terminalreporter.section("benchmark figures")
    width = max(len(row[0]) for row in _ROWS)
    for name, what, figure, target, judged in _ROWS:
        tail = f"  {figure}  target {target}  {judged}" if target else ""
        terminalreporter.write_line(f"{name:<{width}}  {what}{tail}")
    short = _short(config)
    if short:
        terminalreporter.write_line(
            f"{len(short)} figure(s) FALL SHORT of their targets: the run fails", red=True, bold=True
        )
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
    if not _every_benchmark_ran(config):
        terminalreporter.write_line("docs/benchmarks.md table left as it was: only some benchmarks ran")
        return
    readme = ROOT / "docs" / "benchmarks.md"  # the README links there
    text = readme.read_text()
    start, end = README_MARKERS
    if start in text and end in text:
        body = table.split("\n", 2)[2]  # without the title
        link = f"Latest run ([{path.relative_to(ROOT)}](../{path.relative_to(ROOT)})):\n\n"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        readme.write_text(pattern.sub(lambda _: f"{start}\n{link}{body}{end}", text))
