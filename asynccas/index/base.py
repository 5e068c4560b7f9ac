"""An index is a storage wrapping a storage: fast metadata (existence, size, recency) in front of
the blobs, plus the clean-up API of BuildGrid's indexes, made async."""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import anyio

from asynccas.digest import Digest
from asynccas.errors import BlobNotFound, CasError
from asynccas.storage.base import BlobWriter, Storage

if TYPE_CHECKING:
    from asynccas.eviction import ByteBudget


class StorageIndex(Storage):
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        # Set while an EvictionPolicy keeps this index under a byte budget: uploads charge
        # their size to it when they open.
        self.budget: ByteBudget | None = None

    # Reads go to the wrapped storage; the index only keeps recency and heals itself.

    async def get_blob(
        self, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        started = time.time()
        try:
            async for chunk in self.storage.get_blob(digest, offset, limit):
                yield chunk
        except BlobNotFound:
            await self._forget([digest], started)
            raise
        await self._touch([digest])

    async def bulk_read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        started = time.time()
        found = await self.storage.bulk_read_blobs(unique)
        lost = [d for d in unique if d not in found]
        if lost:
            await self._forget(lost, started)
        if found:
            await self._touch(found)
        return found

    # Writes stage and release through the wrapped storage; an index only changes how staged
    # writers are published (publish_staged), which IndexedWriter routes through too.

    async def open_write(self, digest: Digest) -> BlobWriter:
        if self.budget is not None:
            await self.budget.charge(digest.size_bytes)
        return IndexedWriter(self, await self.storage.open_write(digest))

    async def stage_blobs(
        self, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        if self.budget is not None:
            await self.budget.charge(sum(len(data) for _, data in blobs))
        return await self.storage.stage_blobs(blobs)

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        await self.storage.release_staged(writers)

    async def commit_writer(self, writer: BlobWriter) -> None:
        """Verify and publish a writer of the wrapped storage (``IndexedWriter.commit``);
        indexes that can do both at once override this."""
        await writer.verify()
        await self.publish_staged([writer])

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
                stale += await self.storage.missing_blobs(page)
                page = []
        if page:
            stale += await self.storage.missing_blobs(page)
        await self.forget(stale)
        return listed, len(stale)

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
