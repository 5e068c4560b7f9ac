"""Instances kept apart over one shared copy of every blob (``isolation = "per-instance"``).

Docker distribution's registry keeps one global blob store and, per repository, the set of
blobs that repository uploaded: a blob is served to a repository only if it is in that set,
and a repository uploading bytes the store already holds costs no second copy. Here the
repositories are REAPI instances and the sets live in a ``BlobInfoCache``:

- a blob is present to an instance only if the instance holds it (membership) *and* the store
  still has it: a check asks membership first (one round trip for any number of digests),
  then the store about the members only;
- reading a blob the instance does not hold is NOT_FOUND, whoever else holds it;
- uploading a blob the store already holds (its metadata says so, or the store does) only
  hashes the bytes as they arrive, then adds the instance to its holders: the client must
  still send every byte (a digest alone never grants access), but nothing is written twice;
- eviction (the index's deletion listeners) removes the blob from every instance and drops
  its metadata, so nothing dangles; and if it ever did, the store check makes it harmless.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from itertools import compress

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable, BlobNotFound, CasError, DigestMismatch
from asynccas.hashing import THREAD_THRESHOLD, hash_parts
from asynccas.index.base import StorageIndex
from asynccas.storage.base import (
    BlobWriter,
    DeletionMarked,
    Storage,
    contains,
    mask_of,
    missing_digests,
)
from asynccas.storage.blob_info import BlobInfoCache, BlobMeta
from asynccas.storage.context import RequestContext
from asynccas.storage.forwarding import ForwardingStorage, innermost
from asynccas.storage.tee_writer import TeeWriter
from asynccas.threads import in_thread


class PerInstanceStorage(ForwardingStorage):
    def __init__(self, inner: Storage, info: BlobInfoCache, *, location: str = "") -> None:
        super().__init__(inner)
        self.info = info
        self.location = location or type(inner).__name__
        self.deduplicated = 0
        """Uploads of bytes the store already held, answered by hashing alone."""
        index = innermost(inner, StorageIndex)
        if isinstance(index, StorageIndex):
            index.deletion_listeners.append(info.forget)

    def offers(self, capability: type) -> bool:
        # A deletion marker says nothing about one instance's view: GetTree's cache must ask
        # (through membership) whether a cached tree is still there for this caller.
        return capability is not DeletionMarked and super().offers(capability)

    def why_not(self, capability: type) -> str:
        if capability is DeletionMarked:
            return "per-instance isolation answers per instance, not with one marker"
        return super().why_not(capability)

    async def start(self) -> None:
        await self.info.start()
        await super().start()

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            await self.info.stop()

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = batch.digests
        held = await self.info.contains(ctx.instance_name, digests)
        members = list(dict.fromkeys(compress(digests, held)))
        gone = set(await missing_digests(self.inner, ctx, members)) if members else set()
        absent = [d for d, h in zip(digests, held, strict=True) if not h or d in gone]
        return mask_of(batch, absent) if absent else bytes(len(digests))

    async def _holds(self, ctx: RequestContext, digest: Digest) -> bool:
        return (await self.info.contains(ctx.instance_name, [digest]))[0]

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        if not await self._holds(ctx, digest):
            raise BlobNotFound(digest)
        async with aclosing(self.inner.get(ctx, digest, offset, limit)) as chunks:
            async for chunk in chunks:
                yield chunk

    def get_zstd(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes] | None:
        frame = self.inner.get_zstd(ctx, digest)
        return None if frame is None else self._held_frame(ctx, digest, frame)

    async def _held_frame(
        self, ctx: RequestContext, digest: Digest, frame: AsyncGenerator[bytes]
    ) -> AsyncGenerator[bytes]:
        async with aclosing(frame):
            if not await self._holds(ctx, digest):
                raise BlobNotFound(digest)
            async for chunk in frame:
                yield chunk

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        held = await self.info.contains(ctx.instance_name, unique)
        members = list(compress(unique, held))
        return await self.inner.bulk_read(ctx, members) if members else {}

    async def _stored(self, ctx: RequestContext, digests: Sequence[Digest]) -> list[bool]:
        """Whether the store holds each digest: its metadata first, the store for the rest
        (whose answer then heals the metadata)."""
        known = [meta is not None for meta in await self.info.meta(digests)]
        unknown = [d for d, k in zip(digests, known, strict=True) if not k]
        if unknown:
            absent = set(await missing_digests(self.inner, ctx, unknown))
            found = [d for d in unknown if d not in absent]
            await self.info.set_meta([(d, self._meta(d)) for d in found])
            stored = set(found)
            known = [k or d in stored for d, k in zip(digests, known, strict=True)]
        return known

    def _meta(self, digest: Digest) -> BlobMeta:
        return BlobMeta(digest.size_bytes, self.location, time.time())

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        if (await self._stored(ctx, [digest]))[0]:
            return _VerifyingWriter(self, ctx, digest)
        return _MembershipWriter(self, ctx, await self.inner.put(ctx, digest))

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        stored = await self._stored(ctx, [d for d, _ in blobs])
        results: list[CasError | None] = [None] * len(blobs)
        new = [p for p, s in enumerate(stored) if not s]
        if new:
            answers = await self.inner.bulk_update(ctx, [blobs[p] for p in new])
            for position, answer in zip(new, answers, strict=True):
                results[position] = answer
            written = [blobs[p][0] for p, a in zip(new, answers, strict=True) if a is None]
            await self.info.set_meta([(d, self._meta(d)) for d in written])
        known = [p for p, s in enumerate(stored) if s]
        checked = [blobs[p] for p in known]
        if sum(len(data) for _, data in checked) >= THREAD_THRESHOLD:
            wrong = await in_thread(_mismatches, checked)
        else:
            wrong = _mismatches(checked)
        for position, error in zip(known, wrong, strict=True):
            results[position] = error
        held = [d for (d, _), r in zip(blobs, results, strict=True) if r is None]
        await self._add(ctx, held)
        return results

    async def _add(self, ctx: RequestContext, digests: Sequence[Digest]) -> None:
        await self.info.add(ctx.instance_name, digests)

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        gone = await super().delete(digests)
        await self.info.forget(list(digests))
        return gone


class _MembershipWriter(TeeWriter):
    """The store's writer; once it published, the instance holds the blob."""

    def __init__(
        self, storage: PerInstanceStorage, ctx: RequestContext, writer: BlobWriter
    ) -> None:
        super().__init__(writer.digest, [writer])
        self._storage = storage
        self._ctx = ctx

    async def _publish(self) -> None:
        await super()._publish()
        await self._storage.info.set_meta([(self.digest, self._storage._meta(self.digest))])
        await self._storage._add(self._ctx, [self.digest])


