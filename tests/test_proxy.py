"""asynccas as a caching proxy: the with-cache and existence-cache wrappers over a real remote
asynccas server, and ``asynccas serve --upstream`` as a process in front of one."""

from __future__ import annotations

import os
import signal
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.client import CasClient
from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable, BlobNotFound, DigestMismatch
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import Storage, contains, missing_digests, put_chunks, read_all
from asynccas.storage.context import NO_CONTEXT, RequestContext
from asynccas.storage.existence_cache import ExistenceCacheStorage
from asynccas.storage.forwarding import ForwardingStorage
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.remote import RemoteStorage
from asynccas.storage.with_cache import FOLLOW_BUDGET, FOLLOW_LIMIT, WithCacheStorage
from asynccas.testing import blob, check_storage
from tests.servers import memory_server
from tests.support.redis_servers import free_port
from tests.test_cli import start, stop
from tests.test_remote_storage import chunks_of

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def upstream_and_remote(**options: object) -> AsyncIterator[tuple[CasServer, RemoteStorage]]:
    async with (
        memory_server() as upstream,
        RemoteStorage(f"grpc://{upstream.target}", **options) as remote,  # type: ignore[arg-type]
    ):
        yield upstream, remote


@pytest.mark.parametrize("write_behind", [False, True], ids=["write-through", "write-behind"])
async def test_a_cache_in_front_of_a_remote_passes_the_conformance_kit(write_behind: bool) -> None:
    async with upstream_and_remote() as (_upstream, remote):
        proxy = WithCacheStorage(MemoryStorage(), remote, write_behind=write_behind)
        async with proxy:
            await check_storage(proxy)


async def test_an_existence_cache_passes_the_conformance_kit() -> None:
    async with upstream_and_remote() as (_, remote), ExistenceCacheStorage(remote) as cached:
        await check_storage(cached)


async def test_the_existence_cache_asks_only_about_blobs_it_does_not_know() -> None:
    present = [blob(100 + i, i) for i in range(50)]
    absent = [blob(5000 + i, 100 + i)[0] for i in range(10)]
    async with upstream_and_remote() as (upstream, remote):
        cached = ExistenceCacheStorage(remote, ttl=60)
        assert await remote.bulk_update(NO_CONTEXT, present) == [None] * 50
        everything = [d for d, _ in present] + absent
        assert await missing_digests(cached, NO_CONTEXT, everything) == absent
        assert remote.calls["FindMissingBlobs"] == 1
        # Known-present blobs are answered from memory; missing ones are asked again.
        assert await missing_digests(cached, NO_CONTEXT, everything) == absent
        assert remote.calls["FindMissingBlobs"] == 2
        assert cached.answered == 50
        assert cached.asked == 60 + 10
        # A repeated absent digest is flagged once, at its first place: its second place's
        # 0 does not make it "present" (it did, before this was tested).
        twice = DigestBatch.of(absent[0].function, [absent[0], absent[0]])
        assert await cached.find_missing(NO_CONTEXT, twice) == b"\x01\x00"
        assert await missing_digests(cached, NO_CONTEXT, [absent[0]]) == [absent[0]]
        asked = remote.calls["FindMissingBlobs"]
        assert await missing_digests(cached, NO_CONTEXT, [d for d, _ in present]) == []
        assert remote.calls["FindMissingBlobs"] == asked, "known blobs went upstream again"
        # Per instance: another instance's question goes upstream.
        other = NO_CONTEXT.__class__(instance_name="other")
        assert await missing_digests(cached, other, [present[0][0]]) == []
        assert remote.calls["FindMissingBlobs"] == asked + 1
        # A blob the upstream lost is forgotten as soon as a read finds it gone.
        assert upstream.storage is not None
        await upstream.storage.delete([present[0][0]])  # type: ignore[attr-defined]
        with pytest.raises(BlobNotFound):
            await read_all(cached, NO_CONTEXT, present[0][0])
        assert await missing_digests(cached, NO_CONTEXT, [present[0][0]]) == [present[0][0]]


