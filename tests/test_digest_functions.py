"""BLAKE3 end to end over gRPC, beside SHA256: REAPI 2.12's resource-name segment, the
``digest_function`` fields of the batch and action cache RPCs, and blobs whose hashes have the
same 64 hex characters kept apart (the storage conformance kit checks every backend too)."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.client.cas import CasClient
from asynccas.digest import Digest, DigestFunction
from asynccas.errors import InvalidResourceName
from asynccas.index.redis import RedisIndex
from asynccas.resource_names import format_read_name, format_write_name, parse_read_name
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.disk import DiskStorage
from tests.support.redis_servers import RedisCluster, RedisServer

pytestmark = pytest.mark.anyio

BLAKE3 = DigestFunction.BLAKE3
BLAKE3_FIELD = re_pb2.DigestFunction.BLAKE3


def test_resource_names_carry_the_segment_for_blake3_only() -> None:
    data = b"named"
    blake3, sha256 = Digest.of(data, BLAKE3), Digest.of(data)
    assert format_read_name("ci", blake3) == f"ci/blobs/blake3/{blake3.hash}/5"
    assert format_read_name("ci", sha256) == f"ci/blobs/{sha256.hash}/5"
    assert parse_read_name(f"ci/blobs/blake3/{blake3.hash}/5").digest == blake3
    # Without a segment, 64 hex characters are SHA256: BLAKE3 is never inferred.
    assert parse_read_name(f"ci/blobs/{blake3.hash}/5").digest.function is DigestFunction.SHA256
    with pytest.raises(InvalidResourceName):
        parse_read_name(f"blobs/blake3/{Digest.of(data, DigestFunction.SHA1).hash}/5")


async def test_blake3_end_to_end_with_the_client(server: CasServer) -> None:
    blobs = {Digest.of(d, BLAKE3): d for d in (b"small", bytes(300_000), bytes(3 << 20))}
    action = Digest.of(b"an action", BLAKE3)
    output = next(iter(blobs))
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=output.to_proto())]
    )
    async with CasClient(f"grpc://{server.target}", digest_function=BLAKE3) as cas:
        assert BLAKE3.proto_value in cas.capabilities.cache_capabilities.digest_functions
        assert set(await cas.find_missing(blobs)) == set(blobs)
        await cas.upload_blobs(blobs)  # one batch and two ByteStream uploads with the segment
        assert await cas.find_missing(blobs) == []
        assert await cas.download_blobs(blobs) == blobs
        await cas.update_action_result(action, result)
        assert await cas.get_action_result(action) == result
    # The same hex as SHA256 digests: none of them is there.
    async with CasClient(f"grpc://{server.target}") as cas:
        twins = [Digest(d.hash, d.size_bytes) for d in blobs]
        assert set(await cas.find_missing(twins)) == set(twins)
        assert await cas.get_action_result(Digest(action.hash, action.size_bytes)) is None


async def test_bytestream_with_the_blake3_segment(channel: grpc.aio.Channel) -> None:
    data = b"streamed with blake3" * 1000
    digest = Digest.of(data, BLAKE3)
    stub = bs_grpc.ByteStreamStub(channel)
    name = format_write_name("", str(uuid.uuid4()), digest)
    assert "/blake3/" in name
    response = await stub.Write(
        iter([bs_pb2.WriteRequest(resource_name=name, data=data, finish_write=True)])
    )
    assert response.committed_size == len(data)
    read = stub.Read(bs_pb2.ReadRequest(resource_name=format_read_name("", digest)))
    assert b"".join([r.data async for r in read]) == data
    # Read as SHA256 (no segment), the same hex names no stored blob.
    twin = stub.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{len(data)}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await twin.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Data that is not its BLAKE3 digest's is refused.
    wrong = format_write_name("", str(uuid.uuid4()), Digest(digest.hash, 3, BLAKE3))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Write(
            iter([bs_pb2.WriteRequest(resource_name=wrong, data=b"abc", finish_write=True)])
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_find_missing_honours_the_digest_function_field(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    data = b"batched"
    blake3 = Digest.of(data, BLAKE3)
    stored = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=blake3.to_proto(), data=data)],
            digest_function=BLAKE3_FIELD,
        )
    )
    assert stored.responses[0].status.code == 0
    as_blake3 = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(
            blob_digests=[blake3.to_proto()], digest_function=BLAKE3_FIELD
        )
    )
    assert list(as_blake3.missing_blob_digests) == []
    as_sha256 = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[blake3.to_proto()])
    )
    assert list(as_sha256.missing_blob_digests) == [blake3.to_proto()]
    read = await cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[blake3.to_proto()], digest_function=BLAKE3_FIELD)
    )
    assert read.responses[0].data == data


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_blake3_over_grpc_with_the_redis_index(
    topology: str, redis_server: RedisServer, redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    redis = redis_server if topology == "single" else redis_cluster
    index = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False), redis.url, prefix=f"b3{uuid.uuid4().hex[:8]}"
    )
    data = {Digest.of(d, BLAKE3): d for d in (b"redis", bytes(2 << 20))}
    async with (
        CasServer(index, MemoryActionCache(), address="127.0.0.1:0") as server,
        CasClient(f"grpc://{server.target}", digest_function=BLAKE3) as cas,
    ):
        await cas.upload_blobs(data)
        assert await cas.find_missing(data) == []
        assert await cas.download_blobs(data) == data
        twins = [Digest(d.hash, d.size_bytes) for d in data]
        assert set(await cas.find_missing(twins)) == set(twins)
