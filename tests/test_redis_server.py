"""The server on a RedisIndex: Redis command counts per request, and a Redis outage under load."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.digest import Digest
from asynccas.index.redis import RedisIndex
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.disk import DiskStorage
from asynccas.testing import blob
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.anyio
Request = re_pb2.BatchUpdateBlobsRequest.Request
_prefixes = itertools.count()


@asynccontextmanager
async def serve(index: RedisIndex) -> AsyncIterator[grpc.aio.Channel]:
    async with (
        CasServer(index, MemoryActionCache(), address="127.0.0.1:0") as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        yield channel


def redis_index(url: str, root: Path) -> RedisIndex:
    return RedisIndex(DiskStorage(root / "data", fsync=False), url, prefix=f"srv{next(_prefixes)}")


async def upload(channel: grpc.aio.Channel, blobs: list[tuple[Digest, bytes]]) -> None:
    response = await re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[Request(digest=d.to_proto(), data=b) for d, b in blobs]
        )
    )
    assert all(r.status.code == 0 for r in response.responses)


async def test_find_missing_of_1000_digests_costs_a_handful_of_commands(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    present = [blob(64, i) for i in range(500)]
    absent = [blob(64, 10_000 + i)[0] for i in range(500)]
    async with serve(redis_index(redis_server.url, tmp_path)) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        await upload(channel, present)
        request = re_pb2.FindMissingBlobsRequest(
            blob_digests=[d.to_proto() for d in [*(d for d, _ in present), *absent]]
        )

        async def commands_spent() -> dict[str, int]:
            before = await anyio.to_thread.run_sync(redis_server.command_counts)
            response = await cas.FindMissingBlobs(request)
            after = await anyio.to_thread.run_sync(redis_server.command_counts)
            assert {d.hash for d in response.missing_blob_digests} == {d.hash for d in absent}
            return {
                name: after[name] - before.get(name, 0)
                for name in after
                if after[name] != before.get(name, 0)
                # The counting itself, and the handshake of a connection the pool opens.
                and name not in ("info", "hello", "client|setinfo", "select")
            }

        # One SMISMEMBER and one ZADD (recency), whatever the number of digests ...
        assert await commands_spent() == {"smismember": 1, "zadd": 1}
        # ... and once this process has touched them in this interval, the SMISMEMBER alone.
        assert await commands_spent() == {"smismember": 1}


async def test_redis_outage_fails_fast_and_recovers_without_losing_blobs(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=True)
    await anyio.to_thread.run_sync(redis.start)
    try:
        acknowledged: list[tuple[Digest, bytes]] = []
        failures: list[grpc.StatusCode] = []
        async with serve(redis_index(redis.url, tmp_path)) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            seeds = itertools.count()

            async def keep_uploading(stop: anyio.Event) -> None:
                while not stop.is_set():
                    item = blob(2048, next(seeds))
                    try:
                        await upload(channel, [item])
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc.code())
                        await anyio.sleep(0.01)
                    else:
                        acknowledged.append(item)

            stop = anyio.Event()
            async with anyio.create_task_group() as load:
                for _ in range(4):
                    load.start_soon(keep_uploading, stop)
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(redis.kill)
                with anyio.fail_after(5):  # fails fast, with a status that says why
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await cas.FindMissingBlobs(
                            re_pb2.FindMissingBlobsRequest(blob_digests=[blob(1, 1)[0].to_proto()])
                        )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Redis" in (caught.value.details() or "")
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(redis.start)  # same port, same append-only file
                await anyio.sleep(1.0)
                stop.set()
            assert failures, "the outage was not noticed"
            assert set(failures) == {grpc.StatusCode.UNAVAILABLE}, set(failures)
            # Recovered without a restart, and nothing acknowledged was lost or corrupted.
            digests = [d for d, _ in acknowledged]
            missing = await cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d in digests])
            )
            assert list(missing.missing_blob_digests) == []
            for start in range(0, len(acknowledged), 200):
                part = acknowledged[start : start + 200]
                read = await cas.BatchReadBlobs(
                    re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d, _ in part])
                )
                assert [r.data for r in read.responses] == [data for _, data in part]
    finally:
        await anyio.to_thread.run_sync(redis.stop)
