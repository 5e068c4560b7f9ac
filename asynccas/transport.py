"""gRPC transport settings shared by asynccas's server and client."""

from __future__ import annotations

from typing import Final

TRANSPORT_OPTIONS: Final = [
    # HTTP/2's default 16 KiB frames cut a 1 MiB ByteStream chunk into 64 frames, each
    # parsed and acknowledged separately; the largest frames the protocol allows let a
    # chunk travel in one. Each side announces what it accepts, so both set it.
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
]
