"""Who is calling: the tenant (and permissions) of a call, from an authenticated source.

Three sources, configured per router:
- a bearer token (`authorization: Bearer TOKEN`), looked up by its SHA-256 in a token file;
- the mTLS client certificate, looked up by a subject alternative name or `CN=<common name>` in a
  certificate map (the router must require client certificates: `--tls-client-ca`);
- the `x-tenant-id` header as sent, only in the explicit trusted-gateway mode (and on loopback `up`).

Both files have one identity per line, `#` starts a comment:

    KEY  TENANT  [PERMISSION,...]

KEY is `sha256:<hex digest of the token>` in a token file and a SAN or `CN=<name>` in a certificate map;
TENANT `-` is a caller of no tenant (public models only); the one permission is `routes` (may read container
addresses: WhereIs, WatchRoutes — the zero-hop client). A caller that presents the fleet secret
(header `triton-grpc-protocol-modelyard-fleet-secret`) may read routes too: it can call the containers
directly anyway.

A tenant header that disagrees with an authenticated identity is refused (PERMISSION_DENIED), so a client
cannot act for another tenant by adding a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from modelyard.errors import PermissionDenied, Unauthenticated
from modelyard.fleet_secret import FLEET_SECRET_HEADER

log = logging.getLogger(__name__)

TENANT_HEADER = "x-tenant-id"
AUTHORIZATION_HEADER = "authorization"
ROUTES_PERMISSION = "routes"
NO_TENANT = "-"
PERMISSIONS = frozenset({ROUTES_PERMISSION})
# Credentials end at the router: containers get the fleet secret and the authenticated tenant instead.
CREDENTIAL_HEADERS = frozenset({TENANT_HEADER, AUTHORIZATION_HEADER, FLEET_SECRET_HEADER})
# Headers gRPC manages itself: they never travel on to containers (gRPC sets its own on the next hop).
HOP_HEADERS = frozenset({"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding"})
_KEPT_HERE = CREDENTIAL_HEADERS | HOP_HEADERS
Forwarded = tuple[tuple[str, str | bytes], ...]
MAX_CACHED_TENANTS = 4096  # identities (and upstream metadata) kept per tenant named in a header
RELOAD_CHECK_S = 2.0  # how often a token file / certificate map is checked for changes (one stat)


class IdentityConfigError(ValueError):
    """A token file or certificate map that cannot be read or parsed (a user error: one line)."""


class ChangedWhileRead(OSError):
    """The file changed while it was read (someone is writing it)."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its tenant (None: public models only) and whether it may read routes."""

    tenant: str | None
    routes: bool = False
    via: str = "header"  # header | token | certificate


ANONYMOUS = Identity(None)


