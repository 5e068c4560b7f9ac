"""SplitBlob and SpliceBlob (REAPI 2.12): a large blob as content-defined chunks, so that a
client moves only the chunks the other side lacks.

Split reads the blob once, cuts it with FastCDC as it streams, and stores the chunks the CAS
lacks (asking FindMissingBlobs for the others extends their lifetimes, as the API wants)
before answering. It keeps the chunk list (``SplitCache``): splitting the same blob again
asks only whether its chunks are all still stored. Splice streams the named chunks, in order,
into one upload of the blob, whose writer checks the result against the blob's digest: the
client's digest is never trusted, and nothing is stored when it is wrong. Neither holds more
than a few megabytes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from asynccas.chunking import FastCdcParams, chunks_of
from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BlobNotFound, DigestMismatch, NotFound
from asynccas.hashing import THREAD_THRESHOLD
from asynccas.lru import SizedLru
from asynccas.storage.base import Storage, contains, missing_digests, put_chunks
from asynccas.storage.context import RequestContext
from asynccas.threads import in_thread

STORE_BATCH_BYTES = 8 * 1024 * 1024
"""Chunks are stored in batches of about this many bytes (one bulk_update each)."""


SPLIT_CACHE_CHUNKS = 100_000
"""Chunk digests kept in a ``SplitCache`` (about 200 bytes of memory each)."""

SplitCache = SizedLru[Digest, list[Digest]]
"""The chunk lists of blobs split before, bounded by their number of chunks. Content is
immutable, so a list never goes stale; its chunks can only go missing, which ``split_blob``
asks about before answering from here. A list serves every instance: FastCDC's cuts depend
only on the content and the server's parameters."""


async def split_blob(
    storage: Storage,
    ctx: RequestContext,
    digest: Digest,
    params: FastCdcParams,
    cache: SplitCache | None = None,
) -> list[Digest]:
    """The digests of ``digest``'s chunks, in order, every chunk stored. With ``cache``, a
    blob split before costs one existence query of its chunks, not a read of the blob."""
    if digest.is_empty:
        return []
    if not await contains(storage, ctx, digest):  # also extends the blob's lifetime
        raise BlobNotFound(digest)
    if cache is not None and (known := cache.get(digest)) is not None:
        # Asking also extends the chunks' lifetimes, as a split must.
        if not await missing_digests(storage, ctx, known):
            return known
        cache.pop(digest)  # a chunk went away (or is not this instance's): split again
    chunk_digests = await _split(storage, ctx, digest, params)
    if cache is not None:
        cache.add(digest, chunk_digests)
    return chunk_digests


async def _split(
    storage: Storage, ctx: RequestContext, digest: Digest, params: FastCdcParams
) -> list[Digest]:
    chunk_digests: list[Digest] = []
    batch: list[tuple[Digest, bytes]] = []
    batch_bytes = 0
    async with aclosing(chunks_of(_blob(storage, ctx, digest), params)) as chunks:
        async for chunk in chunks:
            chunk_digest = await _digest_of(chunk, digest)
            chunk_digests.append(chunk_digest)
            batch.append((chunk_digest, chunk))
            batch_bytes += len(chunk)
            if batch_bytes >= STORE_BATCH_BYTES:
                await _store(storage, ctx, batch)
                batch, batch_bytes = [], 0
    await _store(storage, ctx, batch)
    return chunk_digests


async def _blob(storage: Storage, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes]:
    async with aclosing(storage.get(ctx, digest)) as chunks:
        async for chunk in chunks:
            yield chunk


async def _digest_of(chunk: bytes, like: Digest) -> Digest:
    if len(chunk) >= THREAD_THRESHOLD:
        return await in_thread(Digest.of, chunk, like.function)
    return Digest.of(chunk, like.function)


async def _store(storage: Storage, ctx: RequestContext, chunks: list[tuple[Digest, bytes]]) -> None:
    """Store the chunks the CAS lacks; asking about the others extends their lifetimes."""
    if not chunks:
        return
    missing = set(await missing_digests(storage, ctx, [d for d, _ in chunks]))
    wanted = list({d: data for d, data in chunks if d in missing}.items())
    for error in await storage.bulk_update(ctx, wanted):
        if error is not None:
            raise error


async def splice_blob(
    storage: Storage, ctx: RequestContext, digest: Digest, chunk_digests: Sequence[Digest]
) -> None:
    """Store ``digest`` made of ``chunk_digests`` in order, verified against ``digest``."""
    total = sum(d.size_bytes for d in chunk_digests)
    if total != digest.size_bytes:
        raise DigestMismatch(
            f"the {len(chunk_digests)} chunks add up to {total} bytes, not the"
            f" {digest.size_bytes} of {digest}"
        )
    if digest.is_empty or await contains(storage, ctx, digest):
        return  # already stored: a no-op, as the API allows
    functions = {d.function for d in chunk_digests}
    if chunk_digests and functions != {digest.function}:
        raise DigestMismatch(f"chunks of {digest} must use its digest function")
    batch = DigestBatch.of(digest.function, list(chunk_digests))
    mask = await storage.find_missing(ctx, batch)
    absent = [
        d for d, missing in zip(chunk_digests, mask, strict=True) if missing and not d.is_empty
    ]
    if absent:
        raise NotFound(f"{len(absent)} chunk(s) of {digest} are not in the CAS, e.g. {absent[0]}")
    try:
        await put_chunks(storage, ctx, digest, _concatenated(storage, ctx, chunk_digests))
    except BlobNotFound as exc:  # evicted since the check above
        raise NotFound(f"chunk {exc.digest} of {digest} is not in the CAS") from None
    except DigestMismatch as exc:
        raise DigestMismatch(f"the chunks do not make {digest}: {exc}") from None


async def _concatenated(
    storage: Storage, ctx: RequestContext, chunk_digests: Sequence[Digest]
) -> AsyncGenerator[bytes]:
    for chunk_digest in chunk_digests:
        if chunk_digest.is_empty:
            continue
        async with aclosing(storage.get(ctx, chunk_digest)) as pieces:
            async for piece in pieces:
                yield piece