async def test_the_existence_cache_knows_what_was_uploaded_through_it() -> None:
    """A build asks about the blobs it just uploaded (its next FindMissingBlobs, the check of
    the action result naming them): no upstream call for those."""
    streamed, batched = blob(300_000, 1), blob(100, 2)
    async with upstream_and_remote() as (_, remote):
        cached = ExistenceCacheStorage(remote)
        await put_chunks(cached, NO_CONTEXT, streamed[0], chunks_of(streamed[1]))
        assert await cached.bulk_update(NO_CONTEXT, [batched]) == [None]
        assert await missing_digests(cached, NO_CONTEXT, [streamed[0], batched[0]]) == []
        assert remote.calls["FindMissingBlobs"] == 0
        # A failed upload is not remembered. (The last byte is flipped: replaced by "?", it
        # was the same byte in 1 run of 256, as blob() is random, and nothing failed.)
        digest, data = blob(5000, 3)
        wrong = data[:-1] + bytes([data[-1] ^ 1])
        with pytest.raises(DigestMismatch):
            await put_chunks(cached, NO_CONTEXT, digest, chunks_of(wrong))
        assert await missing_digests(cached, NO_CONTEXT, [digest]) == [digest]


async def test_the_existence_cache_expires_what_it_knows() -> None:
    digest, data = blob(100)
    async with upstream_and_remote() as (_, remote):
        cached = ExistenceCacheStorage(remote, ttl=0.2)
        await remote.bulk_update(NO_CONTEXT, [(digest, data)])
        batch = DigestBatch.of(digest.function, [digest])
        await cached.find_missing(NO_CONTEXT, batch)
        await cached.find_missing(NO_CONTEXT, batch)
        assert remote.calls["FindMissingBlobs"] == 1
        await anyio.sleep(0.3)
        await cached.find_missing(NO_CONTEXT, batch)
        assert remote.calls["FindMissingBlobs"] == 2


class _NotToBeWalked(OrderedDict[Any, float]):
    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("walked every remembered entry")


async def test_a_delete_forgets_its_blobs_in_every_instance_without_walking_the_cache() -> None:
    """A delete used to walk every remembered entry (up to a million) on the event loop,
    once per eviction batch."""
    blobs = [blob(100 + i, 700 + i) for i in range(20)]
    async with ExistenceCacheStorage(MemoryStorage(), ttl=60) as cached:
        other = NO_CONTEXT.__class__(instance_name="other")
        for ctx in (NO_CONTEXT, other):
            assert await cached.bulk_update(ctx, blobs) == [None] * len(blobs)
        cached._present = _NotToBeWalked(cached._present)
        gone = [blobs[0][0], blobs[1][0]]
        await cached.delete(gone)
        for ctx in (NO_CONTEXT, other):  # the storage below no longer has them: asked again
            assert await missing_digests(cached, ctx, [d for d, _ in blobs]) == gone
        # A server that met more instance names than it tracks walks instead, still right.
        for n in range(10_001):
            cached.remember(f"i{n}", [])
        cached._present = OrderedDict(cached._present)
        await cached.delete([blobs[2][0]])
        assert (NO_CONTEXT.instance_name, blobs[2][0]) not in cached._present
        assert ("other", blobs[2][0]) not in cached._present


async def test_concurrent_reads_of_a_blob_being_fetched_share_one_fetch() -> None:
    """bazel-remote #318: there the second reader of a blob being fetched got a 404."""
    digest, data = blob(5 * 1024 * 1024 + 3, 7)
    async with upstream_and_remote() as (_, remote):
        assert await remote.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        proxy = WithCacheStorage(MemoryStorage(), remote)
        reads: list[bytes] = []

        async def read() -> None:
            reads.append(await read_all(proxy, NO_CONTEXT, digest))

        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(read)
        assert reads == [data] * 20
        assert remote.calls["Read"] == 1, "each reader fetched the blob itself"
        assert proxy.fills == 1
        # Served from the fast store from now on; part of it too.
        assert await read_all(proxy, NO_CONTEXT, digest) == data
        chunks = [c async for c in proxy.get(NO_CONTEXT, digest, 100, 50)]
        assert b"".join(chunks) == data[100:150]
        assert remote.calls["Read"] == 1


