"""Storage tiers that compose other storages, in the style of bb-storage's wrappers."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence

import anyio

from asynccas.digest import Digest
from asynccas.errors import CasError
from asynccas.storage.base import BlobWriter, Storage


class SizeDifferentiatedStorage(Storage):
    """Blobs up to ``limit`` bytes in ``small`` (e.g. SQLite or memory), larger ones in
    ``large`` (e.g. disk). Where a blob lives follows from its digest alone."""

    def __init__(self, small: Storage, large: Storage, *, limit: int = 64 * 1024) -> None:
        self.small = small
        self.large = large
        self.limit = limit

    def _for(self, digest: Digest) -> Storage:
        return self.small if digest.size_bytes <= self.limit else self.large

    def _split(self, digests: Iterable[Digest]) -> tuple[list[Digest], list[Digest]]:
        small: list[Digest] = []
        large: list[Digest] = []
        for digest in dict.fromkeys(digests):
            (small if digest.size_bytes <= self.limit else large).append(digest)
        return small, large

    async def start(self) -> None:
        await self.small.start()
        await self.large.start()

    async def stop(self) -> None:
        await self.large.stop()
        await self.small.stop()

    async def has_blob(self, digest: Digest) -> bool:
        return await self._for(digest).has_blob(digest)

    async def missing_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        small, large = self._split(digests)
        missing = set(await self.small.missing_blobs(small) if small else [])
        missing.update(await self.large.missing_blobs(large) if large else [])
        return [d for d in [*small, *large] if d in missing]

    async def get_blob(
        self, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        async for chunk in self._for(digest).get_blob(digest, offset, limit):
            yield chunk

    async def bulk_read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        small, large = self._split(digests)
        found = await self.small.bulk_read_blobs(small) if small else {}
        if large:
            found.update(await self.large.bulk_read_blobs(large))
        return found

    async def open_write(self, digest: Digest) -> BlobWriter:
        return await self._for(digest).open_write(digest)

    async def stage_blobs(
        self, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        small = [(i, b) for i, b in enumerate(blobs) if b[0].size_bytes <= self.limit]
        large = [(i, b) for i, b in enumerate(blobs) if b[0].size_bytes > self.limit]
        staged: list[BlobWriter | CasError | None] = [None] * len(blobs)
        for part, storage in ((small, self.small), (large, self.large)):
            if part:
                results = await storage.stage_blobs([b for _, b in part])
                for (i, _), result in zip(part, results, strict=True):
                    staged[i] = result
        return [s for s in staged if s is not None]

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        small = [w for w in writers if w.digest.size_bytes <= self.limit]
        large = [w for w in writers if w.digest.size_bytes > self.limit]
        if not (small and large):  # the usual batch: one tier, no task group needed
            if small or large:
                await (self.small if small else self.large).publish_staged(small or large)
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.small.publish_staged, small)
            tasks.start_soon(self.large.publish_staged, large)

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        small = [w for w in writers if w.digest.size_bytes <= self.limit]
        large = [w for w in writers if w.digest.size_bytes > self.limit]
        if small:
            await self.small.release_staged(small)
        if large:
            await self.large.release_staged(large)

    async def delete_blob(self, digest: Digest) -> bool:
        return await self._for(digest).delete_blob(digest)

    async def bulk_delete(self, digests: Iterable[Digest]) -> list[Digest]:
        small, large = self._split(digests)
        gone = await self.small.bulk_delete(small) if small else []
        return gone + (await self.large.bulk_delete(large) if large else [])

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        async for listed in self.small.list_blobs():
            yield listed
        async for listed in self.large.list_blobs():
            yield listed

    async def deletion_marker(self) -> int | None:
        small, large = await self.small.deletion_marker(), await self.large.deletion_marker()
        return None if small is None or large is None else small * 1_000_003 + large
