"""Per-instance isolation over one copy of every blob (seed 004, Docker distribution's
per-repository membership): instances apart both ways, uploads of stored bytes deduplicated,
eviction leaving nothing dangling, and a 10,000-digest check in O(1) Redis round trips, with
the blob-info cache in memory and in a real Redis (single server and Cluster)."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
import redis

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.cli import build_parser, shorthand_config
from asynccas.client import CasClient
from asynccas.config import build
from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import BlobNotFound, ConfigurationError
from asynccas.index.redis import RedisIndex
from asynccas.redis_provider import RedisProvider
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import put_chunks
from asynccas.storage.blob_info import (
    BlobInfoCache,
    BlobMeta,
    MemoryBlobInfo,
    RedisBlobInfo,
    SqliteBlobInfo,
)
from asynccas.storage.context import RequestContext
from asynccas.storage.disk import DiskStorage
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.per_instance import PerInstanceStorage
from asynccas.testing import blob, check_storage
from tests.support.redis_servers import RedisCluster, RedisSentinel, RedisServer
from tests.test_cli import start, stop

pytestmark = pytest.mark.anyio

A, B = RequestContext("team-a"), RequestContext("team-b")


def prefix() -> str:
    return f"pi-{uuid.uuid4().hex[:8]}"


async def check_blob_info(info: BlobInfoCache) -> None:
    one, two, three = (blob(100 + i, i)[0] for i in range(3))
    await info.start()
    try:
        assert await info.contains("a", [one, two]) == [False, False]
        await info.add("a", [one, two])
        await info.add("a:b", [three])
        assert await info.contains("a", [one, three, two]) == [True, False, True]
        assert await info.contains("a:b", [one, three]) == [False, True]
        assert await info.meta([one]) == [None]
        meta = BlobMeta(one.size_bytes, "s3://bucket/", 1_700_000_000.5)
        await info.set_meta([(one, meta)])
        assert await info.meta([one, two]) == [meta, None]
        await info.add("b", [one])
        await info.forget([one])  # gone from every instance, and its metadata with it
        assert await info.contains("a", [one, two]) == [False, True]
        assert await info.contains("b", [one]) == [False]
        assert await info.meta([one]) == [None]
        assert await info.contains("a", []) == []
    finally:
        await info.stop()


async def test_memory_blob_info() -> None:
    await check_blob_info(MemoryBlobInfo())


async def test_memory_blob_info_is_bounded_and_forgets_to_missing() -> None:
    info = MemoryBlobInfo(max_entries=10)
    digests = [blob(10, i)[0] for i in range(30)]
    await info.add("a", digests)
    assert await info.contains("a", digests) == [False] * 20 + [True] * 10


async def test_sqlite_blob_info(tmp_path: Path) -> None:
    await check_blob_info(SqliteBlobInfo(tmp_path / "blob-info.sqlite", fsync=False))
    # Kept across restarts: the embedded default's membership survives the server.
    info = SqliteBlobInfo(tmp_path / "kept.sqlite", fsync=False)
    digests = [blob(10, i)[0] for i in range(1200)]  # more than one statement's worth
    await info.start()
    await info.add("a", digests[:700])
    await info.stop()
    await info.start()
    try:
        assert await info.contains("a", digests) == [True] * 700 + [False] * 500
    finally:
        await info.stop()


async def test_redis_blob_info(redis_server: RedisServer) -> None:
    await check_blob_info(RedisBlobInfo(RedisProvider(redis_server.url), prefix=prefix()))


async def test_redis_cluster_blob_info(redis_cluster: RedisCluster) -> None:
    await check_blob_info(RedisBlobInfo(RedisProvider(redis_cluster.url), prefix=prefix()))


async def test_storage_conformance_per_instance() -> None:
    async with PerInstanceStorage(MemoryStorage(), MemoryBlobInfo()) as storage:
        await check_storage(storage)


async def test_storage_conformance_per_instance_over_a_redis_index(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    provider = RedisProvider(redis_server.url)
    index = RedisIndex(DiskStorage(tmp_path), provider, prefix=prefix())
    async with PerInstanceStorage(index, RedisBlobInfo(provider, prefix=prefix())) as storage:
        await check_storage(storage)


async def test_instances_are_apart_and_stored_bytes_are_not_stored_twice(tmp_path: Path) -> None:
    memory = MemoryStorage()
    async with PerInstanceStorage(memory, MemoryBlobInfo()) as storage:
        digest, data = blob(300_000, 1)
        await put_chunks(storage, A, digest, _pieces(data))
        assert await storage.find_missing(B, _batch(digest)) == b"\x01"
        assert await storage.find_missing(A, _batch(digest)) == b"\x00"
        assert await storage.bulk_read(B, [digest]) == {}
        stored = memory.total_size
        await put_chunks(storage, B, digest, _pieces(data))
        assert memory.total_size == stored, "B's upload of stored bytes was stored again"
        assert storage.deduplicated == 1
        assert await storage.find_missing(B, _batch(digest)) == b"\x00"

        small, small_data = blob(1000, 2)
        assert await storage.bulk_update(B, [(small, small_data)]) == [None]
        assert await storage.find_missing(A, _batch(small)) == b"\x01"
        wrong = small_data[:-1] + bytes([small_data[-1] ^ 1])
        (error,) = await storage.bulk_update(A, [(small, wrong)])
        assert error is not None, "A gained B's blob by naming its digest with other bytes"
        assert await storage.find_missing(A, _batch(small)) == b"\x01"
        assert await storage.bulk_update(A, [(small, small_data)]) == [None]
        assert await storage.bulk_read(A, [small]) == {small: small_data}


async def test_over_grpc_each_instance_sees_only_what_it_uploaded(tmp_path: Path) -> None:
    config = {
        "cas": "m",
        "isolation": "per-instance",
        "storage": {"m": {"type": "memory"}},
    }
    deployment = build(config, tmp_path)
    assert isinstance(deployment.cas, PerInstanceStorage)
    assert "kept per instance (in memory)" in deployment.description
    async with (
        CasServer(deployment.cas, MemoryActionCache(), address="127.0.0.1:0") as server,
        CasClient(f"grpc://{server.target}", "team-a") as team_a,
        CasClient(f"grpc://{server.target}", "team-b") as team_b,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        digest, data = blob(5 * 1024 * 1024, 5)  # over the batch limit: ByteStream
        small, small_data = blob(500, 6)  # batches
        await team_a.upload_blobs([(digest, data), (small, small_data)])
        assert await team_a.find_missing([digest, small]) == []
        assert await team_b.find_missing([digest, small]) == [digest, small]
        cas = re_grpc.ContentAddressableStorageStub(channel)
        reply = await cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(instance_name="team-b", digests=[small.to_proto()])
        )
        assert reply.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
        with pytest.raises(BlobNotFound):
            await team_b.download_blobs([digest])
        # B's own upload of the same bytes makes them B's; the other way round too.
        await team_b.upload_blobs([(digest, data)])
        assert await team_b.find_missing([digest, small]) == [small]
        other, other_data = blob(70_000, 7)
        await team_b.upload_blobs([(other, other_data)])
        assert await team_a.find_missing([other]) == [other]
        assert await team_b.find_missing([other]) == []


async def test_eviction_removes_membership_and_metadata(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    provider = RedisProvider(redis_server.url)
    keys = prefix()
    index = RedisIndex(DiskStorage(tmp_path), provider, prefix=prefix())
    info = RedisBlobInfo(provider, prefix=keys)
    async with PerInstanceStorage(index, info) as storage:
        digest, data = blob(5000, 3)
        await put_chunks(storage, A, digest, _pieces(data))
        await put_chunks(storage, B, digest, _pieces(data))
        plain = redis.Redis(port=redis_server.port)
        assert plain.exists(info.info_key(digest))
        assert plain.sismember(info.members_key("team-b"), digest.member)  # type: ignore[arg-type]
        assert await index.delete_n_bytes(1) >= len(data)
        assert not plain.exists(info.info_key(digest)), "the evicted blob's metadata stayed"
        for instance in ("team-a", "team-b"):
            assert not plain.sismember(info.members_key(instance), digest.member)  # type: ignore[arg-type]
        assert await storage.find_missing(A, _batch(digest)) == b"\x01"


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_a_10000_digest_check_costs_a_constant_number_of_redis_commands(
    topology: str, redis_server: RedisServer, redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    url = redis_server.url if topology == "single" else redis_cluster.url
    nodes = [redis_server] if topology == "single" else redis_cluster.nodes
    provider = RedisProvider(url)
    index = RedisIndex(MemoryStorage(), provider, prefix=prefix())
    async with PerInstanceStorage(index, RedisBlobInfo(provider, prefix=prefix())) as storage:
        held = [blob(100, i) for i in range(50)]
        assert await storage.bulk_update(A, held) == [None] * len(held)

        def commands() -> int:
            return sum(sum(node.command_counts().values()) for node in nodes)

        async def cost(digests: list[Digest]) -> int:
            before = commands()
            mask = await storage.find_missing(A, _batch(*digests))
            assert mask == bytes(len(held)) + b"\x01" * (len(digests) - len(held))
            return commands() - before - len(nodes)  # less the INFO that counted

        # The fewest of three: the first call may open a connection (its handshake commands
        # count too, as may another client's command on a shared server), seen once in CI.
        costs = []
        for count in (10, 10_000):
            digests = [d for d, _ in held] + [blob(8, 1000 + i)[0] for i in range(count)]
            costs.append(min([await cost(digests) for _ in range(3)]))
    assert costs[0] == costs[1], f"commands grew with the batch: {costs}"
    assert costs[1] <= 8 * len(nodes), costs


def test_config_and_flags(tmp_path: Path) -> None:
    base: dict[str, Any] = {"cas": "m", "storage": {"m": {"type": "memory"}}}
    with pytest.raises(ConfigurationError, match="isolation"):
        build({**base, "isolation": "per-team"}, tmp_path)
    with pytest.raises(ConfigurationError, match="only per-instance isolation uses it"):
        build({**base, "blob_info": {"type": "memory"}}, tmp_path)
    with pytest.raises(ConfigurationError, match="unknown blob_info type"):
        build({**base, "isolation": "per-instance", "blob_info": {"type": "etcd"}}, tmp_path)
    redis_info = {"type": "redis", "url": "redis://127.0.0.1:1/0", "prefix": "x"}
    deployment = build({**base, "isolation": "per-instance", "blob_info": redis_info}, tmp_path)
    assert isinstance(deployment.cas, PerInstanceStorage)
    assert isinstance(deployment.cas.info, RedisBlobInfo)


async def test_serve_isolation_flag(tmp_path: Path) -> None:
    async def flags(*given: str) -> dict[str, Any]:
        # argparse looks for translations on disk: parsed in a worker thread.
        argv = ["serve", "--data-dir", str(tmp_path), *given]
        parsed = await anyio.to_thread.run_sync(lambda: build_parser().parse_args(argv))
        return await shorthand_config(parsed)

    local = await flags("--isolation", "per-instance")
    assert local["isolation"] == "per-instance"
    data_dir = await anyio.Path(tmp_path).resolve()
    assert local["blob_info"] == {
        "type": "sqlite", "path": str(data_dir / "blob-info.sqlite"), "fsync": True,
    }  # fmt: skip
    in_memory = await flags("--isolation", "per-instance", "--storage", "memory")
    assert "blob_info" not in in_memory  # the memory default
    shared = await flags("--isolation", "per-instance", "--index", "redis://127.0.0.1:1/0")
    assert shared["blob_info"] == {"type": "redis", "url": "redis://127.0.0.1:1/0"}
    assert "isolation" not in await flags()


def _batch(*digests: Digest) -> DigestBatch:
    return DigestBatch.of(DigestFunction.SHA256, list(digests))


async def _pieces(data: bytes) -> Any:
    for offset in range(0, len(data), 16 * 1024):
        yield data[offset : offset + 16 * 1024]


async def test_redis_blob_info_through_sentinel(tmp_path: Path) -> None:
    sentinel = RedisSentinel(tmp_path / "sentinel")
    await anyio.to_thread.run_sync(sentinel.start)
    try:
        await check_blob_info(RedisBlobInfo(RedisProvider(sentinel.url), prefix=prefix()))
    finally:
        await anyio.to_thread.run_sync(sentinel.stop)


async def test_serve_per_instance_keeps_membership_across_a_restart(tmp_path: Path) -> None:
    """`asynccas serve --isolation per-instance` on the default storage: who holds what is in
    the data directory, so a restart does not make every instance upload again."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    flags = ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
             "--isolation", "per-instance", "--no-fsync"]  # fmt: skip
    digest, data = blob(100_000, 3)
    for run in ("first", "after a restart"):
        process, target, description = await anyio.to_thread.run_sync(start, flags, env)
        try:
            assert "kept per instance (in " in description, description
            async with (
                CasClient(f"grpc://{target}", "team-a") as team_a,
                CasClient(f"grpc://{target}", "team-b") as team_b,
            ):
                if run == "first":
                    await team_a.upload_blobs([(digest, data)])
                assert await team_a.find_missing([digest]) == [], run
                assert await team_b.find_missing([digest]) == [digest], run
        finally:
            await anyio.to_thread.run_sync(stop, process, signal.SIGTERM)
