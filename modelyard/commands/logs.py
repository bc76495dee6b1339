"""`modelyard logs COMPONENT`: the log of one part of a running (or stopped) `modelyard up`.

`up` runs the agents and the controller in its own process and logs them to WORKDIR/up.log (as on its
stderr); the router runs as a process of its own logging to WORKDIR/router.log, and each container process
to its own file under WORKDIR/containers/ID/.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import click

from modelyard.console import fail

UP_LOG = "up.log"
ROUTER_LOG = "router.log"
# Components that run inside `modelyard up`: their lines in up.log, by logger name (a line reads
# "DATE TIME LEVEL LOGGER: message").
IN_UP = {
    "up": (),
    "router": ("modelyard.router",),
    "controller": ("modelyard.placement",),
    "agents": ("modelyard.containers.agent", "modelyard.catalog.s3store"),
}


def containers(workdir: Path) -> dict[str, Path]:
    """Container id -> its log file, for the containers `up` started in `workdir`."""
    found = {}
    for folder in sorted((workdir / "containers").glob("*")):
        logs = sorted(folder.glob("*.log"))
        if folder.is_dir() and logs:
            found[folder.name] = logs[0]
    return found


def _selected(lines: Iterable[str], loggers: tuple[str, ...]) -> Iterator[str]:
    """The lines of these loggers, with the lines that continue them (a traceback); all without loggers."""
    keep = not loggers
    for line in lines:
        fields = line.split(" ", 4)
        if loggers and len(fields) >= 4 and fields[3].endswith(":") and fields[2].isupper():
            keep = fields[3].rstrip(":").startswith(loggers)
        if keep:
            yield line


@click.command("logs")
@click.argument("component")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path(".modelyard"),
    show_default=True,
    help="The workdir `modelyard up` was started with.",
)
@click.option("-n", "--lines", "count", type=click.IntRange(0), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
def logs(component: str, workdir: Path, count: int, follow: bool) -> None:
    """Print the last lines of COMPONENT's log: up, controller, agents (inside `modelyard up`), router
    or a container id (triton-0, custom-0, ...; `modelyard up` prints them)."""
    if not workdir.is_dir():
        fail(f"no {workdir} here: give --workdir, the one `modelyard up` was started with")
    files = containers(workdir)
    loggers: tuple[str, ...] = ()
    if component == "router" and (workdir / ROUTER_LOG).is_file():
        path = workdir / ROUTER_LOG
    elif component in IN_UP:  # (the router's lines too, when it ran inside `up`)
        path, loggers = workdir / UP_LOG, IN_UP[component]
    elif component in files:
        path, loggers = files[component], ()
    else:
        known = ", ".join([*IN_UP, *files])
        fail(f"no component {component!r} in {workdir} (known: {known})")
    if not path.is_file():
        fail(f"{path} does not exist: was `modelyard up` started with --workdir {workdir}?")
    with path.open(encoding="utf-8", errors="replace") as log:
        for line in deque(_selected(log, loggers), maxlen=count):
            sys.stdout.write(line)
        sys.stdout.flush()
        if not follow:
            return
        try:
            while True:
                new = log.readlines()
                if new:
                    sys.stdout.writelines(_selected(new, loggers))
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)  # as tail -f: a file has no change event worth waiting on here
        except KeyboardInterrupt:
            pass
