"""Positive FindMissingBlobs answers remembered for a while (bb-storage's
ExistenceCachingBlobAccess), so that a proxy does not ask its upstream again about blobs it
was just told are there: without it, existence checks were 93.8% of bazel-remote's backend
calls (bazel-remote #919).

Blobs uploaded through it are remembered too. Only "present" is remembered, never "missing": a blob reported missing is uploaded next, and
a stale "missing" would make clients upload it again and again. A remembered blob is trusted
for ``ttl`` seconds, which is the window in which the storage below could evict it unseen;
pick it well under the upstream's eviction age (REAPI lets a server forget a blob, and
clients recover by uploading it again). A read that finds the blob gone forgets it at once.
Entries are per instance, since the storage below may keep instances apart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import aclosing

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BlobNotFound, CasError
from asynccas.storage.base import BlobWriter, Storage
from asynccas.storage.context import RequestContext
from asynccas.storage.forwarding import ForwardingStorage
from asynccas.storage.tee_writer import TeeWriter

_Key = tuple[str, Digest]
_MAX_TRACKED_INSTANCES = 10_000


class ExistenceCacheStorage(ForwardingStorage):
    def __init__(self, inner: Storage, *, ttl: float = 300.0, max_entries: int = 1_000_000) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("an existence cache needs a positive ttl and max_entries")
        super().__init__(inner)
        self.ttl = ttl
        self.max_entries = max_entries
        self._present: OrderedDict[_Key, float] = OrderedDict()  # key -> when it expires
        # The instance names entries were made for, so that a delete looks up each digest
        # under each of them rather than walking every entry (a million, on the event loop).
        # A server that meets more names than this walks instead.
        self._instances: set[str] | None = set()
        self.answered = 0
        """Digests answered from memory, without asking the storage below."""
        self.asked = 0
        """Digests the storage below was asked about."""

    def _known(self, key: _Key, now: float) -> bool:
        expires = self._present.get(key)
        if expires is None:
            return False
        if expires <= now:
            del self._present[key]
            return False
        return True

    def remember(self, instance: str, digests: Iterable[Digest]) -> None:
        instances = self._instances
        if instances is not None and instance not in instances:
            instances.add(instance)
            if len(instances) > _MAX_TRACKED_INSTANCES:
                self._instances = None
        expires = time.monotonic() + self.ttl
        present = self._present
        for digest in digests:
            key = (instance, digest)
            present[key] = expires
            present.move_to_end(key)
        while len(present) > self.max_entries:
            present.popitem(last=False)

    def forget(self, instance: str, digests: Iterable[Digest]) -> None:
        for digest in digests:
            self._present.pop((instance, digest), None)

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = batch.digests
        now = time.monotonic()
        instance = ctx.instance_name
        unknown = [p for p, d in enumerate(digests) if not self._known((instance, d), now)]
        self.answered += len(digests) - len(unknown)
        self.asked += len(unknown)
        mask = bytearray(len(digests))
        if not unknown:
            return bytes(mask)
        part = batch if len(unknown) == len(digests) else DigestBatch.of(
            batch.function, [digests[p] for p in unknown]
        )  # fmt: skip
        answer = await self.inner.find_missing(ctx, part)
        for position, missing in zip(unknown, answer, strict=True):
            mask[position] = missing
        # A repeated digest is flagged at its first position only: "0" at a later one does
        # not mean present.
        absent = {digests[p] for p, missing in zip(unknown, answer, strict=True) if missing}
        self.remember(instance, (digests[p] for p in unknown if digests[p] not in absent))
        return bytes(mask)

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        try:
            async with aclosing(self.inner.get(ctx, digest, offset, limit)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BlobNotFound:
            self.forget(ctx.instance_name, [digest])
            raise

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        return _RememberingWriter(self, ctx, await self.inner.put(ctx, digest))

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        found = await self.inner.bulk_read(ctx, digests)
        self.forget(ctx.instance_name, (d for d in digests if d not in found))
        return found

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        results = await self.inner.bulk_update(ctx, blobs)
        stored = (d for (d, _), error in zip(blobs, results, strict=True) if error is None)
        self.remember(ctx.instance_name, stored)
        return results

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        instances = self._instances
        if instances is not None and len(instances) * len(digests) <= len(self._present):
            for instance in instances:
                self.forget(instance, digests)
        else:
            gone = set(digests)
            for key in [k for k in self._present if k[1] in gone]:
                del self._present[key]
        return await super().delete(digests)


class _RememberingWriter(TeeWriter):
    """The storage below's writer; a blob it published is known present from then on (a
    build asks about the blobs it just uploaded: the next FindMissingBlobs, the check of the
    action result naming them)."""

    def __init__(
        self, cache: ExistenceCacheStorage, ctx: RequestContext, writer: BlobWriter
    ) -> None:
        super().__init__(writer.digest, [writer])
        self._cache = cache
        self._instance = ctx.instance_name

    async def _publish(self) -> None:
        await super()._publish()
        self._cache.remember(self._instance, [self.digest])
