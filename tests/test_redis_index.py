"""RedisIndex against real redis-server processes: one server, and a 3-master cluster."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from asynccas.index.redis import RedisIndex
from asynccas.storage.disk import DiskStorage
from asynccas.testing import blob, check_index
from asynccas.testing_redis import RedisCluster, RedisServer

pytestmark = pytest.mark.anyio


_prefixes = iter(range(10**6))


def make_index(url: str, root: Path, **kwargs: object) -> RedisIndex:
    # A fresh key prefix per index keeps tests on a shared server independent.
    prefix = f"t{next(_prefixes)}"
    return RedisIndex(DiskStorage(root / "data", fsync=False), url, prefix=prefix, **kwargs)  # type: ignore[arg-type]


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_conformance_single_server(redis_server: RedisServer, tmp_path: Path) -> None:
    async with make_index(redis_server.url, tmp_path) as index:
        await check_index(index)


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
    blobs = [blob(1000 + 37 * i, i) for i in range(40)]
    first = make_index(redis_server.url, tmp_path)
    second = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False), redis_server.url, prefix=first.prefix
    )
    async with first, second:
        rng = random.Random(3)

        async def churn(index: RedisIndex) -> None:
            for _ in range(150):
                digest, data = rng.choice(blobs)
                action = rng.random()
                if action < 0.5:
                    await index.commit_write(digest, chunks(data))
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
        assert await first.get_total_size() == sum(d.size_bytes for d in present)
        assert await first.storage.missing_blobs(present) == [], "indexed but missing"


async def test_eviction_racing_reupload(redis_server: RedisServer, tmp_path: Path) -> None:
    blobs = [blob(4096, 1000 + i) for i in range(30)]
    writer = make_index(redis_server.url, tmp_path)
    evictor = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False), redis_server.url, prefix=writer.prefix
    )
    async with writer, evictor:

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
        assert await writer.storage.missing_blobs(indexed) == []
        assert await writer.get_total_size() == sum(d.size_bytes for d in indexed)


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
