"""How list and show commands print: `-o table|json|yaml`; a table is boxed on a terminal and plain columns
when stdout is a pipe or a file (what `grep`, `awk` and `cut` expect).

Kept light: rich is imported only to draw a table on a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

FORMATS = ("table", "json", "yaml")
F = TypeVar("F", bound=Callable[..., Any])
_JSON_FLAG = "modelyard.output.json"


def output_option(command: F) -> F:
    """`-o/--output table|json|yaml` (the value reaches the command as `output`), and the older `--json`
    flag, hidden, kept so scripts that pass it keep working."""

    def remember_json(ctx: click.Context, _: click.Parameter, value: bool) -> None:
        if value:
            ctx.meta[_JSON_FLAG] = True

    command = click.option("--json", is_flag=True, hidden=True, expose_value=False, callback=remember_json)(
        command
    )
    return click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format.",
    )(command)


def chosen(output: str) -> str:
    """The format asked for: `output`, or json when the old `--json` flag was given."""
    ctx = click.get_current_context(silent=True)
    return "json" if ctx is not None and ctx.meta.get(_JSON_FLAG) else output


def emit_data(output: str, data: Any) -> None:
    """`data` (plain lists, dicts, strings and numbers) as JSON or YAML on stdout."""
    if output == "yaml":
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), nl=False)
    else:
        click.echo(json.dumps(data, indent=2))


@dataclass
class Table:
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    title: str = ""
    right: frozenset[str] = frozenset()  # columns aligned right (numbers)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def print_table(table: Table) -> None:
    """Boxed (rich) on a terminal; else a header line and rows of columns two spaces apart, no box."""
    if is_terminal():
        from rich.console import Console
        from rich.table import Table as RichTable

        rich_table = RichTable(title=table.title or None)
        for column in table.columns:
            rich_table.add_column(column, justify="right" if column in table.right else "left")
        for row in table.rows:
            rich_table.add_row(*row)
        Console().print(rich_table)
        return
    if table.title:
        click.echo(table.title)
    widths = [max([len(c), *(len(row[i]) for row in table.rows)]) for i, c in enumerate(table.columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if column in table.right else cell.ljust(width)
            for cell, width, column in zip(cells, widths, table.columns, strict=True)
        ).rstrip()

    click.echo(line(table.columns))
    for row in table.rows:
        click.echo(line(row))
