"""Action results in Redis: what one frontend stores is a hit on another, per instance, with a
TTL refreshed by use, on a single redis-server, a Redis Cluster and over TLS, all real."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.config import build
from asynccas.digest import Digest
from asynccas.errors import BackendUnavailable
from asynccas.eviction import EvictionPolicy
from asynccas.index.sqlite import SqliteIndex
from asynccas.redis_provider import RedisProvider
from asynccas.server.app import CasServer
from asynccas.storage import action_cache
from asynccas.storage.action_cache import RedisActionCache
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.memory import MemoryStorage
from asynccas.testing import blob
from tests.support.redis_servers import RedisCluster, RedisSentinel, RedisServer

pytestmark = pytest.mark.anyio


def cache(url: str, **options: Any) -> RedisActionCache:
    return RedisActionCache(RedisProvider(url), prefix=f"ac-{uuid.uuid4().hex[:8]}", **options)


async def check_action_cache(store: RedisActionCache) -> None:
    action, other = blob(100, 1)[0], blob(100, 2)[0]
    await store.start()
    try:
        assert await store.get("", action) is None
        await store.put("", action, b"result one")
        assert await store.get("", action) == b"result one"
        # Instances are apart, whatever their names hold.
        for instance in ("a", "a:0", "a/b", "0:a"):
            assert await store.get(instance, action) is None
        await store.put("a/b", action, b"for a/b")
        assert await store.get("a/b", action) == b"for a/b"
        assert await store.get("", action) == b"result one"
        await store.put("", action, b"replaced")
        assert await store.get("", action) == b"replaced"
        await store.delete("", action)
        assert await store.get("", action) is None
        assert await store.get("", other) is None
    finally:
        await store.stop()


async def test_on_one_redis_server(redis_server: RedisServer) -> None:
    await check_action_cache(cache(redis_server.url))


async def test_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    await check_action_cache(cache(redis_cluster.url))


async def test_over_tls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", tls=True)
    await anyio.to_thread.run_sync(server.start)
    try:
        await check_action_cache(cache(server.url))
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def test_results_unused_for_the_ttl_expire_and_used_ones_stay(
    redis_server: RedisServer,
) -> None:
    store = cache(redis_server.url, ttl=2)
    used, unused = blob(10, 1)[0], blob(10, 2)[0]
    await store.start()
    try:
        await store.put("", used, b"used")
        await store.put("", unused, b"unused")
        for _ in range(3):  # 3 s in all: past the TTL, but each read gives it again
            await anyio.sleep(1)
            assert await store.get("", used) == b"used"
        assert await store.get("", unused) is None
    finally:
        await store.stop()


async def test_a_result_stored_through_one_frontend_is_a_hit_on_another(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two servers sharing one Redis action cache (configured from a file's table) and one
    blob store: UpdateActionResult through the first, GetActionResult through the second."""
    storage = MemoryStorage()
    prefix = f"shared-{uuid.uuid4().hex[:8]}"
    table = {"type": "redis", "url": redis_server.url, "prefix": prefix, "ttl": 3600}
    config = {"cas": "m", "storage": {"m": {"type": "memory"}}, "action_cache": table}
    first_ac = (await anyio.to_thread.run_sync(build, config, tmp_path)).action_cache
    second_ac = (await anyio.to_thread.run_sync(build, config, tmp_path)).action_cache
    output, data = blob(5000, 3)
    assert await storage.bulk_update(NO_CONTEXT, [(output, data)]) == [None]
    action = Digest.of(b"an action")
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out", digest=output.to_proto())
    async with (
        CasServer(storage, first_ac, address="127.0.0.1:0") as first,
        CasServer(storage, second_ac, address="127.0.0.1:0") as second,
        grpc.aio.insecure_channel(first.target) as to_first,
        grpc.aio.insecure_channel(second.target) as to_second,
    ):
        await re_grpc.ActionCacheStub(to_first).UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action.to_proto(), action_result=result)
        )
        hit = await re_grpc.ActionCacheStub(to_second).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=action.to_proto())
        )
        assert hit == result


async def test_redis_down_is_unavailable_naming_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    await anyio.to_thread.run_sync(server.start)
    store = cache(server.url)
    await store.start()
    try:
        await store.put("", blob(10)[0], b"x")
        await anyio.to_thread.run_sync(server.stop)
        with pytest.raises(BackendUnavailable, match=r"Redis at redis://127\.0\.0\.1"):
            await store.get("", blob(10)[0])
    finally:
        await store.stop()


