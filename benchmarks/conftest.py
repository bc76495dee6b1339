"""Collects each benchmark's figures and prints them as one table at the end of the run."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_ROWS: list[tuple[str, str]] = []


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """`record("10k x 200: 0.21 s ...")` adds a line under this test's name to the final table."""

    def add(line: str) -> None:
        _ROWS.append((request.node.name, line))

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    width = max(len(name) for name, _ in _ROWS)
    terminalreporter.section("placement figures")
    for name, line in _ROWS:
        terminalreporter.write_line(f"{name:<{width}}  {line}")