class _GatedAfterFirstChunk(ForwardingStorage):
    """The storage below, except that a read stops after its first chunk until ``go`` is set:
    a slow store caught mid-transfer."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.go = anyio.Event()

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        first = True
        async with aclosing(self.inner.get(ctx, digest, offset, limit)) as chunks:
            async for chunk in chunks:
                if not first:
                    await self.go.wait()
                first = False
                yield chunk


async def test_the_reader_that_begins_a_fill_gets_chunks_before_the_fill_ends() -> None:
    """The first byte of a blob the fast store lacked waited for the whole blob to be copied."""
    digest, data = blob(3 * 1024 * 1024 + 5, 11)
    slow = _GatedAfterFirstChunk(MemoryStorage())
    async with WithCacheStorage(MemoryStorage(), slow) as proxy:
        assert await slow.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        async with aclosing(proxy.get(NO_CONTEXT, digest)) as chunks:
            with anyio.fail_after(10):
                first = await anext(chunks)  # the slow store holds back everything else
            assert data.startswith(first)
            assert proxy.fills == 0
            slow.go.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert first + rest == data
        assert proxy.fills == 1
        assert await read_all(proxy.fast, NO_CONTEXT, digest) == data
        assert proxy._follow_budget == FOLLOW_BUDGET


async def test_a_reader_that_falls_behind_a_fill_still_gets_the_whole_blob() -> None:
    digest, data = blob(FOLLOW_LIMIT * 3 + 7, 12)
    async with upstream_and_remote() as (_, remote):
        assert await remote.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        proxy = WithCacheStorage(MemoryStorage(), remote)
        async with proxy, aclosing(proxy.get(NO_CONTEXT, digest)) as chunks:
            first = await anext(chunks)
            with anyio.fail_after(10):  # the fill goes on without waiting for this reader
                while proxy.fills == 0:  # noqa: ASYNC110  (no event to wait on)
                    await anyio.sleep(0.01)
            rest = b"".join([chunk async for chunk in chunks])
            assert first + rest == data
            assert remote.calls["Read"] == 1, "the reader let go should read the fast copy"


class _SendingTooMuch(ForwardingStorage):
    """A slow store that sends a blob's bytes and then some more."""

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        async with aclosing(self.inner.get(ctx, digest, offset, limit)) as chunks:
            async for chunk in chunks:
                yield chunk
        yield b"more than the blob"


async def test_a_reader_following_a_fill_never_gets_more_than_the_blob() -> None:
    digest, data = blob(1024 * 1024 + 9, 14)
    slow = _SendingTooMuch(MemoryStorage())
    async with WithCacheStorage(MemoryStorage(), slow) as proxy:
        assert await slow.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        received = bytearray()

        async def read() -> None:
            async with aclosing(proxy.get(NO_CONTEXT, digest)) as chunks:
                async for chunk in chunks:
                    received.extend(chunk)

        with pytest.raises(BackendUnavailable):
            await read()
        assert len(received) <= digest.size_bytes
        assert not await contains(proxy.fast, NO_CONTEXT, digest)


async def test_a_reader_gone_mid_fill_leaves_the_fill_and_the_budget_whole() -> None:
    digest, data = blob(2 * 1024 * 1024 + 1, 13)
    slow = _GatedAfterFirstChunk(MemoryStorage())
    async with WithCacheStorage(MemoryStorage(), slow) as proxy:
        assert await slow.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        async with aclosing(proxy.get(NO_CONTEXT, digest)) as chunks:
            await anext(chunks)
        assert proxy._follow_budget == FOLLOW_BUDGET
        slow.go.set()
        # A second reader waits for the same fill and reads the fast store's verified copy.
        assert await read_all(proxy, NO_CONTEXT, digest) == data
        assert proxy.fills == 1


async def test_a_blob_the_slow_store_lost_is_copied_back_up_not_reported_present() -> None:
    """NativeLink PR #633: the fast store's copy kept a lost blob 'present' forever."""
    digest, data = blob(200_000, 3)
    async with upstream_and_remote() as (upstream, remote):
        proxy = WithCacheStorage(MemoryStorage(), remote)
        await put_chunks(proxy, NO_CONTEXT, digest, chunks_of(data))
        assert upstream.storage is not None
        await upstream.storage.delete([digest])  # type: ignore[attr-defined]
        assert not await contains(upstream.storage, NO_CONTEXT, digest)
        assert await contains(proxy, NO_CONTEXT, digest)
        assert proxy.repairs == 1
        assert await read_all(upstream.storage, NO_CONTEXT, digest) == data


