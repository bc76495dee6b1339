"""How commands end and reach the store: a user error is one line on stderr and a non-zero exit status.

Kept light (click only): every `modelyard` command imports this, and the heavy modules (asyncio, the
stores) are imported when a command actually runs against a store.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from modelyard.placement.store import Store

T = TypeVar("T")
STORE_HELP = "Store URL (etcd://host:port) or directory; default $MODELYARD_STORE or ./.modelyard/store."
EXIT_REFUSED = 2  # a user error: bad file, bad flag, refused archive, unreachable store
EXIT_EXISTS = 3  # what the command would create already exists with other content (name@version taken)


def fail(message: str, status: int = EXIT_REFUSED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


def run_on_store(
    store_url: str | None,
    work: Callable[[Store], Awaitable[T]],
    errors: tuple[type[Exception], ...] = (),
    *,
    exists: tuple[type[Exception], ...] = (),
    read_only: bool = False,
) -> T:
    """Runs `work` against the store; store errors (and `errors`) end the command with one line and
    EXIT_REFUSED, `exists` errors with one line and EXIT_EXISTS. A `read_only` command refuses an embedded
    store that does not exist yet, naming its path, rather than creating an empty one (a mistyped --store)."""
    import asyncio

    from modelyard.placement.store import StoreError, missing_store
    from modelyard.settings import open_configured_store
    from modelyard.settings import store_url as configured_store_url

    url = configured_store_url(store_url)
    if read_only and (path := missing_store(url)) is not None:
        fail(f"no store at {path}: give --store (or $MODELYARD_STORE) naming an existing store")

    async def main() -> T:
        async with open_configured_store(url) as store:
            return await work(store)

    refusals: tuple[type[Exception], ...] = (StoreError, *errors)
    try:
        return asyncio.run(main())
    except exists as exc:
        fail(str(exc), EXIT_EXISTS)
    except refusals as exc:
        fail(str(exc))
