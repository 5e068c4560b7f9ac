"""An in-memory LRU storage bounded by a byte budget: the fastest backend, lost on restart."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BlobNotFound, StorageFull
from asynccas.lru import SizedLru
from asynccas.storage.base import (
    CHUNK_SIZE,
    BlobWriter,
    Deletable,
    DeletionMarked,
    Storage,
    mask_of,
)
from asynccas.storage.context import RequestContext


class MemoryStorage(Storage, Deletable, DeletionMarked):
    """Blobs in a dict, least recently used evicted first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._lru: SizedLru[Digest, bytes] = SizedLru(max_bytes)

    @property
    def total_size(self) -> int:
        return self._lru.total

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        missing = [d for d in batch.digests if self._lru.get(d) is None]
        return mask_of(batch, missing) if missing else bytes(len(batch))

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        data = self._lru.get(digest)
        if data is None:
            raise BlobNotFound(digest)
        end = len(data) if limit == 0 else min(len(data), offset + limit)
        view = memoryview(data)
        for start in range(offset, end, CHUNK_SIZE):
            yield bytes(view[start : min(end, start + CHUNK_SIZE)])

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        if digest.size_bytes > self.max_bytes:
            raise StorageFull(
                f"blob {digest} is larger than the memory budget of {self.max_bytes} bytes"
            )
        return _MemoryWriter(self, digest)

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        found = {}
        for digest in dict.fromkeys(digests):
            data = self._lru.get(digest)
            if data is not None:
                found[digest] = data
        return found

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        return [d for d in dict.fromkeys(digests) if self._lru.pop(d) is not None]

    async def deletion_marker(self) -> int | None:
        return self._lru.removals


class _MemoryWriter(BlobWriter):
    def __init__(self, storage: MemoryStorage, digest: Digest) -> None:
        super().__init__(digest)
        self._storage = storage
        self._parts: list[bytes] = []

    async def _write(self, parts: list[bytes]) -> None:
        for part in parts:
            self._hasher.update(part)
        self._parts += parts

    async def _publish(self) -> None:
        self._storage._lru.add(self.digest, b"".join(self._parts))

    async def _abort(self) -> None:
        self._parts = []
