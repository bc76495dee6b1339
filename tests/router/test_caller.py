"""Who a call is from and what travels on with it, read from the call's metadata in one pass."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.placement.store import open_store
from modelyard.router.identity import (
    MAX_CACHED_TENANTS,
    Authenticator,
    IdentityFile,
    PermissionDenied,
    Unauthenticated,
    token_key,
)
from modelyard.router.routing import Router

Metadatum = namedtuple("Metadatum", "key value")  # what grpc.aio's invocation_metadata() holds


class Context:
    """The part of a grpc.aio servicer context identification reads."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.metadata = tuple(Metadatum(k, v) for k, v in pairs)

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


CALLER_HEADERS = (
    (":authority", "router"),
    ("user-agent", "grpc-python/1.85"),
    ("x-tenant-id", "acme"),
    (FLEET_SECRET_HEADER, "s3cret"),
    ("x-request-source", "batch-7"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
)


def test_credentials_and_grpc_headers_stay_and_the_rest_travels_on() -> None:
    identity, forwarded = Authenticator.trusting_header("s3cret").caller(Context(*CALLER_HEADERS))
    assert (identity.tenant, identity.routes) == ("acme", True)  # the secret lets it read routes
    assert forwarded == (
        ("x-request-source", "batch-7"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    )


def test_a_wrong_secret_gives_no_route_reading() -> None:
    identity, _ = Authenticator.trusting_header("s3cret").caller(
        Context(("x-tenant-id", "acme"), (FLEET_SECRET_HEADER, "guess"))
    )
    assert (identity.tenant, identity.routes) == ("acme", False)


def test_a_token_caller_cannot_name_another_tenant(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token_key('t-acme')} acme\n")
    authenticator = Authenticator(tokens=IdentityFile(tokens, "token file"))
    identity, _ = authenticator.caller(Context(("authorization", "Bearer t-acme")))
    assert (identity.tenant, identity.via) == ("acme", "token")
    with pytest.raises(PermissionDenied):
        authenticator.caller(Context(("authorization", "Bearer t-acme"), ("x-tenant-id", "globex")))
    with pytest.raises(Unauthenticated):
        authenticator.caller(Context(("x-tenant-id", "acme")))


def test_header_identities_stay_bounded_whatever_tenants_callers_name() -> None:
    authenticator = Authenticator.trusting_header()
    for i in range(MAX_CACHED_TENANTS * 2 + 5):
        assert authenticator.identify(Context(("x-tenant-id", f"t{i}"))).tenant == f"t{i}"
    assert len(authenticator._header_identities) <= MAX_CACHED_TENANTS


def test_containers_get_the_tenant_the_secret_and_what_the_caller_added(tmp_path: Path) -> None:
    asyncio.run(_containers_get(tmp_path))


async def _containers_get(tmp_path: Path) -> None:
    router = Router(open_store(str(tmp_path / "store")), fleet_secret="fleet")
    try:
        plain = router.upstream_metadata(*router.identity.caller(Context(("x-tenant-id", "acme"))))
        assert list(plain) == [("x-tenant-id", "acme"), (FLEET_SECRET_HEADER, "fleet")]
        again = router.upstream_metadata(*router.identity.caller(Context(("x-tenant-id", "acme"))))
        assert again is plain  # made once per tenant, not per call
        other = router.upstream_metadata(*router.identity.caller(Context(("x-tenant-id", "globex"))))
        assert list(other) == [("x-tenant-id", "globex"), (FLEET_SECRET_HEADER, "fleet")]
        extra = router.upstream_metadata(*router.identity.caller(Context(*CALLER_HEADERS)))
        assert sorted(extra) == sorted(
            [
                ("x-request-source", "batch-7"),
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("x-tenant-id", "acme"),
                (FLEET_SECRET_HEADER, "fleet"),
            ]
        )
    finally:
        await router.stop()
