"""The storage protocol every backend, index and tier implements.

Reads are async iterators of bounded chunks; writes go through a ``BlobWriter``
that hashes while streaming and only makes the blob visible once it verified.
Bulk calls take many digests so that network backends can answer in one trip.
Storages are plain stores: the always-present empty blob is the service
layer's business (see ``asynccas.server.cas``).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Final, Self

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BlobNotFound, CasError, DigestMismatch

CHUNK_SIZE: Final = 1024 * 1024
"""Largest piece of a blob held at once while streaming (well under gRPC's 4 MiB default)."""


class WriteBuffers:
    """A byte budget for the data that open writers hold in memory before writing it out.

    Writers gather a stream's small messages (Bazel sends 16 KiB each) and write them out in
    one go, one thread hop per ``limit_per_writer`` bytes instead of one per message. The
    budget is shared by every writer of the process, so many open uploads cannot add up to
    more than ``total`` bytes: past it a writer writes each message out as it comes.
    """

    def __init__(self, total: int, limit_per_writer: int) -> None:
        self.total = total
        self.limit_per_writer = limit_per_writer
        self.in_use = 0


# A writer gathers up to a chunk: uploads up to 1 MiB (nearly all of a build's) then reach
# the backend in one piece, at their end, in the same thread hop that stores them.
WRITE_BUFFERS: Final = WriteBuffers(total=128 * 1024 * 1024, limit_per_writer=CHUNK_SIZE)


class BlobWriter(abc.ABC):
    """One upload of one digest. ``write`` appends, ``commit`` verifies then publishes.

    ``write`` gathers data in memory (bounded by ``WRITE_BUFFERS``) and hands it to the
    backend's ``_write`` in pieces of up to ``WRITE_BUFFERS.limit_per_writer`` bytes;
    ``flush`` hands over what is gathered, so that a writer kept for later (a parked upload)
    holds bytes on disk rather than in memory.

    Commit is two phases so that an index can do the slow part (``verify``: hash check,
    fsync) outside its lock and only ``publish`` (making the blob visible) inside it.
    ``publish`` is idempotent and the writer keeps its data until ``abort``, so an index
    that lost a race with eviction can publish again. ``abort`` releases the writer's
    temporary data (a published blob stays) and is safe to call at any point, repeatedly.
    """

    def __init__(self, digest: Digest, buffers: WriteBuffers = WRITE_BUFFERS) -> None:
        self.digest = digest
        self.committed_size = 0
        self._hasher = digest.function.new_hasher()
        self._verified = False
        self._buffers = buffers
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def write(self, data: bytes) -> None:
        if self.committed_size + len(data) > self.digest.size_bytes:
            raise DigestMismatch(
                f"received more than the {self.digest.size_bytes} bytes of digest {self.digest}"
            )
        buffers = self._buffers
        self._pending.append(data)
        self._pending_bytes += len(data)
        buffers.in_use += len(data)
        self.committed_size += len(data)
        if self._pending_bytes >= buffers.limit_per_writer or buffers.in_use > buffers.total:
            await self.flush()

    def take_pending(self) -> list[bytes]:
        """The data gathered since the last flush, which the caller now stores."""
        parts, self._pending = self._pending, []
        self._buffers.in_use -= self._pending_bytes
        self._pending_bytes = 0
        return parts

    async def flush(self) -> None:
        """Hand the gathered data to the backend (to disk, for a disk store)."""
        if self._pending:
            await self._write(self.take_pending())

    async def release_memory(self) -> None:
        """Keep no more of the upload in memory than needed (for an upload that waits to be
        resumed): the gathered data goes to the backend, and backends drop their buffers."""
        await self.flush()

    async def verify(self) -> None:
        """Check size and hash, and make the data durable; raise DigestMismatch if wrong."""
        self.check_size()
        await self._finish(self.take_pending())
        self.check_hash()

    def check_size(self) -> None:
        if self.committed_size != self.digest.size_bytes:
            raise DigestMismatch(
                f"received {self.committed_size} bytes, digest {self.digest} says "
                f"{self.digest.size_bytes}"
            )

    def check_hash(self) -> None:
        """Once all data is written: compare its hash with the digest's."""
        actual = self._hasher.hexdigest()
        if actual != self.digest.hash:
            raise DigestMismatch(
                f"data hashes to {actual}, not {self.digest.hash} as its digest says"
            )
        self._verified = True

    async def publish(self) -> None:
        """Make the verified blob visible atomically; a no-op if it is already stored."""
        assert self._verified, "publish() before verify()"
        await self._publish()

    async def commit(self) -> None:
        try:
            await self.verify()
            await self.publish()
        finally:
            with anyio.CancelScope(shield=True):
                await self.abort()

    @abc.abstractmethod
    async def _write(self, parts: list[bytes]) -> None:
        """Store ``parts`` in order and feed them to ``self._hasher``."""

    async def _finish(self, tail: list[bytes]) -> None:
        """Store the last ``tail`` (may be empty) as ``_write`` does, then make the written
        bytes durable before they are published. One call, so that a backend can do both in
        one thread hop."""
        if tail:
            await self._write(tail)

    @abc.abstractmethod
    async def _publish(self) -> None: ...

    async def abort(self) -> None:
        self.take_pending()
        await self._abort()

    @abc.abstractmethod
    async def _abort(self) -> None:
        """Release the backend's temporary data, if any."""


class CommitsInThread(abc.ABC):
    """A writer that can finish and publish from a worker thread, so that an index can end an
    upload (last data, fsync, hash check, making the blob visible, recording it) in one thread
    hop and one transaction. (An ABC rather than a runtime-checkable Protocol: the check runs
    on every upload, and a Protocol's isinstance cost ~20 us.)"""

    digest: Digest

    @abc.abstractmethod
    def check_size(self) -> None: ...

    @abc.abstractmethod
    def take_pending(self) -> list[bytes]: ...

    @abc.abstractmethod
    def publish_lock(self) -> asyncio.Lock | None:
        """A lock to hold around the hop that calls ``publish_in_thread``, if it needs one."""

    @abc.abstractmethod
    def verify_in_thread(self, tail: list[bytes]) -> None:
        """``verify``, given the writer's pending data, in the calling thread."""

    @abc.abstractmethod
    def publish_in_thread(self) -> Callable[[], None] | None:
        """Publish and release the temporary data; return how to take the blob back out if
        this call stored it (None if it was stored already)."""


class Storage(abc.ABC):
    """A content-addressable blob store. See the module docstring for the contract."""

    async def start(self) -> None:
        """Acquire resources (connections, directories, background tasks)."""

    async def stop(self) -> None:
        """Release what ``start`` acquired."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @abc.abstractmethod
    async def has_blob(self, digest: Digest) -> bool: ...

    async def missing_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        """The given digests that are absent, each once, in first-seen order."""
        return [d for d in dict.fromkeys(digests) if not await self.has_blob(d)]

    async def missing_mask(self, batch: DigestBatch) -> bytes:
        """``missing_blobs`` for a request's batch, as one byte per digest in batch order.

        1 where the digest is absent (at its first position only, when repeated), 0 elsewhere.
        A mask lets large requests be answered without building a ``Digest`` per entry; backends
        that can work on the columns directly override this.
        """
        digests = batch.digests
        missing = set(await self.missing_blobs(digests))
        mask = bytearray(len(digests))
        for position, digest in enumerate(digests):
            if digest in missing:
                mask[position] = 1
                missing.discard(digest)
        return bytes(mask)

    @abc.abstractmethod
    def get_blob(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncGenerator[bytes]:
        """Stream ``limit`` bytes (0: all) from ``offset`` in chunks of at most CHUNK_SIZE.

        Raises BlobNotFound on the first iteration if the blob is absent. Callers
        keep 0 <= offset <= size; the service layer turns other offsets into OUT_OF_RANGE.
        """

    @abc.abstractmethod
    async def open_write(self, digest: Digest) -> BlobWriter: ...

    async def commit_write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """Store a blob fed as chunks; raise DigestMismatch (storing nothing) if it is wrong."""
        writer = await self.open_write(digest)
        try:
            async for chunk in chunks:
                await writer.write(chunk)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writer.abort()
            raise
        await writer.commit()

    async def stage_blobs(
        self, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        """Write and verify small blobs without publishing them; errors are per blob."""
        staged: list[BlobWriter | CasError] = []
        try:
            for digest, data in blobs:
                try:
                    writer = await self.open_write(digest)
                except CasError as exc:  # e.g. StorageFull for this blob alone
                    staged.append(exc)
                    continue
                try:
                    await writer.write(data)
                    await writer.verify()
                except CasError as exc:
                    await writer.abort()
                    staged.append(exc)
                else:
                    staged.append(writer)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await abort_all(staged)
            raise
        return staged

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        """Publish writers from ``stage_blobs``; backends may override to do it in one go."""
        for writer in writers:
            await writer.publish()

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        """Release the temporary data of writers from ``stage_blobs`` (``abort`` each);
        backends may override to do it in one go."""
        await abort_all(writers)

    async def bulk_update_blobs(
        self, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        """Store many small blobs; the result holds one error (or None) per input, in order."""
        staged = await self.stage_blobs(blobs)
        writers = [w for w in staged if isinstance(w, BlobWriter)]
        try:
            await self.publish_staged(writers)
        finally:
            with anyio.CancelScope(shield=True):
                await self.release_staged(writers)  # temp data goes; published blobs stay
        return [w if isinstance(w, CasError) else None for w in staged]

    async def bulk_read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Read many small blobs whole; absent ones are left out of the result."""
        found: dict[Digest, bytes] = {}
        for digest in dict.fromkeys(digests):
            try:
                found[digest] = await read_all(self, digest)
            except BlobNotFound:
                continue
        return found

    @abc.abstractmethod
    async def delete_blob(self, digest: Digest) -> bool:
        """Remove a blob; True if it was there."""

    async def bulk_delete(self, digests: Iterable[Digest]) -> list[Digest]:
        """Remove many blobs; returns those that were there and are now gone."""
        return [d for d in dict.fromkeys(digests) if await self.delete_blob(d)]

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        """Every stored blob with a time it was last written or used, for rebuilding an index.

        Not every backend can list its blobs; those raise NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list its blobs")
        yield  # pragma: no cover  (makes this an async generator)

    async def deletion_marker(self) -> int | None:
        """A number that changes whenever any blob is deleted or evicted (by any process
        sharing this storage), or None if the storage cannot tell.

        Content never changes, so a caller that saw a set of blobs present may rely on them
        while the marker stays the same, without asking again.
        """
        return None


async def abort_all(staged: Iterable[BlobWriter | CasError]) -> None:
    for writer in staged:
        if isinstance(writer, BlobWriter):
            await writer.abort()


async def read_all(storage: Storage, digest: Digest) -> bytes:
    """A whole blob in memory: only for blobs known to be small (batch RPCs, Directory protos)."""
    parts = []
    async with aclosing(storage.get_blob(digest)) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
    return b"".join(parts)
