"""Conformance checks any Storage (or StorageIndex) must pass, in the spirit of trio's
``check_one_way_stream``. Backends, indexes and wrappers run them in their own tests::

    async with MyStorage(...) as storage:
        await check_storage(storage)
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Final, cast

import anyio
import anyio.lowlevel

from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import BlobNotFound, DigestMismatch
from asynccas.index.base import StorageIndex
from asynccas.storage.base import (
    CHUNK_SIZE,
    Deletable,
    Listable,
    Storage,
    contains,
    deletion_marker,
    missing_digests,
    put_chunks,
)
from asynccas.storage.context import RequestContext


def blob(size: int, seed: int = 0) -> tuple[Digest, bytes]:
    """A blob of pseudo-random bytes (distinct per seed) and its digest."""
    data = (seed.to_bytes(8, "big") + os.urandom(max(0, size - 8)))[:size] if size else b""
    return Digest.of(data), data


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _read(storage: Storage, digest: Digest, offset: int = 0, limit: int = 0) -> list[bytes]:
    async with aclosing(storage.get(CTX, digest, offset, limit)) as chunks:
        return [chunk async for chunk in chunks]


CTX: Final = RequestContext(instance_name="conformance")


async def _has(storage: Storage, digest: Digest) -> bool:
    return await contains(storage, CTX, digest)


async def _missing(storage: Storage, digests: list[Digest]) -> list[Digest]:
    return await missing_digests(storage, CTX, digests)


async def _put(storage: Storage, digest: Digest, data: bytes, chunk_size: int = 64 * 1024) -> None:
    await put_chunks(storage, CTX, digest, _chunks(data, chunk_size))


async def _delete(storage: Storage, digests: list[Digest]) -> list[Digest] | None:
    """Delete where the storage can (None where it cannot)."""
    if not storage.offers(Deletable):
        return None
    return await cast(Deletable, storage).delete(digests)


async def check_storage(storage: Storage, *, peer_quirks: bool = False) -> None:
    """Exercise the whole Storage contract (and each optional capability the storage offers);
    raises AssertionError naming what broke.

    ``peer_quirks``: for a storage that forwards to another server which keys blobs by hash
    alone (a same-hash digest of another size counts as present) and knows only SHA256
    (BuildGrid 0.4.4): those checks are left out, the rest is the same."""
    absent, _ = blob(100, 1)
    assert not await _has(storage, absent), "absent blob reported present"
    assert await _missing(storage, [absent, absent]) == [absent], "missing digests must dedupe"
    try:
        await _read(storage, absent)
    except BlobNotFound:
        pass
    else:
        raise AssertionError("reading an absent blob must raise BlobNotFound")

    # Streamed write of a multi-chunk blob, then reads with offsets and limits.
    digest, data = blob(2 * CHUNK_SIZE + 12345, 2)
    await _put(storage, digest, data)
    assert await _has(storage, digest), "committed blob not found"
    assert await _missing(storage, [digest, absent]) == [absent]
    batch = DigestBatch.of(DigestFunction.SHA256, [absent, digest, absent, digest])
    assert await storage.find_missing(CTX, batch) == bytes([1, 0, 0, 0]), (
        "find_missing must flag each absent digest once, at its first position"
    )
    distinct = [digest, absent] + (
        [] if peer_quirks else [Digest(absent.hash, absent.size_bytes + 1)]
    )
    as_requests_carry_them = DigestBatch.of_delimited(
        DigestFunction.SHA256, [d.delimited for d in distinct], "\n".join(d.hash for d in distinct)
    )
    for batch in (DigestBatch.of(DigestFunction.SHA256, distinct), as_requests_carry_them):
        answer = await storage.find_missing(CTX, batch)
        assert answer == bytes([0, 1, 1][: len(distinct)]), f"find_missing misread: {answer!r}"
    empty_batch = DigestBatch(DigestFunction.SHA256, [], [])
    assert await storage.find_missing(CTX, empty_batch) == b""
    chunks = await _read(storage, digest)
    assert b"".join(chunks) == data, "read back different bytes"
    assert all(len(c) <= CHUNK_SIZE for c in chunks), "a read chunk exceeded CHUNK_SIZE"
    assert b"".join(await _read(storage, digest, 1000, 5000)) == data[1000:6000]
    assert b"".join(await _read(storage, digest, len(data) - 10)) == data[-10:]
    assert b"".join(await _read(storage, digest, len(data))) == b""
    assert b"".join(await _read(storage, digest, 5, 10**12)) == data[5:]

    # The size is part of the identity.
    wrong_size = Digest(digest.hash, digest.size_bytes + 1)
    if not peer_quirks:
        assert not await _has(storage, wrong_size), "same hash with another size is another blob"

    # Wrong data never becomes visible.
    bad, bad_data = blob(5000, 3)
    flipped = bad_data[:-1] + bytes([bad_data[-1] ^ 1])  # always differs from the original
    for corrupt in (flipped, bad_data[:-1], bad_data + b"x"):
        try:
            await _put(storage, bad, corrupt, 1000)
        except DigestMismatch:
            pass
        else:
            raise AssertionError("a mismatching upload was accepted")
    assert not await _has(storage, bad), "a mismatching upload became visible"

    # An aborted writer leaves nothing behind.
    writer = await storage.put(CTX, bad)
    await writer.write(bad_data[:100])
    await writer.abort()
    await writer.abort()
    assert not await _has(storage, bad), "an aborted upload became visible"

    # Batches answer per blob.
    good = [blob(1000 + i, 10 + i) for i in range(5)]
    mismatch_digest, _ = blob(50, 20)
    results = await storage.bulk_update(CTX, [*good, (mismatch_digest, b"not it")])
    assert results[:5] == [None] * 5, f"good blobs failed: {results[:5]}"
    assert isinstance(results[5], DigestMismatch), "bad blob in a batch was not rejected"
    assert not await _has(storage, mismatch_digest)
    found = await storage.bulk_read(CTX, [d for d, _ in good] + [absent])
    assert found == dict(good), "bulk_read returned wrong blobs"

    # Concurrent writes of one digest all succeed and leave one readable copy.
    shared, shared_data = blob(300_000, 30)
    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(_put, storage, shared, shared_data, 50_000)
    assert b"".join(await _read(storage, shared)) == shared_data

    # Deleting, where the storage can.
    if storage.offers(Deletable):
        marker = await deletion_marker(storage)
        assert await _delete(storage, [shared]) == [shared]
        assert not await _has(storage, shared)
        assert await _delete(storage, [shared]) == [], "deleting twice reported success"
        if marker is not None:
            assert await deletion_marker(storage) != marker, "a deletion left the marker as it was"
        deleted = await _delete(storage, [d for d, _ in good] + [absent])
        assert set(deleted or []) == {d for d, _ in good}, "delete reported the wrong digests"
        assert await _missing(storage, [d for d, _ in good]) == [d for d, _ in good]

    # Listing, where the storage can: every stored blob is listed.
    if storage.offers(Listable):
        listed = {d async for d, _ in cast(Listable, storage).list_blobs()}
        assert digest in listed, "a stored blob was not listed"

    if peer_quirks:
        return
    # Other digest functions live side by side.
    sha1 = Digest.of(b"sha1 blob", DigestFunction.SHA1)
    await _put(storage, sha1, b"sha1 blob")
    assert b"".join(await _read(storage, sha1)) == b"sha1 blob"
    await _delete(storage, [digest, sha1])
    await check_blake3(storage)


async def check_blake3(storage: Storage) -> None:
    """BLAKE3 blobs, streamed and batched; and a BLAKE3 digest with the same 64 hex
    characters as a stored SHA256 blob is another, absent blob (and the other way round)."""
    data = os.urandom(2 * CHUNK_SIZE + 77)
    streamed = Digest.of(data, DigestFunction.BLAKE3)
    await _put(storage, streamed, data)
    assert b"".join(await _read(storage, streamed)) == data, "a BLAKE3 blob read back wrong"
    small = [(Digest.of(b"b3 %d" % i, DigestFunction.BLAKE3), b"b3 %d" % i) for i in range(3)]
    assert await storage.bulk_update(CTX, small) == [None] * 3
    assert await storage.bulk_read(CTX, [d for d, _ in small]) == dict(small)
    wrong = Digest(Digest.of(b"other").hash, 5, DigestFunction.BLAKE3)
    assert isinstance((await storage.bulk_update(CTX, [(wrong, b"wrong")]))[0], DigestMismatch)

    sha256 = Digest.of(b"same hex")
    await _put(storage, sha256, b"same hex")
    twins = [
        (sha256, Digest(sha256.hash, sha256.size_bytes, DigestFunction.BLAKE3)),
        (streamed, Digest(streamed.hash, streamed.size_bytes, DigestFunction.SHA256)),
    ]
    for stored, twin in twins:
        assert twin != stored
        assert not await _has(storage, twin), f"{twin!r} was taken for {stored!r}"
        assert await _missing(storage, [stored, twin]) == [twin]
        batch = DigestBatch.of(twin.function, [twin])
        assert await storage.find_missing(CTX, batch) == b"\x01", "find_missing mixed up functions"
        assert await storage.bulk_read(CTX, [twin]) == {}
        try:
            await _read(storage, twin)
        except BlobNotFound:
            pass
        else:
            raise AssertionError(f"read {twin!r} as {stored!r}")
    await _delete(storage, [streamed, sha256, *(d for d, _ in small)])


async def check_index(index: StorageIndex) -> None:
    """check_storage plus the index contract: exact total size, LRU order, delete_n_bytes."""
    await check_storage(index)
    assert await index.get_total_size() == 0, "total size is not zero after deleting everything"

    blobs = [blob(1000 * (i + 1), 100 + i) for i in range(6)]
    for digest, data in blobs:
        await index.commit_write(digest, _chunks(data))
    await index.commit_write(blobs[0][0], _chunks(blobs[0][1]))  # re-writes do not double-count
    expected_total = sum(len(d) for _, d in blobs)
    assert await index.get_total_size() == expected_total, "total size drifted"

    order = [d async for d, _ in index.least_recent_digests()]
    assert set(order) == {d for d, _ in blobs}, "least_recent_digests lost or invented blobs"

    would_free = await index.delete_n_bytes(1, dry_run=True)
    assert would_free > 0, "dry run found nothing to free"
    assert await index.get_total_size() == expected_total, "dry run deleted"

    future = datetime.now(UTC) + timedelta(hours=1)
    past = datetime.now(UTC) - timedelta(hours=1)
    assert await index.delete_n_bytes(10**9, protect_blobs_after=past) == 0, "protected blobs went"

    # Large blobs past their lifetime go before smaller, older blobs.
    largest, _ = blobs[-1]
    freed = await index.delete_n_bytes(
        1, large_blob_threshold=5500, large_blob_lifetime=future, protect_blobs_after=future
    )
    assert freed == largest.size_bytes, f"expected the large blob to go first, freed {freed}"
    assert not await index.has_blob(largest)

    freed = await index.delete_n_bytes(expected_total)
    assert freed == expected_total - largest.size_bytes, "delete_n_bytes freed the wrong amount"
    assert await index.get_total_size() == 0
    assert await index.missing_blobs([d for d, _ in blobs]) == [d for d, _ in blobs]


async def check_index_concurrency(first: StorageIndex, second: StorageIndex) -> None:
    """Two indexes over the same metadata and blobs (as two server processes would be):
    concurrent writes, re-writes, deletes and evictions leave an exact total size and no
    blob indexed but missing from storage."""
    blobs = [blob(1000 + 37 * i, 5000 + i) for i in range(40)]
    rng = random.Random(3)

    async def churn(index: StorageIndex) -> None:
        for _ in range(150):
            digest, data = rng.choice(blobs)
            action = rng.random()
            if action < 0.5:
                await index.commit_write(digest, _chunks(data))
            elif action < 0.7:
                await index.bulk_update_blobs([(digest, data), rng.choice(blobs)])
            elif action < 0.9:
                await index.delete_blob(digest)
            else:
                await index.delete_n_bytes(3000)

    async with anyio.create_task_group() as tasks:
        for index in (first, second, first, second):
            tasks.start_soon(churn, index)
    present = [d for d, _ in blobs if await first.has_blob(d)]
    assert await first.get_total_size() == sum(d.size_bytes for d in present), "total drifted"
    assert await second.get_total_size() == await first.get_total_size()
    assert await missing_digests(first.storage, CTX, present) == [], "indexed but missing"


async def check_eviction_racing_uploads(writer: StorageIndex, evictor: StorageIndex) -> None:
    """Re-uploads racing evictions (from another process) never leave a blob indexed but
    missing, and the total size stays exact."""
    blobs = [blob(4096, 6000 + i) for i in range(30)]

    async def keep_uploading() -> None:
        for _ in range(10):
            await writer.bulk_update_blobs(blobs)

    async def keep_evicting() -> None:
        for _ in range(40):
            await evictor.delete_n_bytes(10**9)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(keep_uploading)
        tasks.start_soon(keep_evicting)
    indexed = [d for d, _ in blobs if await writer.has_blob(d)]
    assert await missing_digests(writer.storage, CTX, indexed) == [], "indexed but missing"
    assert await writer.get_total_size() == sum(d.size_bytes for d in indexed), "total drifted"
