"""TLS and mutual TLS for gRPC: server credentials for the router and our container, channel credentials
for the router's connections to containers. Files are PEM; a user error becomes one clear line.
"""

from __future__ import annotations

from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    pass


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def server_credentials(
    cert: Path | str, key: Path | str, client_ca: Path | str | None = None
) -> grpc.ServerCredentials:
    """TLS with `cert`/`key`; with `client_ca`, clients must present a certificate it signed (mTLS)."""
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=_read(client_ca, "client CA") if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path | str | None = None, cert: Path | str | None = None, key: Path | str | None = None
) -> grpc.ChannelCredentials:
    """Trust `ca` (system roots when None); with `cert`/`key`, present a client certificate (mTLS)."""
    if (cert is None) != (key is None):
        raise TLSConfigError("a client certificate needs both the certificate and its key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA") if ca else None,
        private_key=_read(key, "TLS key") if key else None,
        certificate_chain=_read(cert, "TLS certificate") if cert else None,
    )
