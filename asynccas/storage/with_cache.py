"""A fast storage in front of a slow one (NativeLink's fast_slow, BuildGrid's with-cache): the
shape of a caching proxy, a local disk in front of a shared or remote CAS.

- The slow storage is the authority on what exists: ``find_missing`` asks it (put an
  existence cache in front of it to make that cheap). A blob it lost but the fast one still
  has is copied back up before the answer, not reported present on the fast copy's word
  (NativeLink PR #633) nor reported missing to a client that would then upload it again.
- Reads try the fast store and only on its miss the slow one, with no existence check before
  either (NativeLink #1999's double round trip). A miss fills the fast store from the slow
  one, verifying as it writes, and readers of a blob being filled wait for that one fill
  rather than starting their own or failing (bazel-remote #318). The reader whose miss began
  the fill gets the blob's chunks as they arrive, not after the whole copy (a 4 GiB blob's
  first byte waited for 4 GiB); if it falls behind the fill by more than a few megabytes it
  lets go and reads the rest from the fast store once the fill is done, so a slow client
  neither holds up the fill nor makes it hold memory.
- Writes go to both, the slow one being the one that must succeed; or, with
  ``write_behind``, to the fast one and then to the slow one from a bounded queue (when the
  queue is full, the writer copies its blob up itself: back-pressure, not loss). Until a
  queued blob reaches the slow store, ``find_missing`` finds it only in the fast one and
  copies it up, so nothing acknowledged depends on the queue surviving a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing, suppress
from typing import Final

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable, BlobNotFound, CasError, DigestMismatch
from asynccas.storage.base import BlobWriter, Storage, copy_blob, opened, put_chunks
from asynccas.storage.context import RequestContext
from asynccas.storage.tee_writer import TeeWriter

logger = logging.getLogger(__name__)

FOLLOW_LIMIT: Final = 4 * 1024 * 1024
"""How far (in bytes) the reader that began a fill may fall behind it before it lets go."""
FOLLOW_BUDGET: Final = 64 * 1024 * 1024
"""Bytes all the readers following fills may hold at once; past it, a miss waits for its
fill as other readers do."""


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
        self._fills: dict[tuple[str, Digest], _Fill] = {}
        self._follow_budget = FOLLOW_BUDGET
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
            fill.task.cancel()
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
        chunks = await opened(self.fast, ctx, digest, offset, limit)
        if chunks is None and offset == 0 and limit == 0:
            chunks = self._read_through(ctx, digest)
        elif chunks is None:  # fill the fast store, then read from it (or, failing that, slow)
            if await self._fill_for(ctx, digest).done():
                chunks = await opened(self.fast, ctx, digest, offset, limit)
            if chunks is None:
                chunks = await opened(self.slow, ctx, digest, offset, limit)
            if chunks is None:
                raise BlobNotFound(digest)
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _read_through(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes]:
        """A whole blob the fast store lacks: the chunks of its fill as they arrive, when this
        reader began the fill, then whatever it has not had yet from the filled fast store
        (from the slow one if the fast store would not take it)."""
        fill = self._fill_for(ctx, digest)
        follower = fill.follow(self)
        position = 0
        try:
            if follower is not None:
                while (chunk := await follower.next()) is not None:
                    yield chunk
                    position += len(chunk)
            filled = await fill.done()
        finally:
            if follower is not None:
                fill.unfollow(self, follower)
        if position == digest.size_bytes:
            return  # every byte went out, and the fill verified them
        rest = await opened(self.fast, ctx, digest, position, 0) if filled else None
        if rest is None:
            rest = await opened(self.slow, ctx, digest, position, 0)
        if rest is None:
            raise BlobNotFound(digest)
        async with aclosing(rest):
            async for chunk in rest:
                yield chunk

    def _fill_for(self, ctx: RequestContext, digest: Digest) -> _Fill:
        """The copy of ``digest`` from the slow store into the fast one under way, or a new
        one, shared by every concurrent reader."""
        key = (ctx.instance_name, digest)
        fill = self._fills.get(key)
        if fill is None:
            fill = _Fill()
            # The copy outlives the reader that started it (others may wait on it), so it
            # carries no deadline of that reader's.
            fill.task = asyncio.create_task(self._fill(ctx.detached(), digest, fill))
            self._fills[key] = fill
            fill.task.add_done_callback(lambda _: self._fills.pop(key, None))
        return fill

    async def _fill(self, ctx: RequestContext, digest: Digest, fill: _Fill) -> bool:
        """Copy ``digest`` into the fast store; False if the fast store would not take it (e.g.
        full). Raises BlobNotFound if the slow store lacks it too."""
        try:
            async with aclosing(self.slow.get(ctx, digest)) as chunks:
                await put_chunks(self.fast, ctx, digest, fill.passing_on(chunks))
        except BlobNotFound:
            raise
        except DigestMismatch as exc:
            raise BackendUnavailable(f"the slow store sent wrong data for {digest}") from exc
        except CasError as exc:
            logger.warning("could not keep %s in the fast store: %s", digest, exc)
            return False
        finally:
            fill.end()
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
            fast = await self.fast.put(ctx, digest)
        except CasError as exc:  # the fast store is a cache: the upload goes on without it
            logger.warning("not keeping %s in the fast store: %s", digest, exc)
            return slow
        # The slow store must take the upload; the fast one, a cache, may drop out of it.
        return TeeWriter(digest, [slow, fast], required=slow)

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
            self._queue.put_nowait((ctx.detached(), digest))
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


class _Fill:
    """One copy of a blob from the slow store into the fast one, and the reader that began
    it, which gets the chunks as they pass (until it falls behind)."""

    task: asyncio.Task[bool]

    def __init__(self) -> None:
        self.follower: _Follower | None = None
        self.begun = False  # a chunk has passed: a reader joining now would miss it

    def follow(self, owner: WithCacheStorage) -> _Follower | None:
        """Follow the fill from its first chunk, if no one does yet and there is room."""
        if self.begun or self.follower is not None or owner._follow_budget < FOLLOW_LIMIT:
            return None
        owner._follow_budget -= FOLLOW_LIMIT
        self.follower = _Follower(FOLLOW_LIMIT)
        return self.follower

    def unfollow(self, owner: WithCacheStorage, follower: _Follower) -> None:
        follower.let_go()
        if self.follower is follower:
            self.follower = None
        owner._follow_budget += FOLLOW_LIMIT

    async def passing_on(self, chunks: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
        async for chunk in chunks:
            self.begun = True
            yield chunk
            # Passed on once the fast store's writer took it: a chunk past the blob's size
            # (a wrong upstream) fails the fill there and never reaches the reader.
            if self.follower is not None:
                self.follower.offer(chunk)

    def end(self) -> None:
        if self.follower is not None:
            self.follower.finish()

    async def done(self) -> bool:
        """The fill's outcome (shielded: a reader that stops waiting does not stop it)."""
        return await asyncio.shield(self.task)


class _Follower:
    """The chunks a fill passed on that its reader has not taken yet, up to ``limit`` bytes;
    past that the reader is let go (and reads the rest once the fill is done)."""

    def __init__(self, limit: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._limit = limit
        self._arrived = asyncio.Event()
        self._over = False

    def offer(self, chunk: bytes) -> None:
        if self._over:
            return
        if self._held + len(chunk) > self._limit:
            self.let_go()
        else:
            self._chunks.append(chunk)
            self._held += len(chunk)
        self._arrived.set()

    def let_go(self) -> None:
        """Drop what is held; the reader reads the rest once the fill is done."""
        self._over = True
        self._chunks.clear()
        self._held = 0
        self._arrived.set()

    def finish(self) -> None:
        """The fill is over: the reader takes what is held, then no more."""
        self._over = True
        self._arrived.set()

    async def next(self) -> bytes | None:
        """The next chunk, or None once the fill is over or has let this reader go."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._held -= len(chunk)
                return chunk
            if self._over:
                return None
            self._arrived.clear()
            await self._arrived.wait()
