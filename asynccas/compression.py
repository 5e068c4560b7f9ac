"""zstd, REAPI's compressor (Bazel, bb-storage, NativeLink, BuildBuddy and bazel-remote speak
it), for ``compressed-blobs/zstd/...`` ByteStream resources and batch RPCs: streamed both ways
with bounded memory.

Blobs are stored uncompressed; compression happens on the way out and is undone on the way
in, where the data is checked against the digest of the uncompressed blob as any upload is.
Decompression never produces more than a chunk at a time, and stops as soon as the output
passes the digest's size, so a small message that inflates to gigabytes (a decompression
bomb) costs one chunk of memory and an INVALID_ARGUMENT. Frames that need a window over
``WINDOW_LOG_MAX`` are refused rather than given the memory.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, AsyncIterable, Iterator
from typing import Final

import anyio.to_thread

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import Digest
from asynccas.errors import DigestMismatch, UnsupportedFeature
from asynccas.hashing import THREAD_THRESHOLD
from asynccas.storage.base import CHUNK_SIZE, BlobWriter

if sys.version_info >= (3, 14):
    from compression import zstd as zstd  # the module the disk storage uses too
else:
    from backports import zstd as zstd

ZSTD: Final = "zstd"
SUPPORTED: Final = (re_pb2.Compressor.ZSTD,)
"""What Capabilities advertises, for ByteStream and for batch uploads alike."""
LEVEL: Final = 1
"""Compression level of what this server sends: the fastest, as bazel-remote uses. A cache's
answers are latency-bound; level 3 made 8% smaller build outputs at twice the CPU."""
WINDOW_LOG_MAX: Final = 24
"""Largest window (2**24 = 16 MiB) a client's frame may ask the decoder to keep. zstd's
default levels use at most 8 MiB; a larger one would let one upload pin that much memory."""


def check_compressor(name: str | None) -> None:
    """Refuse a ``compressed-blobs/{name}`` resource this server cannot decode."""
    if name is not None and name != ZSTD:
        raise UnsupportedFeature(
            f"compressor {name} is not supported by this server (it supports: {ZSTD})"
        )


def _decompressor() -> zstd.ZstdDecompressor:
    return zstd.ZstdDecompressor(
        options={zstd.DecompressionParameter.window_log_max: WINDOW_LOG_MAX}
    )


def compress(data: bytes) -> bytes:
    """One whole small blob (batch reads)."""
    return zstd.compress(data, level=LEVEL)


def decompress(data: bytes, digest: Digest) -> bytes:
    """One whole small blob (batch updates), at most ``digest.size_bytes`` of it."""
    decompressor = _decompressor()
    try:
        out = decompressor.decompress(data, max_length=digest.size_bytes + 1)
    except zstd.ZstdError as exc:
        raise DigestMismatch(f"zstd data for {digest} does not decompress: {exc}") from None
    if len(out) > digest.size_bytes:
        raise DigestMismatch(f"zstd data for {digest} inflates past its {digest.size_bytes} bytes")
    if not decompressor.eof or decompressor.unused_data:
        raise DigestMismatch(f"zstd data for {digest} is not one complete frame")
    return out


async def compressed(chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes]:
    """``chunks`` as one zstd frame, in pieces as they come (large ones compressed in a
    worker thread, as hashing is)."""
    compressor = zstd.ZstdCompressor(level=LEVEL)
    async for chunk in chunks:
        if len(chunk) >= THREAD_THRESHOLD:
            out = await anyio.to_thread.run_sync(compressor.compress, chunk)
        else:
            out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


def _inflate(decompressor: zstd.ZstdDecompressor, data: bytes, digest: Digest) -> Iterator[bytes]:
    """What ``data`` decompresses to, a chunk at a time (the next chunk is made only when the
    caller asks for it, so a bomb never inflates further than its consumer takes)."""
    if decompressor.eof:
        if data:
            raise DigestMismatch(f"data after the end of the zstd frame of {digest}")
        return
    try:
        out = decompressor.decompress(data, max_length=CHUNK_SIZE)
        while True:
            if out:
                yield out
            if decompressor.eof or decompressor.needs_input:
                break
            out = decompressor.decompress(b"", max_length=CHUNK_SIZE)
    except zstd.ZstdError as exc:
        raise DigestMismatch(f"zstd data for {digest} does not decompress: {exc}") from None
    if decompressor.eof and decompressor.unused_data:
        raise DigestMismatch(f"data after the end of the zstd frame of {digest}")


async def decompressed(frame: AsyncIterable[bytes], digest: Digest) -> AsyncGenerator[bytes]:
    """A zstd frame arriving in pieces, decompressed; never more than ``digest``'s size."""
    decompressor = _decompressor()
    total = 0
    async for piece in frame:
        for out in _inflate(decompressor, piece, digest):
            total += len(out)
            if total > digest.size_bytes:
                raise DigestMismatch(f"zstd data for {digest} inflates past its size")
            yield out
    if not decompressor.eof:
        raise DigestMismatch(f"the zstd frame of {digest} ended early")


class DecompressingWriter(BlobWriter):
    """An upload received compressed: each piece is decompressed, a chunk at a time, into the
    storage's writer for the blob, which checks the uncompressed data against the digest.

    ``committed_size`` counts compressed bytes received: that is what a compressed upload's
    later ``write_offset``s, its ``QueryWriteStatus`` and its final ``committed_size`` are in."""

    def __init__(self, inner: BlobWriter) -> None:
        super().__init__(inner.digest)
        self.inner = inner
        self._decompressor = _decompressor()

    async def write(self, data: bytes) -> None:
        self.committed_size += len(data)
        for out in _inflate(self._decompressor, data, self.digest):
            await self.inner.write(out)  # raises once past the digest's size

    async def flush(self) -> None:
        await self.inner.flush()

    async def verify(self) -> None:
        if not self._decompressor.eof:
            raise DigestMismatch(f"the zstd frame of {self.digest} ended early")
        await self.inner.verify()
        self._verified = True

    async def _write(self, parts: list[bytes]) -> None:
        raise AssertionError("write() hands data on directly")

    async def _publish(self) -> None:
        await self.inner.publish()

    async def _abort(self) -> None:
        await self.inner.abort()
