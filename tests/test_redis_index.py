"""RedisIndex against real redis-server processes: one server (plain, with a password, over
TLS), a 3-master cluster, and a primary found through Sentinel."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import BackendUnavailable
from asynccas.index.recency import recency_window
from asynccas.index.redis import RedisIndex
from asynccas.redis_provider import RedisProvider
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.disk import DiskStorage
from asynccas.testing import (
    blob,
    check_eviction_racing_uploads,
    check_index,
    check_index_concurrency,
)
from tests.support.clock import clear_of_window_edge
from tests.support.redis_servers import RedisCluster, RedisSentinel, RedisServer

pytestmark = pytest.mark.anyio


_prefixes = iter(range(10**6))


def make_index(url: str, root: Path, **kwargs: object) -> RedisIndex:
    # A fresh key prefix per index keeps tests on a shared server independent.
    prefix = f"t{next(_prefixes)}"
    return RedisIndex(DiskStorage(root / "data", fsync=False), url, prefix=prefix, **kwargs)  # type: ignore[arg-type]


def another_process(url: str, root: Path, sharing: RedisIndex, **kwargs: object) -> RedisIndex:
    """A second index over the same Redis keys and data directory, as another process has."""
    return RedisIndex(
        DiskStorage(root / "data", fsync=False),
        url,
        prefix=sharing.prefix,
        **kwargs,  # type: ignore[arg-type]
    )


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_conformance_single_server(redis_server: RedisServer, tmp_path: Path) -> None:
    async with make_index(redis_server.url, tmp_path) as index:
        await check_index(index)


async def test_conformance_with_a_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cret")
    await anyio.to_thread.run_sync(server.start)
    try:
        async with make_index(server.url, tmp_path) as index:
            await check_index(index)
        wrong = server.url.replace("s3cret", "wrong")
        with pytest.raises(BackendUnavailable) as caught:
            async with make_index(wrong, tmp_path / "other") as index:
                await index.missing_blobs([blob(10, 1)[0]])
        assert "s3cret" not in str(caught.value), "a password in an error message"
        assert "wrong" not in str(caught.value), "a password in an error message"
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def test_conformance_over_tls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", tls=True)
    await anyio.to_thread.run_sync(server.start)
    try:
        async with make_index(server.url, tmp_path) as index:
            await check_index(index)
        # The certificate is verified: without the CA that signed it, no connection.
        untrusted = server.url.split("?", 1)[0]
        with pytest.raises(BackendUnavailable, match="certificate verify failed"):
            async with make_index(untrusted, tmp_path / "other") as index:
                await index.missing_blobs([blob(10, 1)[0]])
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def test_conformance_through_sentinel(tmp_path: Path) -> None:
    sentinel = RedisSentinel(tmp_path / "sentinel")
    await anyio.to_thread.run_sync(sentinel.start)
    try:
        async with make_index(sentinel.url, tmp_path) as index:
            await check_index(index)
            # The data really lives on the primary the sentinel names.
            async with redis.asyncio.Redis(port=sentinel.primary.port) as raw:
                assert await raw.exists(f"{{{index.prefix}}}:layout")
    finally:
        await anyio.to_thread.run_sync(sentinel.stop)


async def test_conformance_cluster(redis_cluster: RedisCluster, tmp_path: Path) -> None:
    async with make_index(redis_cluster.url, tmp_path) as index:
        await check_index(index)
        # The buckets really are spread over the masters.
        digests = [blob(100, i) for i in range(64)]
        await index.bulk_update_blobs(digests)
        populated = [
            node.port
            for node in redis_cluster.nodes
            if any(
                k.endswith(b":lru")
                for k in __import__("redis").Redis(port=node.port).keys(f"{{{index.prefix}:*")
            )
        ]
        assert len(populated) >= 2, "all buckets landed on one master"


async def test_total_size_exact_under_concurrent_churn(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    first = make_index(redis_server.url, tmp_path)
    second = another_process(redis_server.url, tmp_path, first)
    async with first, second:
        await check_index_concurrency(first, second)
        await check_sets_agree(redis_server.url, first)


async def test_eviction_racing_reupload(redis_server: RedisServer, tmp_path: Path) -> None:
    writer = make_index(redis_server.url, tmp_path)
    evictor = another_process(redis_server.url, tmp_path, writer)
    async with writer, evictor:
        await check_eviction_racing_uploads(writer, evictor)
        await check_sets_agree(redis_server.url, writer)


async def check_sets_agree(url: str, index: RedisIndex) -> None:
    """Checks read the set, eviction the sorted set: they must hold the same members."""
    async with redis.asyncio.Redis.from_url(url) as raw:
        for bucket in range(index.buckets):
            tag = f"{{{index.prefix}:{bucket}}}"
            present = await raw.smembers(f"{tag}:present")
            assert present == set(await raw.zrange(f"{tag}:lru", 0, -1))


async def test_lost_blob_is_reported_missing_and_deindexed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    digest, data = blob(5000, 7)
    async with make_index(redis_server.url, tmp_path) as index:
        await index.commit_write(digest, chunks(data))
        assert isinstance(index.storage, DiskStorage)
        await anyio.to_thread.run_sync(index.storage.path_for(digest).unlink)
        assert await index.bulk_read_blobs([digest]) == {}
        assert not await index.has_blob(digest), "a lost blob must be de-indexed"
        assert await index.get_total_size() == 0


async def test_recency_is_refreshed_at_most_once_per_touch_interval(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    digest, data = blob(300, 3)
    await clear_of_window_edge()
    index = make_index(redis_server.url, tmp_path, touch_interval=3600)
    async with index, redis.asyncio.Redis.from_url(redis_server.url) as raw:
        await index.commit_write(digest, chunks(data))
        lru = f"{{{index.prefix}:0}}:lru"
        added = await raw.zscore(lru, digest.delimited)
        assert added is not None
        assert await index.missing_blobs([digest]) == []
        assert await raw.zscore(lru, digest.delimited) == added, "a fresh entry was rewritten"
        stale = added - 7200
        await raw.zadd(lru, {digest.delimited: stale})
        # Another process sharing the index: this one remembers having touched the digest
        # in this interval, and Redis scores only rise, so it rightly leaves it alone.
        other = another_process(redis_server.url, tmp_path, index, touch_interval=3600)
        async with other:
            assert await other.missing_blobs([digest]) == []
        touched = await raw.zscore(lru, digest.delimited)
        assert touched is not None
        assert touched > stale, "a stale entry was not refreshed"
        assert touched % 3600 == 0, "recency is kept to the touch interval"


async def test_reads_refresh_recency_once_per_interval_and_then_cost_redis_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    blobs = [blob(300 + i, i) for i in range(5)]
    digests = [d for d, _ in blobs]
    await clear_of_window_edge()
    index = make_index(redis_server.url, tmp_path, touch_interval=3600)
    async with index, redis.asyncio.Redis.from_url(redis_server.url) as raw:
        await index.bulk_update_blobs(blobs)
        lru = f"{{{index.prefix}:0}}:lru"
        stale = 3600.0  # last used in 1970
        await raw.zadd(lru, {d.delimited: stale for d in digests})
        # A process that has not used them in this interval: its reads refresh them all.
        reader = another_process(redis_server.url, tmp_path, index, touch_interval=3600)
        async with reader:
            assert set(await reader.bulk_read_blobs(digests)) == set(digests)
            scores = [await raw.zscore(lru, d.delimited) for d in digests]
            assert all(score is not None and score > stale for score in scores), scores
            assert all(score is not None and score % 3600 == 0 for score in scores)
            before = await anyio.to_thread.run_sync(redis_server.command_counts)
            for _ in range(3):
                assert set(await reader.bulk_read_blobs(digests)) == set(digests)
                async with aclosing(reader.get_blob(digests[0])) as chunks_read:
                    assert b"".join([c async for c in chunks_read]) == blobs[0][1]
            after = await anyio.to_thread.run_sync(redis_server.command_counts)
            sent = {
                name: after[name] - before.get(name, 0)
                for name in after
                if after[name] != before.get(name)
                and name not in ("info", "hello")  # the counting's own connection
            }
            assert sent == {}, f"re-reads within the interval sent {sent}"


async def test_during_a_redis_outage_blobs_read_this_interval_are_still_served(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")
    await anyio.to_thread.run_sync(server.start)
    try:
        read_before, unread = [blob(700, 1), blob(701, 2)], blob(702, 3)
        index = RedisIndex(
            DiskStorage(tmp_path / "data", fsync=False), server.url, touch_interval=3600
        )
        async with index:
            await index.bulk_update_blobs([*read_before, unread])
            window = recency_window(time.time(), 3600)
            assert await index.bulk_read_blobs([d for d, _ in read_before]) == dict(read_before)
            await anyio.to_thread.run_sync(server.kill)
            if recency_window(time.time(), 3600) == window:  # else they need refreshing again
                assert await index.bulk_read_blobs([d for d, _ in read_before]) == dict(read_before)
            # Whatever needs Redis fails, and says so.
            with pytest.raises(BackendUnavailable, match="Redis"):
                await index.bulk_read_blobs([unread[0]])
            with pytest.raises(BackendUnavailable, match="Redis"):
                await index.missing_blobs([d for d, _ in read_before])
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def test_processes_disagreeing_on_buckets_refuse_to_share_an_index(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    first = make_index(redis_server.url, tmp_path, buckets=4)
    async with first:
        other = another_process(redis_server.url, tmp_path, first)
        with pytest.raises(ValueError, match="has 4 buckets; this process was configured with 1"):
            await other.start()


async def test_an_index_written_by_an_older_asynccas_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Older releases stored members as text; read as digests, every blob would look missing
    and none would ever be evicted."""
    index = make_index(redis_server.url, tmp_path)
    async with redis.asyncio.Redis.from_url(redis_server.url) as raw:
        await raw.set(f"{{{index.prefix}}}:buckets", 1)
    with pytest.raises(ValueError, match=r"older asynccas.*asynccas reindex"):
        await index.start()
    other = make_index(redis_server.url, tmp_path)
    async with redis.asyncio.Redis.from_url(redis_server.url) as raw:
        await raw.set(f"{{{other.prefix}}}:layout", "text 1")
    with pytest.raises(ValueError, match="stores members as 'text'"):
        await other.start()


