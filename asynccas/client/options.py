"""How command-line clients (``asynccas cas``, ``asynccas bench``) say where and as whom to
connect: the endpoint, TLS material and a bearer token, from flags or the environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Final

from asynccas.digest import Digest
from asynccas.errors import CasError
from asynccas.transport import ClientTls

ENDPOINT_VARIABLE: Final = "ASYNCCAS_ENDPOINT"
TOKEN_VARIABLE: Final = "ASYNCCAS_TOKEN"
DEFAULT_ENDPOINT: Final = "grpc://127.0.0.1:50051"


def default_endpoint() -> str:
    return os.environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and authentication")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="trust servers signed by this CA (default: the system's CAs)")  # fmt: skip
    group.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="present this client certificate (mutual TLS)")  # fmt: skip
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the key of --tls-cert")
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"send the bearer token in FILE (or set ${TOKEN_VARIABLE}); never on the command"
        " line, where other users see it",
    )


def connection_options(args: argparse.Namespace) -> tuple[ClientTls | None, str | None]:
    """The TLS settings and token that ``add_connection_arguments`` flags ask for."""
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        try:
            tls = ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
        except ValueError as exc:
            raise CasError(str(exc)) from None
    # Stripped, like a token file: `export ASYNCCAS_TOKEN=$(cat file)` keeps no newline, but
    # other ways of setting it do, and a newline is not allowed in a gRPC header.
    token = os.environ.get(TOKEN_VARIABLE, "").strip() or None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise CasError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise CasError(f"--token-file {args.token_file} is empty")
    return tls, token


def digest_argument(text: str) -> Digest:
    """An argparse type: ``HASH/SIZE``, with a usage error (exit status 2) if malformed."""
    try:
        return Digest.parse(text)
    except CasError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a digest HASH/SIZE: {exc}") from None
