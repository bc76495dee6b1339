"""How commands end and reach the store: a user error is one line on stderr and exit status 2."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import click

from placement.store import Store, StoreError, default_store_url, open_store

T = TypeVar("T")
STORE_HELP = "Store URL (etcd://host:port) or directory; default $MODELYARD_STORE or ./.modelyard/store."


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def run_on_store(
    store_url: str | None, work: Callable[[Store], Awaitable[T]], errors: tuple[type[Exception], ...] = ()
) -> T:
    """Runs `work` against the store; store errors (and `errors`) end the command with one line."""

    async def main() -> T:
        async with open_store(store_url or default_store_url()) as store:
            return await work(store)

    refusals: tuple[type[Exception], ...] = (StoreError, *errors)
    try:
        return asyncio.run(main())
    except refusals as exc:
        fail(str(exc))