async def test_redis_errors_on_the_hot_path_are_reported_and_leave_it_working(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A check is written to its own connections (``EncodedLane``): a command Redis refuses
    must surface as UNAVAILABLE's error, and the next check must find the connection sound."""
    digest, data = blob(300, 1)
    index = make_index(redis_server.url, tmp_path)
    async with index, redis.asyncio.Redis.from_url(redis_server.url) as raw:
        await index.bulk_update_blobs([(digest, data)])
        present = f"{{{index.prefix}:0}}:present"
        await raw.rename(present, "elsewhere")
        await raw.set(present, "not a set")
        with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
            await index.missing_blobs([digest])
        # An error may be the connection's (READONLY from a demoted primary): it is not kept.
        assert not index.lane._idle
        await raw.delete(present)
        await raw.rename("elsewhere", present)
        absent = blob(301, 2)[0]
        assert await index.missing_blobs([digest, absent]) == [absent]
        # A connection Redis dropped is replaced without the caller noticing.
        await raw.client_kill_filter(_type="normal", skipme=True)
        assert await index.missing_blobs([digest]) == []


async def test_checks_beyond_the_connection_limit_wait_their_turn(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    blobs = [blob(100, i) for i in range(10)]
    provider = RedisProvider(redis_server.url, max_connections=2)
    index = RedisIndex(DiskStorage(tmp_path / "data", fsync=False), provider, prefix="limit")
    answers: list[list[Digest]] = []

    async def check() -> None:
        answers.append(await index.missing_blobs([d for d, _ in blobs]))

    async with index:
        await index.bulk_update_blobs(blobs[::2])
        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(check)
    assert answers == [[d for d, _ in blobs[1::2]]] * 20


async def test_members_of_every_size_width_are_checked_and_touched(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The RESP text of a check is cached per member length: each varint width must give the
    right lengths, and a check where only some digests are untouched must touch exactly those."""
    sizes = [1, 9, 10, 99, 100, 12_345, 10**9, 10**12 + 7, 2**62]
    digests = [Digest.from_key(f"sha256:{i:064x}:{size}") for i, size in enumerate(sizes)]
    first, later = digests[::2], digests[1::2]
    await clear_of_window_edge()
    index = make_index(redis_server.url, tmp_path, touch_interval=3600)
    async with index, redis.asyncio.Redis.from_url(redis_server.url) as raw:
        lru = f"{{{index.prefix}:0}}:lru"
        stale = 3600.0  # an entry last used in 1970: any touch raises it
        await raw.zadd(lru, {d.delimited: stale for d in first})
        await raw.sadd(f"{{{index.prefix}:0}}:present", *(d.delimited for d in first))
        assert await index.missing_blobs(digests) == later
        assert [await raw.zscore(lru, d.delimited) for d in first] != [stale] * len(first)
        # Now some of the batch was touched in this interval and some was not. (The ones it
        # reported missing count as touched too: uploading them will score them afresh.)
        later = [
            Digest.from_key(f"sha256:{i + 100:064x}:{d.size_bytes}") for i, d in enumerate(later)
        ]
        digests = [*first, *later]
        await raw.zadd(lru, {d.delimited: stale for d in digests})
        await raw.sadd(f"{{{index.prefix}:0}}:present", *(d.delimited for d in later))
        assert await index.missing_blobs(digests) == []
        scores = [await raw.zscore(lru, d.delimited) for d in digests]
        assert [score == stale for score in scores[len(first) :]] == [False] * len(later)
        assert [score == stale for score in scores[: len(first)]] == [True] * len(first), (
            "entries this process had already touched in the interval were rewritten"
        )


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_every_operation_beyond_the_connection_limit_waits_its_turn(
    topology: str, redis_server: RedisServer, redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """Issue 16, defect 6: 500 clients at once got "Too many connections" from a healthy Redis
    on stores and reads, which use redis-py's own pool: every operation must wait for a
    connection instead (bounded by the pool's wait), not fail."""
    server = redis_server if topology == "single" else redis_cluster
    provider = RedisProvider(server.url, max_connections=2)
    index = RedisIndex(DiskStorage(tmp_path / "data", fsync=False), provider, prefix=f"w{topology}")
    blobs = [blob(200, i) for i in range(300)]
    failures: list[BaseException] = []

    async def client(position: int) -> None:
        digest, data = blobs[position]
        try:
            [stored] = await index.bulk_update_blobs([(digest, data)])
            if stored is not None:
                failures.append(stored)
                return
            assert await index.has_blob(digest)
            async with aclosing(index.get_blob(digest)) as chunks:
                assert b"".join([chunk async for chunk in chunks]) == data
            await index.get_total_size()
        except BackendUnavailable as exc:
            failures.append(exc)

    async with index:
        async with anyio.create_task_group() as tasks:
            for position in range(len(blobs)):
                tasks.start_soon(client, position)
        assert failures == [], f"{len(failures)} failed, e.g. {failures[0]}"
        assert await index.missing_blobs([d for d, _ in blobs]) == []


class RecordingLane:
    """Stands in for the encoded lane: keeps the bytes a check would send, answers nothing."""

    def __init__(self) -> None:
        self.sent = b""

    async def send(self, commands: bytes, replies: int) -> list[Any]:
        self.sent = commands
        return [[1] * 10_000] * replies


@settings(max_examples=60)
@given(
    sizes=st.lists(st.integers(0, 2**40), min_size=1, max_size=40),
    touched=st.sets(st.integers(0, 39)),
    function=st.sampled_from(list(DigestFunction)),
)
def test_hand_encoded_checks_are_the_resp_redis_py_would_send(
    sizes: list[int], touched: set[int], function: DigestFunction
) -> None:
    """The hot path writes SMISMEMBER and ZADD in RESP by hand (joins of cached pieces): the
    bytes must be exactly what hiredis.pack_command makes of the same commands, for members
    of every length (each varint width, BLAKE3's prefix)."""
    import hiredis

    index = RedisIndex(DiskStorage(Path("/nonexistent"), fsync=False), "redis://127.0.0.1:1/0")
    lane = RecordingLane()
    index._lane = lane  # type: ignore[assignment]
    digests = [
        Digest(f"{i:0{function.hex_length}x}", size, function) for i, size in enumerate(sizes)
    ]
    batch = DigestBatch.of(function, digests)
    members = batch.members
    window = recency_window(time.time(), index.touch_interval)
    index._touched.add(window, [members[i] for i in touched if i < len(members)])

    anyio.run(index.find_missing, NO_CONTEXT, batch)

    keys = index._keys(0)
    stale = [m for i, m in enumerate(members) if i not in touched]
    pack: Any = hiredis.pack_command
    expected = pack(("SMISMEMBER", keys.present, *members))
    if stale:
        scored = [part for member in stale for part in (repr(window).encode(), member)]
        expected += pack(("ZADD", keys.lru, "XX", "GT", *scored))
    assert lane.sent == expected
