"""RedisIndex against real redis-server processes: one server, and a 3-master cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from asynccas.index.redis import RedisIndex
from asynccas.storage.disk import DiskStorage
from asynccas.testing import (
    blob,
    check_eviction_racing_uploads,
    check_index,
    check_index_concurrency,
)
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
    first = make_index(redis_server.url, tmp_path)
    second = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False), redis_server.url, prefix=first.prefix
    )
    async with first, second:
        await check_index_concurrency(first, second)


async def test_eviction_racing_reupload(redis_server: RedisServer, tmp_path: Path) -> None:
    writer = make_index(redis_server.url, tmp_path)
    evictor = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False), redis_server.url, prefix=writer.prefix
    )
    async with writer, evictor:
        await check_eviction_racing_uploads(writer, evictor)


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
