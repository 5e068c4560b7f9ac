"""Every blob in two storages (bb-storage's MirroredBlobAccess): a pair that survives losing
either side with no client error.

Writes go to both and succeed when at least one side took the blob. Reads go to one side
(chosen by digest, so that the two share the load) and to the other when that one lacks the
blob or fails. A blob found on one side only, by a read or by FindMissingBlobs, is copied to
the other, so a side that was away or lost its disk fills up again by use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable, BlobNotFound, CasError, DeadlineExceeded
from asynccas.storage.base import BlobWriter, Storage, copy_blob, opened
from asynccas.storage.context import RequestContext
from asynccas.storage.tee_writer import TeeWriter

logger = logging.getLogger(__name__)

_SIDE_DOWN = (BackendUnavailable, DeadlineExceeded)
"""Failures that mean "that side is away", after which the other side answers alone."""


class MirroredStorage(Storage):
    def __init__(self, first: Storage, second: Storage, *, copy_concurrency: int = 16) -> None:
        self.sides = (first, second)
        self._copies: set[asyncio.Task[None]] = set()
        self._copy_limit = anyio.CapacityLimiter(copy_concurrency)
        self.copies = 0
        """Blobs copied from one side to the other because only one had them."""

    async def start(self) -> None:
        for side in self.sides:
            await side.start()

    async def stop(self) -> None:
        for task in list(self._copies):
            task.cancel()
        for side in reversed(self.sides):
            await side.stop()

    def _order(self, digest: Digest) -> tuple[Storage, Storage]:
        first, second = self.sides
        return (first, second) if int(digest.hash[-2:], 16) % 2 == 0 else (second, first)

    def _copy_later(
        self, ctx: RequestContext, source: Storage, target: Storage, digest: Digest
    ) -> None:
        async def copy() -> None:
            async with self._copy_limit:
                try:
                    await copy_blob(ctx, source, target, digest)
                except CasError as exc:
                    logger.warning("could not copy %s to the other side: %s", digest, exc)
                    return
            self.copies += 1

        task = asyncio.create_task(copy())
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        first, second = self.sides
        answers = await asyncio.gather(
            first.find_missing(ctx, batch), second.find_missing(ctx, batch),
            return_exceptions=True,
        )  # fmt: skip
        masks = []
        for answer in answers:
            if isinstance(answer, _SIDE_DOWN):
                logger.debug("one side of a mirror is away: %s", answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                masks.append(answer)
        if not masks:
            raise answers[0]  # type: ignore[misc]  # both sides are away
        if len(masks) == 1:
            return masks[0]
        only_first, only_second = masks
        digests = batch.digests
        for position, (a, b) in enumerate(zip(only_first, only_second, strict=True)):
            if a != b:  # on one side only: copy it over
                source, target = (second, first) if a else (first, second)
                self._copy_later(ctx.detached(), source, target, digests[position])
        return bytes(a & b for a, b in zip(only_first, only_second, strict=True))

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        preferred, other = self._order(digest)
        failure: CasError | None = None
        try:
            chunks = await opened(preferred, ctx, digest, offset, limit)
        except _SIDE_DOWN as exc:
            chunks, failure = None, exc
        if chunks is None:
            try:
                chunks = await opened(other, ctx, digest, offset, limit)
            except _SIDE_DOWN:
                if failure is None:
                    raise
                raise failure from None  # both away
            if chunks is None:
                raise BlobNotFound(digest)
            if failure is None:  # the preferred side lacks it: give it a copy
                self._copy_later(ctx.detached(), other, preferred, digest)
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        writers = [await side.put(ctx, digest) for side in self.sides]
        return TeeWriter(digest, writers)  # either side may drop out; not both

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        first, second = self.sides
        try:
            found = await first.bulk_read(ctx, digests)
        except _SIDE_DOWN:
            return await second.bulk_read(ctx, digests)
        rest = [d for d in digests if d not in found]
        if rest:
            try:
                found.update(await second.bulk_read(ctx, rest))
            except _SIDE_DOWN as exc:
                logger.debug("one side of a mirror is away: %s", exc)
        return found

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        answers = await asyncio.gather(
            *(side.bulk_update(ctx, blobs) for side in self.sides), return_exceptions=True
        )
        per_side: list[list[CasError | None]] = []
        for answer in answers:
            if isinstance(answer, CasError):
                per_side.append([answer] * len(blobs))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                per_side.append(answer)
        first, second = per_side
        # Stored if either side stored it; otherwise the first side's reason.
        return [
            a if a is not None and b is not None else None
            for a, b in zip(first, second, strict=True)
        ]
