"""Recently read small blobs kept in this process's memory (bb-storage's ReadCachingBlobAccess,
in RAM): a hit costs no thread hop and no database or disk read.

Blobs never change, so a cached blob is always right, even after the storage below evicted it
(it is then served a little longer, which REAPI allows: FindMissingBlobs, which clients ask
before relying on a blob, still goes to the storage). Only blobs up to ``max_blob_size`` are
kept, so that one large artifact cannot push out the many small outputs a build reads.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from asynccas.digest import Digest
from asynccas.lru import SizedLru
from asynccas.storage.base import CHUNK_SIZE, Storage
from asynccas.storage.context import RequestContext
from asynccas.storage.forwarding import ForwardingStorage


class ReadCacheStorage(ForwardingStorage):
    def __init__(
        self, inner: Storage, *, max_bytes: int = 64 << 20, max_blob_size: int = 64 << 10
    ) -> None:
        super().__init__(inner)
        self.max_bytes = max_bytes
        self.max_blob_size = min(max_blob_size, max_bytes, CHUNK_SIZE)
        self.lru: SizedLru[Digest, bytes] = SizedLru(max_bytes)
        self.hits = 0
        self.misses = 0

    def _cached(self, digest: Digest) -> bytes | None:
        data = self.lru.get(digest)
        if data is not None:
            self.hits += 1
        return data

    def _keep(self, digest: Digest, data: bytes) -> None:
        if len(data) <= self.max_blob_size:
            self.lru.add(digest, data)

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        if digest.size_bytes > self.max_blob_size:
            async with aclosing(self.inner.get(ctx, digest, offset, limit)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        data = self._cached(digest)
        if data is None:
            self.misses += 1
            async with aclosing(self.inner.get(ctx, digest)) as chunks:
                data = b"".join([chunk async for chunk in chunks])
            self._keep(digest, data)
        end = len(data) if limit == 0 else min(len(data), offset + limit)
        if offset < end:  # one chunk at most: cached blobs are no larger
            yield data[offset:end]

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {}
        wanted = []
        for digest in dict.fromkeys(digests):
            data = self._cached(digest) if digest.size_bytes <= self.max_blob_size else None
            if data is None:
                wanted.append(digest)
            else:
                found[digest] = data
        if wanted:
            self.misses += len(wanted)
            read = await self.inner.bulk_read(ctx, wanted)
            for digest, data in read.items():
                self._keep(digest, data)
            found.update(read)
        return found

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        for digest in digests:
            self.lru.pop(digest)
        return await super().delete(digests)
