"""A fast storage in front of a slow one (NativeLink's fast_slow, BuildGrid's with-cache): the
shape of a caching proxy, a local disk in front of a shared or remote CAS.

- The slow storage is the authority on what exists: ``find_missing`` asks it (put an
  existence cache in front of it to make that cheap). A blob it lost but the fast one still
  has is copied back up before the answer, not reported present on the fast copy's word
  (NativeLink PR #633) nor reported missing to a client that would then upload it again.
- Reads try the fast store and only on its miss the slow one, with no existence check before
  either (NativeLink #1999's double round trip). A miss fills the fast store from the slow
  one, verifying as it writes, and readers of a blob being filled wait for that one fill
  rather than starting their own or failing (bazel-remote #318).
- Writes go to both, the slow one being the one that must succeed; or, with
  ``write_behind``, to the fast one and then to the slow one from a bounded queue (when the
  queue is full, the writer copies its blob up itself: back-pressure, not loss). Until a
  queued blob reaches the slow store, ``find_missing`` finds it only in the fast one and
  copies it up, so nothing acknowledged depends on the queue surviving a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing, suppress

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable, BlobNotFound, CasError, DigestMismatch
from asynccas.storage.base import BlobWriter, Storage, put_chunks
from asynccas.storage.context import RequestContext

logger = logging.getLogger(__name__)


async def copy_blob(ctx: RequestContext, source: Storage, target: Storage, digest: Digest) -> None:
    """Stream ``digest`` from ``source`` into ``target``, verified on the way in."""
    async with aclosing(source.get(ctx, digest)) as chunks:
        await put_chunks(target, ctx, digest, chunks)


class WithCacheStorage(Storage):
    def __init__(
        self,
        fast: Storage,
        slow: Storage,
        *,
        write_behind: bool = False,
        queue_size: int = 10_000,
        copy_concurrency: int = 16,
    ) -> None:
        if queue_size <= 0 or copy_concurrency <= 0:
            raise ValueError("queue_size and copy_concurrency must be positive")
        self.fast = fast
        self.slow = slow
        self.write_behind = write_behind
        self.copy_concurrency = copy_concurrency
        self._queue: asyncio.Queue[tuple[RequestContext, Digest]] = asyncio.Queue(queue_size)
        self._copiers: list[asyncio.Task[None]] = []
        self._fills: dict[tuple[str, Digest], asyncio.Task[bool]] = {}
        self.fills = 0
        """Blobs copied from the slow store into the fast one (one per blob, however many
        readers asked at once)."""
        self.repairs = 0
        """Blobs the slow store had lost and got back from the fast one."""

    def wrapped(self) -> Storage:
        return self.fast

    async def start(self) -> None:
        await self.fast.start()
        await self.slow.start()
        if self.write_behind:
            self._copiers = [
                asyncio.create_task(self._copy_queued()) for _ in range(self.copy_concurrency)
            ]

    async def stop(self) -> None:
        if self._copiers:
            with anyio.move_on_after(10):  # what is left stays in the fast store (see above)
                await self._queue.join()
            for task in self._copiers:
                task.cancel()
            for task in self._copiers:
                with suppress(asyncio.CancelledError):
                    await task
            self._copiers = []
        for fill in list(self._fills.values()):
            fill.cancel()
        await self.slow.stop()
        await self.fast.stop()

    # -- what exists ---------------------------------------------------------------------------

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        mask = await self.slow.find_missing(ctx, batch)
        absent = [p for p, missing in enumerate(mask) if missing]
        if not absent:
            return mask
        digests = batch.digests
        part = DigestBatch.of(batch.function, [digests[p] for p in absent])
        in_fast = await self.fast.find_missing(ctx, part)
        lost = [p for p, missing in zip(absent, in_fast, strict=True) if not missing]
        if not lost:
            return mask
        answer = bytearray(mask)
        limiter = anyio.CapacityLimiter(self.copy_concurrency)

        async def repair(position: int) -> None:
            async with limiter:
                try:
                    await copy_blob(ctx, self.fast, self.slow, digests[position])
                except CasError as exc:  # stays missing: the client uploads it again
                    logger.warning("could not copy %s back up: %s", digests[position], exc)
                    return
            answer[position] = 0
            self.repairs += 1

        async with anyio.create_task_group() as tasks:
            for position in lost:
                tasks.start_soon(repair, position)
        return bytes(answer)

    # -- reads -------------------------------------------------------------------------------

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        chunks = await _opened(self.fast, ctx, digest, offset, limit)
        if chunks is None:  # fill the fast store, then read from it (or, failing that, slow)
            if await self._filled(ctx, digest):
                chunks = await _opened(self.fast, ctx, digest, offset, limit)
            if chunks is None:
                chunks = await _opened(self.slow, ctx, digest, offset, limit)
            if chunks is None:
                raise BlobNotFound(digest)
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _filled(self, ctx: RequestContext, digest: Digest) -> bool:
        """Copy ``digest`` from the slow store into the fast one, sharing the copy with every
        concurrent reader; False if the fast store would not take it (e.g. full). Raises
        BlobNotFound if the slow store lacks it too."""
        key = (ctx.instance_name, digest)
        fill = self._fills.get(key)
        if fill is None:
            # The copy outlives the reader that started it (others may wait on it), so it
            # carries no deadline of that reader's.
            detached = dataclasses.replace(ctx, deadline=None)
            fill = asyncio.create_task(self._fill(detached, digest))
            self._fills[key] = fill
            fill.add_done_callback(lambda _: self._fills.pop(key, None))
        return await asyncio.shield(fill)

    async def _fill(self, ctx: RequestContext, digest: Digest) -> bool:
        try:
            await copy_blob(ctx, self.slow, self.fast, digest)
        except BlobNotFound:
            raise
        except DigestMismatch as exc:
            raise BackendUnavailable(f"the slow store sent wrong data for {digest}") from exc
        except CasError as exc:
            logger.warning("could not keep %s in the fast store: %s", digest, exc)
            return False
        self.fills += 1
        return True

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        found = await self.fast.bulk_read(ctx, digests)
        wanted = [d for d in dict.fromkeys(digests) if d not in found]
        if wanted:
            fetched = await self.slow.bulk_read(ctx, wanted)
            if fetched:
                kept = await self.fast.bulk_update(ctx, list(fetched.items()))
                for digest, error in zip(fetched, kept, strict=True):
                    if isinstance(error, DigestMismatch):  # verified on the way in
                        raise BackendUnavailable(f"the slow store sent wrong data for {digest}")
                self.fills += len(fetched)
            found.update(fetched)
        return found

    # -- writes ------------------------------------------------------------------------------

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        if self.write_behind:
            return _QueuingWriter(self, ctx, await self.fast.put(ctx, digest))
        slow = await self.slow.put(ctx, digest)
        try:
            fast: BlobWriter | None = await self.fast.put(ctx, digest)
        except CasError as exc:  # the fast store is a cache: the upload goes on without it
            logger.warning("not keeping %s in the fast store: %s", digest, exc)
            fast = None
        return _BothWriter(digest, slow, fast)

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        if self.write_behind:
            results = await self.fast.bulk_update(ctx, blobs)
            for (digest, _), error in zip(blobs, results, strict=True):
                if error is None:
                    await self._queue_copy(ctx, digest)
            return results
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._keep, ctx, blobs)
            results = await self.slow.bulk_update(ctx, blobs)
        return results

    async def _keep(self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]) -> None:
        try:
            await self.fast.bulk_update(ctx, blobs)
        except CasError as exc:  # the fast store is a cache: the slow one's answer counts
            logger.warning("not keeping %d blobs in the fast store: %s", len(blobs), exc)

    async def _queue_copy(self, ctx: RequestContext, digest: Digest) -> None:
        try:
            self._queue.put_nowait((dataclasses.replace(ctx, deadline=None), digest))
        except asyncio.QueueFull:  # back-pressure: this writer copies its own blob up
            await copy_blob(ctx, self.fast, self.slow, digest)

    async def _copy_queued(self) -> None:
        while True:
            ctx, digest = await self._queue.get()
            try:
                await copy_blob(ctx, self.fast, self.slow, digest)
            except CasError as exc:  # find_missing copies it up later (see the module doc)
                logger.warning("could not copy %s to the slow store: %s", digest, exc)
            finally:
                self._queue.task_done()


async def _opened(
    source: Storage, ctx: RequestContext, digest: Digest, offset: int, limit: int
) -> AsyncGenerator[bytes] | None:
    """``source``'s read of ``digest``, begun: None if ``source`` lacks the blob."""
    chunks = source.get(ctx, digest, offset, limit)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return _prepended(b"", chunks)
    except BlobNotFound:
        return None
    except BaseException:
        await chunks.aclose()
        raise
    return _prepended(first, chunks)


