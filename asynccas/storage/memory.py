"""An in-memory LRU storage bounded by a byte budget: the fastest backend, lost on restart."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable

from asynccas.digest import Digest
from asynccas.errors import BlobNotFound, StorageFull
from asynccas.storage.base import CHUNK_SIZE, BlobWriter, Storage


class MemoryStorage(Storage):
    """Blobs in a dict, least recently used evicted first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[Digest, bytes] = OrderedDict()
        self._total = 0
        self._deletions = 0

    @property
    def total_size(self) -> int:
        return self._total

    async def has_blob(self, digest: Digest) -> bool:
        if digest in self._blobs:
            self._blobs.move_to_end(digest)
            return True
        return False

    async def missing_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        missing = []
        for digest in dict.fromkeys(digests):
            if digest in self._blobs:
                self._blobs.move_to_end(digest)
            else:
                missing.append(digest)
        return missing

    async def get_blob(
        self, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(digest)
        self._blobs.move_to_end(digest)
        end = len(data) if limit == 0 else min(len(data), offset + limit)
        view = memoryview(data)
        for start in range(offset, end, CHUNK_SIZE):
            yield bytes(view[start : min(end, start + CHUNK_SIZE)])

    async def open_write(self, digest: Digest) -> BlobWriter:
        if digest.size_bytes > self.max_bytes:
            raise StorageFull(
                f"blob {digest} is larger than the memory budget of {self.max_bytes} bytes"
            )
        return _MemoryWriter(self, digest)

    async def bulk_read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        found = {}
        for digest in dict.fromkeys(digests):
            data = self._blobs.get(digest)
            if data is not None:
                self._blobs.move_to_end(digest)
                found[digest] = data
        return found

    async def delete_blob(self, digest: Digest) -> bool:
        data = self._blobs.pop(digest, None)
        if data is None:
            return False
        self._total -= len(data)
        self._deletions += 1
        return True

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
