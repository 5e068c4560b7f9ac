"""gRPC transport settings shared by asynccas's server and client: options and TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

TRANSPORT_OPTIONS: Final = [
    # HTTP/2's default 16 KiB frames cut a 1 MiB ByteStream chunk into 64 frames, each
    # parsed and acknowledged separately; the largest frames the protocol allows let a
    # chunk travel in one. Each side announces what it accepts, so both set it.
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM); with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Read the files (blocking) into grpc's credentials."""
        chain, key = _read(self.cert, "TLS certificate"), _read(self.key, "TLS key")
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=_read(self.client_ca, "client CA") if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca``; the system's roots without it) and, for mutual TLS, the
    certificate and key it presents."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files (blocking) into grpc's credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )
