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
from contextlib import AbstractContextManager, aclosing, nullcontext
from itertools import compress
from types import TracebackType
from typing import Final, Self, cast

import anyio

from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import BlobNotFound, CasError, ConfigurationError, DigestMismatch
from asynccas.storage.context import RequestContext

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
    verifies_in_memory: bool = False
    """True when ``verify_in_thread`` only hashes data in memory (no file, no fsync), so it
    may run on the event loop for a blob small enough to take a tier of small blobs."""

    @abc.abstractmethod
    def check_size(self) -> None: ...

    @abc.abstractmethod
    def take_pending(self) -> list[bytes]: ...

    @abc.abstractmethod
    def publish_lock(self) -> asyncio.Lock | None:
        """A lock to hold around the hop that calls ``publish_in_thread``, if it needs one."""

    @abc.abstractmethod
    def verify_in_thread(self, tail: list[bytes]) -> None:
        """``verify``, given the writer's pending data, in the calling thread (a worker
        thread, or the event loop's when ``verifies_in_memory``)."""

    @abc.abstractmethod
    def publish_in_thread(self) -> Callable[[], None] | None:
        """Publish and release the temporary data; return how to take the blob back out if
        this call stored it (None if it was stored already)."""

    def publishing_together(self) -> AbstractContextManager[None]:
        """Entered (in the worker thread) around the ``publish_in_thread`` calls of all the
        writers that share this one's ``publish_lock``: a store that publishes into a database
        of its own makes them one transaction there (one commit, one fsync), which commits
        before the index's does."""
        return nullcontext()


class Storage(abc.ABC):
    """The core protocol: what every backend, index and wrapper offers.

    Five calls, each with the caller's ``RequestContext``: ``find_missing`` (a batch),
    ``get`` (streamed, with offset and limit), ``put`` (a streamed writer that verifies before
    the blob becomes visible), ``bulk_read`` and ``bulk_update`` (many small blobs). What only
    some backends can do is an optional capability (``Stageable``, ``Deletable``, ``Listable``,
    ``DeletionMarked``); ask ``offers`` before using one, since a wrapper offers a capability
    only when what it wraps does.
    """

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

    def offers(self, capability: type) -> bool:
        """Whether this storage can do what the optional ``capability`` (e.g. ``Deletable``)
        describes. Wrappers answer for what they wrap too."""
        return isinstance(self, capability)

    def wrapped(self) -> Storage | None:
        """For a wrapper, the storage below it that holds this server's own copies (a read
        cache's inner storage, a proxy's local cache): where eviction and metrics look for
        an index. None for a backend, or a wrapper over several equal storages."""
        return None

    def why_not(self, capability: type) -> str:
        """Why ``offers(capability)`` is False, for a configuration error."""
        return f"{type(self).__name__} does not"

    @abc.abstractmethod
    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        """One byte per digest of ``batch``, in order: 1 where the blob is absent (at its first
        position only, when a digest repeats), 0 elsewhere. A mask rather than a list, so that
        a large request is answered without a ``Digest`` per entry where a backend can work on
        the batch's columns (``mask_of`` builds one from a list of missing digests)."""

    @abc.abstractmethod
    def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        """Stream ``limit`` bytes (0: all) from ``offset`` in chunks of at most CHUNK_SIZE.

        Raises BlobNotFound on the first iteration if the blob is absent. Callers
        keep 0 <= offset <= size; the service layer turns other offsets into OUT_OF_RANGE.
        """

    def get_zstd(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes] | None:
        """The whole blob as one zstd frame, straight from where it is kept compressed (a
        compressed read then costs no compression work), or None where it is not kept so.
        Like ``get``, the stream raises BlobNotFound on its first iteration."""
        return None

    @abc.abstractmethod
    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        """A writer for one upload of ``digest`` (see ``BlobWriter``; ``put_chunks`` feeds one
        from an async iterable)."""

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        """Read many small blobs whole; absent ones are left out of the result."""
        found: dict[Digest, bytes] = {}
        for digest in dict.fromkeys(digests):
            try:
                found[digest] = await read_all(self, ctx, digest)
            except BlobNotFound:
                continue
        return found

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        """Store many small blobs; the result holds one error (or None) per input, in order."""
        staged = await stage(self, ctx, blobs)
        writers = [w for w in staged if isinstance(w, BlobWriter)]
        try:
            await publish_staged(self, writers)
        finally:
            with anyio.CancelScope(shield=True):
                await release_staged(self, writers)  # temp data goes; published blobs stay
        return [w if isinstance(w, CasError) else None for w in staged]


class Stageable(abc.ABC):
    """Batches written and verified first, published together later: what lets an index make
    a whole BatchUpdateBlobs visible in one transaction. Storages without it are staged through
    ``put`` writers (``stage``)."""

    @abc.abstractmethod
    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        """Write and verify small blobs without publishing them; errors are per blob."""

    @abc.abstractmethod
    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        """Publish writers from ``stage`` (all at once where the backend can)."""

    @abc.abstractmethod
    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        """Release the temporary data of writers from ``stage`` (published blobs stay)."""


