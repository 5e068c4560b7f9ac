"""Blobs kept zstd-compressed on disk (bazel-remote's default storage mode): ``type = "disk"``
with ``compress = true``, or ``serve --compress-at-rest``.

Each blob is one zstd frame in ``cas-zstd/{function}/{hh}/{hash}.{size}`` (the size is in the
name: the file's own size is the compressed one). The upload's thread hop that hashes and
writes also compresses, so uploads cost no extra hop; a compressed ByteStream read from the
start is the stored frame as it is (``get_zstd``: no compression work), and an identity read
decompresses as it streams, a chunk at a time. Build outputs shrink to a third or so;
incompressible data grows by a few bytes a frame.

The byte budget (``--max-size``) still counts blobs' own sizes, not the disk they take: a
budget then bounds what the cache holds, and the disk holds it in less.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Final

from asynccas.compression import LEVEL, zstd
from asynccas.digest import Digest, DigestFunction
from asynccas.errors import BackendUnavailable, BlobNotFound
from asynccas.storage.base import CHUNK_SIZE
from asynccas.storage.context import RequestContext
from asynccas.storage.disk import (
    DiskStorage,
    _BlobFile,
    _disk_errors,
    _DiskWriter,
    _in_thread,
    _list_shards,
)

READ_SIZE: Final = 256 * 1024
"""Compressed bytes read per step of a streamed read."""


class CompressedDiskStorage(DiskStorage):
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        # O_DIRECT wants aligned writes of known size; compressed output is neither.
        super().__init__(root, fsync=fsync, direct_io_above=0)
        self._cas = self.root / "cas-zstd"

    def path_for(self, digest: Digest) -> Path:
        name = f"{digest.hash}.{digest.size_bytes}"
        return self._cas / digest.function.lower_name / digest.hash[:2] / name

    def intact(self, path: Path, digest: Digest) -> bool:
        # Files are published by linking a complete, flushed temp file: any that exists is
        # whole (a damaged one fails to decompress when read, and counts as absent).
        return path.exists()

    def _writer(self, digest: Digest, handle: _BlobFile | None = None) -> _DiskWriter:
        return _CompressingWriter(self, digest, handle)

    def get_zstd(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes]:
        return self._stored_frame(digest)

    async def _stored_frame(self, digest: Digest) -> AsyncGenerator[bytes]:
        with _disk_errors(f"read blob {digest}"):
            fd = await _in_thread(self._open, digest)
        try:
            while True:
                with _disk_errors(f"read blob {digest}"):
                    piece = await _in_thread(os.read, fd, CHUNK_SIZE)
                if not piece:
                    return
                yield piece
        finally:
            await _in_thread(os.close, fd)

    def _open(self, digest: Digest) -> int:
        try:
            return os.open(self.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        with _disk_errors(f"read blob {digest}"):
            fd = await _in_thread(self._open, digest)
        try:
            frame = _FrameReader(fd, digest)
            end = digest.size_bytes if limit == 0 else min(digest.size_bytes, offset + limit)
            position = 0  # in the uncompressed blob
            while position < end:
                with _disk_errors(f"read blob {digest}"):
                    chunk = await _in_thread(frame.next_chunk)
                if not chunk:
                    raise BackendUnavailable(f"blob {digest} ended early on disk")
                start, stop = max(offset - position, 0), min(end - position, len(chunk))
                position += len(chunk)
                if start < stop:  # parts before ``offset`` are decompressed and skipped
                    yield chunk[start:stop] if (start, stop) != (0, len(chunk)) else chunk
        finally:
            await _in_thread(os.close, fd)

    def _read_many_sync(self, digests: list[Digest]) -> dict[Digest, bytes]:
        found = {}
        for digest in digests:
            try:
                with open(self.path_for(digest), "rb") as handle:
                    frame = handle.read()
            except FileNotFoundError:
                continue
            try:
                data = zstd.ZstdDecompressor().decompress(frame, max_length=digest.size_bytes + 1)
            except zstd.ZstdError:
                continue  # damaged: absent, as a truncated plain file is
            if len(data) == digest.size_bytes:
                found[digest] = data
        return found

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        for function in DigestFunction:
            base = self._cas / function.lower_name
            shards = await _in_thread(_list_shards, base)
            for shard in shards:
                for entry in await _in_thread(_scan_compressed_shard, shard, function):
                    yield entry


def _scan_compressed_shard(shard: Path, function: DigestFunction) -> list[tuple[Digest, float]]:
    found = []
    with os.scandir(shard) as entries:
        for entry in entries:
            hash_, _, size = entry.name.partition(".")
            try:
                found.append((Digest(hash_, int(size), function), entry.stat().st_mtime))
            except (ValueError, FileNotFoundError):
                continue  # not a blob of ours, or deleted meanwhile
    return found


class _FrameReader:
    """A stored frame decompressed a chunk at a time (each call in a worker thread)."""

    def __init__(self, fd: int, digest: Digest) -> None:
        self._fd = fd
        self._digest = digest
        self._decompressor = zstd.ZstdDecompressor()

    def next_chunk(self) -> bytes:
        """Up to CHUNK_SIZE more bytes of the blob; b"" at the frame's end."""
        decompressor = self._decompressor
        try:
            while not decompressor.eof:
                data = b"" if not decompressor.needs_input else os.read(self._fd, READ_SIZE)
                if decompressor.needs_input and not data:
                    raise BackendUnavailable(f"blob {self._digest} is cut short on disk")
                out = decompressor.decompress(data, max_length=CHUNK_SIZE)
                if out:
                    return out
        except zstd.ZstdError as exc:
            raise BackendUnavailable(f"blob {self._digest} is damaged on disk: {exc}") from None
        return b""


class _CompressingWriter(_DiskWriter):
    """A disk writer whose file gets the blob as one zstd frame, compressed in the same
    thread hop that hashes and writes."""

    def __init__(
        self, storage: DiskStorage, digest: Digest, handle: _BlobFile | None = None
    ) -> None:
        super().__init__(storage, digest, handle)
        self._compressor = zstd.ZstdCompressor(level=LEVEL)

    def encoded(self, data: bytes) -> bytes:
        return self._compressor.compress(data)

    def encoded_whole(self, data: bytes) -> bytes:
        return zstd.compress(data, level=LEVEL)

    def _finish_sync(self, tail: list[bytes]) -> None:
        self._write_sync(tail)  # opens the file for the empty blob too
        assert self._handle is not None
        self._handle.write(self._compressor.flush())
        self.close_sync()