async def test_write_behind_copies_every_upload_up_even_past_the_queue() -> None:
    blobs = [blob(1000 * (i + 1), i) for i in range(12)]
    async with upstream_and_remote() as (upstream, remote):
        proxy = WithCacheStorage(MemoryStorage(), remote, write_behind=True, queue_size=2)
        async with proxy:
            for digest, data in blobs[:6]:
                await put_chunks(proxy, NO_CONTEXT, digest, chunks_of(data))
            assert await proxy.bulk_update(NO_CONTEXT, blobs[6:]) == [None] * 6
        # stop() drained the queue: every blob reached the slow store.
        assert upstream.storage is not None
        assert await missing_digests(upstream.storage, NO_CONTEXT, [d for d, _ in blobs]) == []


async def test_serve_upstream_is_a_caching_proxy_sharing_the_upstreams_action_cache(
    tmp_path: Path,
) -> None:
    """Two `asynccas serve --upstream` processes in front of one asynccas: what a client
    stores through the first (blobs and an action result) is a hit through the second."""
    digest, data = blob(300_000, 1)
    action = blob(10, 2)[0]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    async with memory_server() as upstream:
        flags = ["--address", "127.0.0.1:0", "--upstream", f"grpc://{upstream.target}"]
        first, target, description = await anyio.to_thread.run_sync(
            start, [*flags, "--data-dir", str(tmp_path / "first")], env
        )
        assert f"the remote CAS grpc://{upstream.target}" in description, description
        try:
            async with CasClient(f"grpc://{target}") as client:
                await client.upload_blobs({digest: data})
                result = re_pb2.ActionResult(exit_code=0)
                result.output_files.add(path="out", digest=digest.to_proto())
                await client.update_action_result(action, result)
        finally:
            await anyio.to_thread.run_sync(stop, first, signal.SIGTERM)
        assert upstream.storage is not None
        assert await contains(upstream.storage, NO_CONTEXT, digest)

        second, target, _ = await anyio.to_thread.run_sync(
            start, [*flags, "--data-dir", str(tmp_path / "second")], env
        )
        try:
            async with CasClient(f"grpc://{target}") as client:
                cached = await client.get_action_result(action)
                assert cached is not None
                assert cached.output_files[0].path == "out"
                assert await client.download_blobs([digest]) == {digest: data}
        finally:
            await anyio.to_thread.run_sync(stop, second, signal.SIGTERM)
    # The second proxy kept its own copy, on its disk.
    assert any((tmp_path / "second").rglob(digest.hash))


async def test_a_client_of_the_proxy_sees_no_error_while_the_upstream_restarts(
    tmp_path: Path,
) -> None:
    """The upstream stops and comes back on its port in the middle of a run; a client of the
    proxy that never retries by itself (one attempt per call) sees every call succeed."""
    storage = MemoryStorage()
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    blobs = [blob(20_000 + i, i) for i in range(40)]
    async with CasServer(storage, MemoryActionCache(), address=address):
        proxy, target, _ = await anyio.to_thread.run_sync(
            start, ["--address", "127.0.0.1:0", "--upstream", f"grpc://{address}",
                    "--data-dir", str(tmp_path / "proxy")], env,
        )  # fmt: skip
    try:
        async with CasClient(f"grpc://{target}", max_attempts=1) as client:
            done = anyio.Event()

            async def run() -> None:
                for digest, data in blobs:  # each: FindMissingBlobs, then a ByteStream write
                    await client.upload_blobs({digest: data})
                    await anyio.sleep(0.05)
                done.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(run)
                await anyio.sleep(1.5)  # the upstream is away for the run's first 1.5 s
                async with CasServer(storage, MemoryActionCache(), address=address):
                    with anyio.fail_after(60):
                        await done.wait()
                    assert await client.download_blobs([d for d, _ in blobs]) == dict(blobs)
        assert await missing_digests(storage, NO_CONTEXT, [d for d, _ in blobs]) == []
    finally:
        await anyio.to_thread.run_sync(stop, proxy, signal.SIGTERM)