class Deletable(abc.ABC):
    """Blobs can be removed (eviction, ``asynccas`` tools). A remote CAS cannot."""

    @abc.abstractmethod
    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        """Remove blobs; returns those that were there and are now gone, each once."""


class Listable(abc.ABC):
    """Every stored blob can be listed, to rebuild an index from what storage holds."""

    @abc.abstractmethod
    def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        """Every stored blob with a time it was last written or used."""


class DeletionMarked(abc.ABC):
    """A cheap way to learn that nothing was deleted since a moment, which lets a caller that
    saw blobs present rely on them without asking again (GetTree's cache)."""

    @abc.abstractmethod
    async def deletion_marker(self) -> int | None:
        """A number that changes whenever any blob is deleted or evicted (by any process
        sharing this storage), or None if it cannot tell at the moment."""


async def deletion_marker(storage: Storage) -> int | None:
    """The storage's deletion marker, or None if it offers none."""
    if storage.offers(DeletionMarked):
        return await cast(DeletionMarked, storage).deletion_marker()
    return None


def require(storage: Storage, capability: type, purpose: str) -> None:
    """Refuse, at configuration time, to build something on a storage that lacks what it
    needs: one clear error instead of a failure on some later request."""
    if not storage.offers(capability):
        raise ConfigurationError(
            f"{purpose} needs a storage that offers {capability.__name__};"
            f" {storage.why_not(capability)}"
        )


def mask_of(batch: DigestBatch, missing: Iterable[Digest]) -> bytes:
    """The ``find_missing`` mask of ``batch`` given the set of its absent digests."""
    absent = set(missing)
    mask = bytearray(len(batch))
    for position, digest in enumerate(batch.digests):
        if digest in absent:
            mask[position] = 1
            absent.discard(digest)
    return bytes(mask)


async def missing_digests(
    storage: Storage, ctx: RequestContext, digests: Iterable[Digest]
) -> list[Digest]:
    """The given digests that are absent, each once, in first-seen order (any functions)."""
    unique = list(dict.fromkeys(digests))
    by_function: dict[DigestFunction, list[Digest]] = {}
    for digest in unique:
        by_function.setdefault(digest.function, []).append(digest)
    missing: set[Digest] = set()
    for function, group in by_function.items():
        mask = await storage.find_missing(ctx, DigestBatch.of(function, group))
        missing.update(compress(group, mask))
    return [d for d in unique if d in missing]


async def contains(storage: Storage, ctx: RequestContext, digest: Digest) -> bool:
    return not (await storage.find_missing(ctx, DigestBatch.of(digest.function, [digest])))[0]


async def put_chunks(
    storage: Storage, ctx: RequestContext, digest: Digest, chunks: AsyncIterable[bytes]
) -> None:
    """Store a blob fed as chunks; raise DigestMismatch (storing nothing) if it is wrong."""
    writer = await storage.put(ctx, digest)
    try:
        async for chunk in chunks:
            await writer.write(chunk)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await writer.abort()
        raise
    await writer.commit()


async def copy_blob(ctx: RequestContext, source: Storage, target: Storage, digest: Digest) -> None:
    """Stream ``digest`` from ``source`` into ``target``, verified on the way in."""
    async with aclosing(source.get(ctx, digest)) as chunks:
        await put_chunks(target, ctx, digest, chunks)


async def opened(
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


async def read_all(storage: Storage, ctx: RequestContext, digest: Digest) -> bytes:
    """A whole blob in memory: only for blobs known to be small (batch RPCs, Directory protos)."""
    parts = []
    async with aclosing(storage.get(ctx, digest)) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
    return b"".join(parts)


async def stage(
    storage: Storage, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
) -> list[BlobWriter | CasError]:
    """``Stageable.stage`` where offered, else each blob through a ``put`` writer, verified
    but not published."""
    if storage.offers(Stageable):
        return await cast(Stageable, storage).stage(ctx, blobs)
    return await stage_with_writers(storage, ctx, blobs)


async def stage_with_writers(
    storage: Storage, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
) -> list[BlobWriter | CasError]:
    """Each blob through a ``put`` writer, verified but not published (errors per blob)."""
    staged: list[BlobWriter | CasError] = []
    try:
        for digest, data in blobs:
            try:
                writer = await storage.put(ctx, digest)
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


async def publish_staged(storage: Storage, writers: Sequence[BlobWriter]) -> None:
    if storage.offers(Stageable):
        await cast(Stageable, storage).publish_staged(writers)
    else:
        for writer in writers:
            await writer.publish()


async def release_staged(storage: Storage, writers: Sequence[BlobWriter]) -> None:
    if storage.offers(Stageable):
        await cast(Stageable, storage).release_staged(writers)
    else:
        await abort_all(writers)


async def abort_all(staged: Iterable[BlobWriter | CasError]) -> None:
    for writer in staged:
        if isinstance(writer, BlobWriter):
            await writer.abort()