def token_key(token: str) -> str:
    """The key of a bearer token in a token file."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_identities(text: str, what: str) -> dict[str, Identity]:
    """`KEY TENANT [PERMISSION,...]` lines -> identities by key; raises IdentityConfigError on a bad line."""
    identities: dict[str, Identity] = {}
    via = "token" if what == "token file" else "certificate"
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise IdentityConfigError(f"{what} line {number}: expected KEY TENANT [PERMISSION,...]")
        key, tenant = fields[0], fields[1]
        permissions = set(fields[2].split(",")) if len(fields) == 3 else set()
        if unknown := permissions - PERMISSIONS:
            raise IdentityConfigError(
                f"{what} line {number}: unknown permission {', '.join(sorted(unknown))}"
            )
        if via == "token" and (
            not key.startswith("sha256:") or len(key) != 71 or not _is_hex(key[7:].lower())
        ):
            raise IdentityConfigError(f"{what} line {number}: a token key is sha256:<64 hex digits>")
        if key in identities:
            raise IdentityConfigError(f"{what} line {number}: {key[:20]}... is listed twice")
        identities[key.lower() if via == "token" else key] = Identity(
            None if tenant == NO_TENANT else tenant, ROUTES_PERMISSION in permissions, via
        )
    return identities


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class IdentityFile:
    """A token file or certificate map, re-read when it changes (checked every RELOAD_CHECK_S, off the
    event loop); a change that does not parse keeps the previous identities, with one log line."""

    def __init__(self, path: Path | str, what: str, *, check_s: float = RELOAD_CHECK_S) -> None:
        self.path = Path(path)
        self.what = what
        self.check_s = check_s
        self._signature: tuple[int, int, int] | None = None
        for _ in range(3):
            try:
                self.identities = self._read()
                break
            except ChangedWhileRead:
                continue
        else:
            raise IdentityConfigError(f"{what} {self.path} keeps changing while it is read")
        self.reloads = 0

    def _stat(self) -> tuple[int, int, int]:
        stat = os.stat(self.path)
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _read(self) -> dict[str, Identity]:
        try:
            signature = self._stat()
            text = self.path.read_text()
            if self._stat() != signature:  # written to while we read: the next check reads it whole
                raise ChangedWhileRead(str(self.path))
        except ChangedWhileRead:
            raise
        except OSError as exc:
            raise IdentityConfigError(f"cannot read {self.what} {self.path}: {exc.strerror or exc}") from exc
        identities = parse_identities(text, self.what)
        self._signature = signature
        return identities

    async def follow(self) -> None:
        """Reloads the file whenever it changes, until cancelled. A stat every `check_s` (no inotify in
        the standard library); the request path only reads `identities`."""
        while True:
            await asyncio.sleep(self.check_s)
            try:
                changed = await asyncio.to_thread(self._stat) != self._signature
                if changed:
                    self.identities = await asyncio.to_thread(self._read)
                    self.reloads += 1
                    log.warning("%s %s reloaded: %d identities", self.what, self.path, len(self.identities))
            except ChangedWhileRead:
                continue  # read again at the next check
            except (OSError, IdentityConfigError) as exc:
                log.error("%s %s not reloaded, keeping the previous one: %s", self.what, self.path, exc)
                with contextlib.suppress(OSError):
                    self._signature = await asyncio.to_thread(self._stat)  # one line per change


class Authenticator:
    """Finds the identity of a call. Cheap: a metadata scan and a dict lookup (plus one SHA-256)."""

    def __init__(
        self,
        *,
        trust_tenant_header: bool = False,
        tokens: IdentityFile | None = None,
        certificates: IdentityFile | None = None,
        fleet_secret: str | None = None,
    ) -> None:
        if not trust_tenant_header and tokens is None and certificates is None:
            raise IdentityConfigError(
                "no identity mode: give a token file, a certificate map, or trust the header"
            )
        self.trust_tenant_header = trust_tenant_header
        self.tokens = tokens
        self.certificates = certificates
        self.fleet_secret = fleet_secret.encode() if fleet_secret else None
        self._tasks: list[asyncio.Task[None]] = []
        self._header_identities: dict[tuple[str | None, bool], Identity] = {}

    @classmethod
    def trusting_header(cls, fleet_secret: str | None = None) -> Authenticator:
        return cls(trust_tenant_header=True, fleet_secret=fleet_secret)

    @property
    def mode(self) -> str:
        """In words, for the start-up line."""
        modes = [
            *(["bearer tokens"] if self.tokens else []),
            *(["client certificates"] if self.certificates else []),
            *(["the x-tenant-id header as sent (trusted gateway)"] if self.trust_tenant_header else []),
        ]
        return " or ".join(modes)

    def start(self) -> None:
        for source in (self.tokens, self.certificates):
            if source is not None:
                self._tasks.append(asyncio.create_task(source.follow(), name=f"follow {source.path}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def identify(self, context: grpc.aio.ServicerContext) -> Identity:
        """The caller's identity; raises Unauthenticated or PermissionDenied."""
        return self.caller(context)[0]

    def caller(self, context: grpc.aio.ServicerContext) -> tuple[Identity, Forwarded]:
        """The caller's identity and the metadata of its that travels on to containers, from one pass over
        the call's metadata: credentials, gRPC's own headers and pseudo-headers stay at the router."""
        header_tenant: str | None = None
        authorization: str | None = None
        secret: bytes | None = None
        forwarded: list[tuple[str, str | bytes]] = []
        for key, value in context.invocation_metadata() or ():
            if key not in _KEPT_HERE:
                if not key.startswith(":"):
                    forwarded.append((key, value))
            elif key == TENANT_HEADER:
                header_tenant = str(value)
            elif key == AUTHORIZATION_HEADER:
                authorization = str(value)
            elif key == FLEET_SECRET_HEADER:
                secret = value if isinstance(value, bytes) else str(value).encode()
        holds_secret = (
            self.fleet_secret is not None
            and secret is not None
            and hmac.compare_digest(secret, self.fleet_secret)
        )
        identity = self._authenticated(context, authorization)
        if identity is None:
            if not self.trust_tenant_header:
                raise Unauthenticated(
                    "no credentials: send 'authorization: Bearer <token>' or a client certificate"
                    if self.tokens is not None
                    else "no credentials: this router identifies callers by client certificate"
                )
            identity = self._header_identity(header_tenant or None, holds_secret)
        elif header_tenant is not None and header_tenant != (identity.tenant or ""):
            raise PermissionDenied(
                f"x-tenant-id '{header_tenant}' is not the tenant of this caller's credentials"
            )
        elif holds_secret and not identity.routes:
            identity = Identity(identity.tenant, True, identity.via)
        return identity, tuple(forwarded)

    def _header_identity(self, tenant: str | None, routes: bool) -> Identity:
        """The identity of a tenant named by the header: made once per tenant (bounded), not per call."""
        identity = self._header_identities.get((tenant, routes))
        if identity is None:
            if len(self._header_identities) >= MAX_CACHED_TENANTS:
                self._header_identities.clear()  # anyone can name any tenant in the header: stay bounded
            identity = self._header_identities[(tenant, routes)] = Identity(tenant, routes)
        return identity

    def _authenticated(self, context: grpc.aio.ServicerContext, authorization: str | None) -> Identity | None:
        if self.tokens is not None and authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("malformed authorization header: expected 'Bearer <token>'")
            identity = self.tokens.identities.get(token_key(token.strip()))
            if identity is None:
                raise Unauthenticated("unknown bearer token")
            return identity
        if self.certificates is not None:
            names = certificate_names(context)
            if names:
                identities = self.certificates.identities
                for name in names:
                    if (identity := identities.get(name)) is not None:
                        return identity
                raise Unauthenticated(f"client certificate {names[-1]} maps to no tenant")
        return None


def certificate_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's subject alternative names, then `CN=<common name>`; empty without
    one (gRPC fills these only for a certificate its client CA verified)."""
    auth = context.auth_context() or {}
    names = [value.decode(errors="replace") for value in auth.get("x509_subject_alternative_name", ())]
    names += [f"CN={value.decode(errors='replace')}" for value in auth.get("x509_common_name", ())]
    return names