async def _prepended(first: bytes, rest: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
    async with aclosing(rest):
        if first:
            yield first
        async for chunk in rest:
            yield chunk


class _BothWriter(BlobWriter):
    """Writes each piece to the slow store's writer and, while it keeps up, the fast one's:
    the fast store is a cache, so its failures drop it from this upload and nothing more."""

    def __init__(self, digest: Digest, slow: BlobWriter, fast: BlobWriter | None) -> None:
        super().__init__(digest)
        self._slow = slow
        self._fast = fast

    async def write(self, data: bytes) -> None:
        # No gathering here: each writer below gathers for itself.
        if self.committed_size + len(data) > self.digest.size_bytes:
            raise DigestMismatch(
                f"received more than the {self.digest.size_bytes} bytes of digest {self.digest}"
            )
        self.committed_size += len(data)
        await self._slow.write(data)
        if self._fast is not None:
            try:
                await self._fast.write(data)
            except CasError as exc:
                await self._drop_fast(exc)

    async def _drop_fast(self, error: CasError) -> None:
        assert self._fast is not None
        logger.warning("not keeping %s in the fast store: %s", self.digest, error)
        fast, self._fast = self._fast, None
        await fast.abort()

    async def flush(self) -> None:
        await self._slow.flush()
        if self._fast is not None:
            await self._fast.flush()

    async def verify(self) -> None:
        self.check_size()
        # Each writer checks the hash itself, side by side; the slow one also finishes its
        # upload here. The slow store's failure is the one that counts.
        if self._fast is None:
            await self._slow.verify()
        else:
            outcomes = await asyncio.gather(
                self._slow.verify(), self._verify_fast(), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        self._verified = True

    async def _verify_fast(self) -> None:
        assert self._fast is not None
        try:
            await self._fast.verify()
        except DigestMismatch:
            raise
        except CasError as exc:
            await self._drop_fast(exc)

    async def _write(self, parts: list[bytes]) -> None:
        raise AssertionError("write() hands data on directly")

    async def _publish(self) -> None:
        await self._slow.publish()
        if self._fast is not None:
            try:
                await self._fast.publish()
            except CasError as exc:
                await self._drop_fast(exc)

    async def _abort(self) -> None:
        await self._slow.abort()
        if self._fast is not None:
            await self._fast.abort()


class _QueuingWriter(BlobWriter):
    """The fast store's writer; once its blob is published, the copy up is queued."""

    def __init__(self, owner: WithCacheStorage, ctx: RequestContext, fast: BlobWriter) -> None:
        super().__init__(fast.digest)
        self._owner = owner
        self._ctx = ctx
        self._fast = fast

    async def write(self, data: bytes) -> None:
        await self._fast.write(data)
        self.committed_size = self._fast.committed_size

    async def flush(self) -> None:
        await self._fast.flush()

    async def verify(self) -> None:
        await self._fast.verify()
        self._verified = True

    async def _write(self, parts: list[bytes]) -> None:
        raise AssertionError("write() hands data on directly")

    async def _publish(self) -> None:
        await self._fast.publish()
        await self._owner._queue_copy(self._ctx, self.digest)

    async def _abort(self) -> None:
        await self._fast.abort()
