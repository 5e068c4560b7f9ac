"""An index is a storage wrapping a storage: fast metadata (existence, size, recency) in front of
the blobs, plus the clean-up API of BuildGrid's indexes, made async."""

from __future__ import annotations

import abc
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import aclosing
from datetime import datetime
from typing import TYPE_CHECKING, cast

import anyio

from asynccas.digest import Digest
from asynccas.errors import BlobNotFound, CasError
from asynccas.storage.base import (
    BlobWriter,
    Deletable,
    DeletionMarked,
    Listable,
    Stageable,
    Storage,
    contains,
    missing_digests,
    put_chunks,
    release_staged,
    require,
    stage,
)
from asynccas.storage.context import NO_CONTEXT, RequestContext

if TYPE_CHECKING:
    from asynccas.eviction import ByteBudget


class StorageIndex(Storage, Stageable, Deletable, Listable, DeletionMarked):
    """Subclasses answer ``find_missing``, publish staged writers and record them in one
    transaction (``publish_staged``), delete, and keep LRU order; reads and writes go through
    to ``storage``, which must be able to delete (eviction does)."""

    def __init__(self, storage: Storage) -> None:
        require(storage, Deletable, f"{type(self).__name__} (it evicts)")
        self.storage = storage
        self._storage_deletes = cast(Deletable, storage)
        # Set while an EvictionPolicy keeps this index under a byte budget: uploads charge
        # their size to it when they open.
        self.budget: ByteBudget | None = None
        self.deletion_listeners: list[Callable[[Sequence[Digest]], Awaitable[None]]] = []
        """Called with the digests each deletion or eviction removed from the storage (what
        keeps a blob-info cache from naming blobs that are gone)."""

    def offers(self, capability: type) -> bool:
        if capability is Listable:  # rebuilding lists what the storage holds
            return self.storage.offers(Listable)
        return isinstance(self, capability)

    # Reads go to the wrapped storage; the index only keeps recency and heals itself.

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        started = time.time()
        try:
            async for chunk in self.storage.get(ctx, digest, offset, limit):
                yield chunk
        except BlobNotFound:
            await self._forget([digest], started)
            raise
        await self._touch([digest])

    def get_zstd(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes] | None:
        frame = self.storage.get_zstd(ctx, digest)
        return None if frame is None else self._read_through(digest, frame)

    async def _read_through(
        self, digest: Digest, chunks: AsyncGenerator[bytes]
    ) -> AsyncGenerator[bytes]:
        """``chunks`` of ``digest``, with the index's bookkeeping of a read (as ``get``)."""
        started = time.time()
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        except BlobNotFound:
            await self._forget([digest], started)
            raise
        await self._touch([digest])

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        started = time.time()
        found = await self.storage.bulk_read(ctx, unique)
        lost = [d for d in unique if d not in found]
        if lost:
            await self._forget(lost, started)
        if found:
            await self._touch(found)
        return found

    # Writes stage and release through the wrapped storage; an index only changes how staged
    # writers are published (publish_staged), which IndexedWriter routes through too.

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        if self.budget is not None:
            await self.budget.charge(digest.size_bytes, ctx)
        return IndexedWriter(self, await self.storage.put(ctx, digest))

    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        if self.budget is not None:
            await self.budget.charge(sum(len(data) for _, data in blobs), ctx)
        return await stage(self.storage, ctx, blobs)

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        await release_staged(self.storage, writers)

    async def commit_writer(self, writer: BlobWriter) -> None:
        """Verify and publish a writer of the wrapped storage (``IndexedWriter.commit``);
        indexes that can do both at once override this."""
        await writer.verify()
        await self.publish_staged([writer])

    def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        return cast(Listable, self.storage).list_blobs()

    async def _delete_from_storage(
        self, digests: Sequence[Digest], *, then_tell: bool = True
    ) -> list[Digest]:
        """Delete from the storage below, then (unless the caller will, once it has released
        what it holds) tell the deletion listeners."""
        gone = await self._storage_deletes.delete(digests)
        if then_tell:
            await self._tell_deletion_listeners(digests)
        return gone

    async def _tell_deletion_listeners(self, digests: Sequence[Digest]) -> None:
        for listener in self.deletion_listeners:
            await listener(digests)

    async def deletion_marker(self) -> int | None:
        """None here; indexes that count their deletions say so."""
        return None

    @abc.abstractmethod
    async def _touch(self, digests: Iterable[Digest]) -> None:
        """Record a use of these blobs (throttled: recency need not be exact to the second)."""

    @abc.abstractmethod
    async def _forget(self, digests: Iterable[Digest], used_before: float) -> None:
        """Self-healing: drop entries of blobs the storage no longer has. Entries used since
        ``used_before`` belong to a concurrent upload and must stay."""

    @abc.abstractmethod
    async def index_existing(self, blobs: Sequence[tuple[Digest, float]]) -> None:
        """Add entries for blobs already in storage, with their last-use times."""

    @abc.abstractmethod
    async def forget(self, digests: Iterable[Digest]) -> None:
        """Drop entries without touching storage."""

    async def reindex(self, blobs: AsyncIterator[tuple[Digest, float]]) -> tuple[int, int]:
        """Rebuild from what storage holds: index every listed blob, drop entries for the rest.

        Returns (blobs listed, stale entries dropped).
        """
        listed = 0
        batch: list[tuple[Digest, float]] = []
        async for item in blobs:
            batch.append(item)
            listed += 1
            if len(batch) >= 1000:
                await self.index_existing(batch)
                batch = []
        if batch:
            await self.index_existing(batch)
        stale: list[Digest] = []
        page: list[Digest] = []
        async for digest, _ in self.least_recent_digests():
            page.append(digest)
            if len(page) >= 1000:
                stale += await missing_digests(self.storage, NO_CONTEXT, page)
                page = []
        if page:
            stale += await missing_digests(self.storage, NO_CONTEXT, page)
        await self.forget(stale)
        return listed, len(stale)

    # -- BuildGrid's index API, made async ---------------------------------------------------
    # BuildGrid's RedisIndex and SQLIndex names and parameters, for people coming from it:
    # calls outside any request, so without a request context.

    async def has_blob(self, digest: Digest) -> bool:
        return await contains(self, NO_CONTEXT, digest)

    async def missing_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        """The given digests that are absent, each once, in first-seen order."""
        return await missing_digests(self, NO_CONTEXT, digests)

    async def get_blob(
        self, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        async with aclosing(self.get(NO_CONTEXT, digest, offset, limit)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def commit_write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """Store a blob fed as chunks; raise DigestMismatch (storing nothing) if it is wrong."""
        await put_chunks(self, NO_CONTEXT, digest, chunks)

    async def bulk_update_blobs(
        self, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        return await self.bulk_update(NO_CONTEXT, blobs)

    async def bulk_read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        return await self.bulk_read(NO_CONTEXT, list(digests))

    async def delete_blob(self, digest: Digest) -> bool:
        return bool(await self.delete([digest]))

    async def bulk_delete(self, digests: Iterable[Digest]) -> list[Digest]:
        """Remove many blobs; returns those that were there and are now gone."""
        return await self.delete(list(digests))

    @abc.abstractmethod
    def least_recent_digests(self) -> AsyncIterator[tuple[Digest, int]]:
        """Indexed blobs with their sizes, least recently used first."""

    @abc.abstractmethod
    async def get_total_size(self) -> int:
        """Exact total bytes of the indexed blobs."""

    @abc.abstractmethod
    async def delete_n_bytes(
        self,
        n_bytes: int,
        dry_run: bool = False,
        protect_blobs_after: datetime | None = None,
        large_blob_threshold: int | None = None,
        large_blob_lifetime: datetime | None = None,
    ) -> int:
        """Free at least ``n_bytes`` if possible, least recently used first; return bytes freed.

        Blobs used at or after ``protect_blobs_after`` are never deleted. Blobs over
        ``large_blob_threshold`` bytes not used since ``large_blob_lifetime`` go first.
        With ``dry_run`` nothing is deleted and the bytes that would be freed are returned.
        """


class IndexedWriter(BlobWriter):
    """Streams into the wrapped storage's writer; publishing goes through the index's
    ``publish_staged``, which makes the blob visible and indexes it together."""

    def __init__(self, index: StorageIndex, inner: BlobWriter) -> None:
        super().__init__(inner.digest)
        self._index = index
        self._inner = inner

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)
        self.committed_size = self._inner.committed_size

    async def flush(self) -> None:
        await self._inner.flush()

    async def release_memory(self) -> None:
        await self._inner.release_memory()

    async def verify(self) -> None:
        await self._inner.verify()
        self._verified = True

    async def _write(self, parts: list[bytes]) -> None:  # pragma: no cover - write() delegates
        raise AssertionError("unreachable")

    async def _publish(self) -> None:
        await self._index.publish_staged([self._inner])

    async def commit(self) -> None:
        try:
            await self._index.commit_writer(self._inner)
            self._verified = True
        finally:
            with anyio.CancelScope(shield=True):
                await self.abort()

    async def abort(self) -> None:
        await self._inner.abort()

    async def _abort(self) -> None:  # pragma: no cover - abort() delegates
        raise AssertionError("unreachable")
