"""The in-memory read cache: hits cost the storage nothing, and it never holds what it should
not (large blobs, deleted blobs, more than its budget)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

import pytest

from asynccas.digest import Digest
from asynccas.storage.base import Deletable, Listable, Stageable
from asynccas.storage.context import NO_CONTEXT, RequestContext
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.read_cache import ReadCacheStorage
from asynccas.testing import blob

pytestmark = pytest.mark.anyio


class CountingStorage(MemoryStorage):
    """The real memory storage, counting the reads that reach it."""

    def __init__(self) -> None:
        super().__init__(64 << 20)
        self.reads = 0

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        self.reads += 1
        async for chunk in super().get(ctx, digest, offset, limit):
            yield chunk

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        self.reads += len(digests)
        return await super().bulk_read(ctx, digests)


async def read(storage: ReadCacheStorage, digest: Digest, offset: int = 0, limit: int = 0) -> bytes:
    async with aclosing(storage.get(NO_CONTEXT, digest, offset, limit)) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_a_second_read_of_a_small_blob_reaches_no_storage() -> None:
    inner = CountingStorage()
    cache = ReadCacheStorage(inner, max_bytes=1 << 20, max_blob_size=8192)
    small, large = blob(5000, 1), blob(20_000, 2)
    assert await cache.bulk_update(NO_CONTEXT, [small, large]) == [None, None]
    for _ in range(3):
        assert await read(cache, small[0]) == small[1]
        assert await read(cache, small[0], 100, 50) == small[1][100:150]
        assert await read(cache, large[0]) == large[1]
    assert inner.reads == 1 + 3, "one read of the small blob, every read of the large one"
    assert await cache.bulk_read(NO_CONTEXT, [small[0], large[0]]) == dict([small, large])
    assert inner.reads == 4 + 1, "the batch asked the storage for the large blob only"
    assert (cache.hits, cache.misses) == (6, 2)


async def test_the_cache_keeps_to_its_budget_and_forgets_deleted_blobs() -> None:
    inner = CountingStorage()
    cache = ReadCacheStorage(inner, max_bytes=10_000, max_blob_size=8192)
    blobs = [blob(3000, seed) for seed in range(5)]
    await cache.bulk_update(NO_CONTEXT, blobs)
    assert await cache.bulk_read(NO_CONTEXT, [d for d, _ in blobs]) == dict(blobs)
    assert cache.lru.total == sum(map(len, cache.lru.entries.values())) <= 10_000
    assert list(cache.lru.entries) == [d for d, _ in blobs[-3:]], "least recently read went first"
    victim = blobs[-1][0]
    assert await cache.delete([victim]) == [victim]
    assert victim not in cache.lru
    assert await cache.bulk_read(NO_CONTEXT, [victim]) == {}


def test_a_wrapper_offers_what_it_wraps() -> None:
    cache = ReadCacheStorage(MemoryStorage())
    assert cache.offers(Deletable)
    assert not cache.offers(Listable)
    assert not cache.offers(Stageable)