class _VerifyingWriter(BlobWriter):
    """An upload of bytes the store already holds: hashed as they arrive, kept nowhere. A
    good hash adds the instance to the blob's holders, once the store confirms it still has
    the blob (and its recency is refreshed)."""

    def __init__(self, storage: PerInstanceStorage, ctx: RequestContext, digest: Digest) -> None:
        super().__init__(digest)
        self._storage = storage
        self._ctx = ctx

    async def _write(self, parts: list[bytes]) -> None:
        await hash_parts(self._hasher, parts)

    async def _publish(self) -> None:
        storage = self._storage
        if not await contains(storage.inner, self._ctx, self.digest):
            await storage.info.forget([self.digest])
            raise BackendUnavailable(
                f"blob {self.digest} was evicted while its upload was checked; upload it again"
            )
        storage.deduplicated += 1
        await storage._add(self._ctx, [self.digest])

    async def _abort(self) -> None:
        pass


def _mismatches(blobs: Sequence[tuple[Digest, bytes]]) -> list[CasError | None]:
    """For each blob, a DigestMismatch if its data is not its digest's, else None."""
    errors: list[CasError | None] = []
    for digest, data in blobs:
        hasher = digest.function.new_hasher()
        hasher.update(data)
        matches = hasher.hexdigest() == digest.hash
        errors.append(None if matches else DigestMismatch(f"data does not hash to {digest}"))
    return errors
