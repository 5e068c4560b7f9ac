"""An in-memory LRU storage bounded by a byte budget: the fastest backend, lost on restart."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BlobNotFound, StorageFull
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
        self._blobs: OrderedDict[Digest, bytes] = OrderedDict()
        self._total = 0
        self._deletions = 0

    @property
    def total_size(self) -> int:
        return self._total

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        blobs = self._blobs
        missing = []
        for digest in batch.digests:
            if digest in blobs:
                blobs.move_to_end(digest)
            else:
                missing.append(digest)
        return mask_of(batch, missing) if missing else bytes(len(batch))

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(digest)
        self._blobs.move_to_end(digest)
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
            data = self._blobs.get(digest)
            if data is not None:
                self._blobs.move_to_end(digest)
                found[digest] = data
        return found

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        gone = []
        for digest in dict.fromkeys(digests):
            data = self._blobs.pop(digest, None)
            if data is not None:
                self._total -= len(data)
                self._deletions += 1
                gone.append(digest)
        return gone

    async def deletion_marker(self) -> int | None:
        return self._deletions

    def _insert(self, digest: Digest, data: bytes) -> None:
        if digest in self._blobs:
            self._blobs.move_to_end(digest)
            return
        self._blobs[digest] = data
        self._total += len(data)
        while self._total > self.max_bytes:
            _, evicted = self._blobs.popitem(last=False)
            self._total -= len(evicted)
            self._deletions += 1


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
        self._storage._insert(self.digest, b"".join(self._parts))

    async def _abort(self) -> None:
        self._parts = []