async def _recency(store: RedisActionCache, actions: list[Digest]) -> list[tuple[int, int, float]]:
    """Each stored action's position in ``actions``, bucket and recency score, oldest first."""
    position = {store.key("", action): i for i, action in enumerate(actions)}
    found: list[tuple[int, int, float]] = []
    for bucket in range(store.buckets):
        lru = store._bucket_keys(bucket)[0]
        entries: list[Any] = await store._connected().zrange(lru, 0, -1, withscores=True)
        for member, score in entries:
            name = member.decode() if isinstance(member, bytes) else str(member)
            found.append((position.get(name, -1), bucket, float(score)))
    return sorted(found, key=lambda entry: entry[2])


async def check_accounting(store: RedisActionCache) -> None:
    actions = [blob(100, 100 + i)[0] for i in range(40)]
    await store.start()
    try:
        assert await store.stored_bytes() == 0
        for action in actions:
            await store.put("", action, b"r" * 1000)
        assert await store.stored_bytes() == 40_000
        await store.put("", actions[0], b"r" * 500)  # replaced: counted once, at its new size
        await store.delete("", actions[1])
        await store.delete("", actions[1])
        assert await store.stored_bytes() == 38_500
        await store.get("", actions[2])  # the oldest three but this one go first
        before = await _recency(store, actions)
        assert sorted(position for position, _, _ in before) == [0, *range(2, 40)]
        await store.shrink_to(35_000)
        assert await store.stored_bytes() <= 35_000
        # Failed once in a full run under load, never alone: the message shows the LRU order.
        assert await store.get("", actions[2]) is not None, (
            f"a recently used result went; recency before (action, bucket, score): {before}"
        )
        assert await store.get("", actions[3]) is None, "an old result stayed"
    finally:
        await store.stop()


async def test_results_count_toward_the_budget_on_one_server(redis_server: RedisServer) -> None:
    await check_accounting(cache(redis_server.url, buckets=1))


async def test_results_count_toward_the_budget_on_a_cluster(redis_cluster: RedisCluster) -> None:
    store = cache(redis_cluster.url)
    assert store.buckets == 16
    await check_accounting(store)


def _actions_in_bucket(store: RedisActionCache, bucket: int, count: int) -> list[Digest]:
    found = []
    for seed in range(10_000):
        action = blob(10, seed)[0]
        if int(action.hash[:8], 16) % store.buckets == bucket:
            found.append(action)
            if len(found) == count:
                return found
    raise AssertionError("too few actions in the bucket")


@pytest.mark.parametrize("batch", [256, 2])
async def test_shrinking_drops_the_least_recent_results_across_buckets(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    # One bucket holds the two oldest results and the two newest, another the two between:
    # dropping four must leave the newest two, not empty the first bucket. (It did: the
    # bucket with the oldest head gave up entries until enough bytes were freed.) A batch of
    # two makes each round see only part of a bucket.
    monkeypatch.setattr(action_cache, "_DROP_BATCH", batch)
    store = cache(redis_server.url, ttl=None, buckets=16)
    first, second = _actions_in_bucket(store, 3, 4), _actions_in_bucket(store, 11, 2)
    in_use_order = [first[0], first[1], *second, first[2], first[3]]
    await store.start()
    try:
        for action in in_use_order:
            await store.put("", action, b"r" * 1000)
            await anyio.sleep(0.002)  # distinct recency scores
        await store.shrink_to(2000)
        assert await store.stored_bytes() == 2000
        kept = [await store.get("", action) is not None for action in in_use_order]
        assert kept == [False, False, False, False, True, True]
    finally:
        await store.stop()


async def test_expired_results_leave_the_count(redis_server: RedisServer) -> None:
    store = cache(redis_server.url, ttl=1)
    await store.start()
    try:
        await store.put("", blob(10, 1)[0], b"x" * 100)
        assert await store.stored_bytes() == 100
        await anyio.sleep(2.2)
        assert await store.stored_bytes() == 0
    finally:
        await store.stop()


async def test_the_eviction_policy_keeps_results_to_their_share(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The budget holds blobs and action results together, as with the SQLite cache: results
    beyond their share (half the budget) go, least recently used first."""
    store = cache(redis_server.url, ttl=None)
    index = SqliteIndex(MemoryStorage(), tmp_path / "index.sqlite")
    policy = EvictionPolicy(max_bytes=20_000)
    async with index:
        await store.start()
        try:
            for seed in range(30):
                await store.put("", blob(10, seed)[0], b"r" * 1000)
            await policy.enforce_once(index, store)
            assert await store.stored_bytes() <= 10_000
        finally:
            await store.stop()


async def test_through_sentinel(tmp_path: Path) -> None:
    sentinel = RedisSentinel(tmp_path / "sentinel")
    await anyio.to_thread.run_sync(sentinel.start)
    try:
        await check_action_cache(cache(sentinel.url))
        await check_accounting(cache(sentinel.url))
    finally:
        await anyio.to_thread.run_sync(sentinel.stop)
