"""The base of wrappers that send each blob to one of several storages, chosen from its digest
alone: size-differentiated tiers today, sharding tomorrow. A subclass says only where a digest
goes (``route``); batches are split by route and answered together, and each optional
capability is offered when every routed-to storage offers it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Sequence

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import CasError
from asynccas.storage.base import (
    BlobWriter,
    Deletable,
    DeletionMarked,
    Listable,
    Stageable,
    Storage,
    deletion_marker,
    publish_staged,
    release_staged,
    stage,
)
from asynccas.storage.context import RequestContext


class RoutingStorage(Storage, Stageable, Deletable, Listable, DeletionMarked):
    def __init__(self, routes: Sequence[Storage]) -> None:
        self.routes = list(routes)

    @abc.abstractmethod
    def route(self, digest: Digest) -> int:
        """The position in ``routes`` of the storage that holds ``digest``."""

    def offers(self, capability: type) -> bool:
        return isinstance(self, capability) and all(s.offers(capability) for s in self.routes)

    def why_not(self, capability: type) -> str:
        lacking = [s for s in self.routes if not s.offers(capability)]
        if isinstance(self, capability) and lacking:
            return f"{type(self).__name__} routes to one that does not: {lacking[0].why_not(capability)}"
        return super().why_not(capability)

    def _positions(self, digests: Sequence[Digest]) -> dict[int, list[int]]:
        """For each route used, the positions of ``digests`` that go there."""
        by_route: dict[int, list[int]] = {}
        for position, digest in enumerate(digests):
            by_route.setdefault(self.route(digest), []).append(position)
        return by_route

    async def start(self) -> None:
        for storage in self.routes:
            await storage.start()

    async def stop(self) -> None:
        for storage in reversed(self.routes):
            await storage.stop()

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = batch.digests
        by_route = self._positions(digests)
        if len(by_route) == 1:
            (route,) = by_route
            return await self.routes[route].find_missing(ctx, batch)
        mask = bytearray(len(digests))
        for route, positions in by_route.items():
            part = DigestBatch.of(batch.function, [digests[p] for p in positions])
            answer = await self.routes[route].find_missing(ctx, part)
            for position, missing in zip(positions, answer, strict=True):
                mask[position] = missing
        return bytes(mask)

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        async for chunk in self.routes[self.route(digest)].get(ctx, digest, offset, limit):
            yield chunk

    def get_zstd(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes] | None:
        return self.routes[self.route(digest)].get_zstd(ctx, digest)

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        return await self.routes[self.route(digest)].put(ctx, digest)

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {}
        for route, positions in self._positions(digests).items():
            found.update(await self.routes[route].bulk_read(ctx, [digests[p] for p in positions]))
        return found

    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        staged: list[BlobWriter | CasError | None] = [None] * len(blobs)
        for route, positions in self._positions([d for d, _ in blobs]).items():
            results = await stage(self.routes[route], ctx, [blobs[p] for p in positions])
            for position, result in zip(positions, results, strict=True):
                staged[position] = result
        return [s for s in staged if s is not None]

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        by_route = self._positions([w.digest for w in writers])
        if len(by_route) <= 1:  # the usual batch: one route, no task group needed
            for route, positions in by_route.items():
                await publish_staged(self.routes[route], [writers[p] for p in positions])
            return
        async with anyio.create_task_group() as tasks:
            for route, positions in by_route.items():
                tasks.start_soon(
                    publish_staged, self.routes[route], [writers[p] for p in positions]
                )

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        for route, positions in self._positions([w.digest for w in writers]).items():
            await release_staged(self.routes[route], [writers[p] for p in positions])

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(digests))
        gone: list[Digest] = []
        for route, positions in self._positions(unique).items():
            storage = self.routes[route]
            assert isinstance(storage, Deletable), "offers(Deletable) is checked by callers"
            gone += await storage.delete([unique[p] for p in positions])
        return gone

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        for storage in self.routes:
            assert isinstance(storage, Listable), "offers(Listable) is checked by callers"
            async for listed in storage.list_blobs():
                yield listed

    async def deletion_marker(self) -> int | None:
        combined = 0
        for storage in self.routes:
            marker = await deletion_marker(storage)
            if marker is None:
                return None
            combined = combined * 1_000_003 + marker
        return combined
