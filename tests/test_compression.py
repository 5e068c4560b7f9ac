"""zstd over gRPC: compressed ByteStream reads and writes (offsets, resumption, early answers,
decompression bombs) and compressed batches, on disk, memory and tiered servers (the
``channel`` fixture) and over a Redis index."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc
import pytest
from backports import zstd

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.client import CasClient
from asynccas.digest import Digest
from asynccas.errors import UnsupportedFeature
from asynccas.index.redis import RedisIndex
from asynccas.redis_provider import RedisProvider
from asynccas.resource_names import format_read_name, format_write_name
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import read_all
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.disk import DiskStorage
from tests.servers import memory_server
from tests.support.redis_servers import RedisServer
from tests.test_cli import start, stop

pytestmark = pytest.mark.anyio

Request = re_pb2.BatchUpdateBlobsRequest.Request
ZSTD = re_pb2.Compressor.ZSTD


def compressible(size: int, seed: int = 0) -> tuple[Digest, bytes]:
    """Build-output-like data: repetitive text with some variety, which zstd shrinks."""
    line = b"object %d: some repeated build output text, " % seed
    data = (line * (size // len(line) + 1))[:size]
    return Digest.of(data), data


def messages(name: str, payload: bytes, *, size: int = 16 * 1024, start: int = 0,
             finish: bool = True) -> list[bs_pb2.WriteRequest]:  # fmt: skip
    """``payload`` as WriteRequests of ``size`` bytes, offsets counting from ``start``."""
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [
        bs_pb2.WriteRequest(
            resource_name=name if i == 0 else "",
            write_offset=start + i * size,
            data=piece,
            finish_write=finish and i == len(pieces) - 1,
        )
        for i, piece in enumerate(pieces)
    ]


def upload_name(digest: Digest) -> str:
    return format_write_name("", str(uuid.uuid4()), digest, "zstd")


async def write(channel: grpc.aio.Channel, requests: list[bs_pb2.WriteRequest]) -> int:
    response = await bs_grpc.ByteStreamStub(channel).Write(iter(requests))
    return int(response.committed_size)


async def read(channel: grpc.aio.Channel, digest: Digest, offset: int = 0, limit: int = 0) -> bytes:
    """A compressed read, decompressed (and checked to be one frame)."""
    request = bs_pb2.ReadRequest(
        resource_name=format_read_name("", digest, "zstd"), read_offset=offset, read_limit=limit
    )
    frame = b"".join([r.data async for r in bs_grpc.ByteStreamStub(channel).Read(request)])
    return zstd.decompress(frame)


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_compressed_upload_reads_back_every_way(channel: grpc.aio.Channel) -> None:
    digest, data = compressible(3 * 1024 * 1024 + 77, 1)
    frame = zstd.compress(data)
    assert len(frame) < len(data) // 10
    # Bazel's 16 KiB messages of the compressed stream; committed_size counts them.
    assert await write(channel, messages(upload_name(digest), frame)) == len(frame)
    plain = bs_pb2.ReadRequest(resource_name=format_read_name("", digest))
    stream = bs_grpc.ByteStreamStub(channel).Read(plain)
    assert b"".join([r.data async for r in stream]) == data
    assert await read(channel, digest) == data
    assert await read(channel, digest, offset=1_000_000) == data[1_000_000:]
    assert await read(channel, digest, offset=len(data)) == b""
    assert await code_of(read(channel, digest, limit=10)) == grpc.StatusCode.INVALID_ARGUMENT
    # The empty blob, compressed both ways.
    empty = Digest.of(b"")
    assert await read(channel, empty) == b""
    assert await write(channel, messages(upload_name(empty), zstd.compress(b""))) == -1


async def test_wrong_or_broken_compressed_data_stores_nothing(channel: grpc.aio.Channel) -> None:
    digest, data = compressible(200_000, 2)
    cas = re_grpc.ContentAddressableStorageStub(channel)
    for payload, size in (
        (zstd.compress(data[:-1] + b"?"), 16 * 1024),  # another blob
        (zstd.compress(data)[:-5], 16 * 1024),  # a frame cut short
        (zstd.compress(data) + b"trailing", 16 * 1024),  # bytes after the frame
        # Not zstd at all, refused at its first message: in one message, since a client
        # still sending when the call ends may see grpc's "Internal error from Core" instead
        # of the server's status (a client-side race, about 1 in 25 here on uvloop).
        (data, len(data)),
    ):
        requests = messages(upload_name(digest), payload, size=size)
        assert await code_of(write(channel, requests)) == grpc.StatusCode.INVALID_ARGUMENT
    missing = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()])
    )
    assert list(missing.missing_blob_digests) == [digest.to_proto()]


async def test_a_decompression_bomb_stops_at_the_digests_size(channel: grpc.aio.Channel) -> None:
    """A 40 KB message inflating to 1 GiB, claimed to be a 1,000-byte blob: INVALID_ARGUMENT
    at once, without inflating it (the server would need a gigabyte otherwise)."""
    bomb = zstd.compress(bytes(1 << 30))
    assert len(bomb) < 64 * 1024
    digest = Digest(Digest.of(b"x").hash, 1000)
    with anyio.fail_after(10), pytest.raises(grpc.aio.AioRpcError) as caught:
        await write(channel, messages(upload_name(digest), bomb, size=len(bomb)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the 1000 bytes" in (caught.value.details() or "")
    # In a batch too.
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[Request(digest=digest.to_proto(), data=bomb[:50_000], compressor=ZSTD)]
        )
    )
    assert response.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_an_upload_of_a_stored_blob_answers_early_with_minus_one(
    channel: grpc.aio.Channel,
) -> None:
    digest, data = compressible(4 * 1024 * 1024, 3)
    frame = zstd.compress(data)
    await write(channel, messages(upload_name(digest), frame))
    requests = messages(upload_name(digest), frame, size=4096)

    async def slowly() -> AsyncIterator[bs_pb2.WriteRequest]:
        for request in requests:
            yield request
            await anyio.sleep(0.05)  # time for the existence lookup to answer

    with anyio.fail_after(10):
        response = await bs_grpc.ByteStreamStub(channel).Write(slowly())
    assert response.committed_size == -1


async def test_a_compressed_upload_resumes_after_query_write_status(
    channel: grpc.aio.Channel,
) -> None:
    digest, data = compressible(2 * 1024 * 1024, 4)
    frame = zstd.compress(data)
    name = upload_name(digest)
    half = len(frame) // 2
    first = messages(name, frame[:half], size=8192, finish=False)
    assert await write(channel, first) == half  # ended without finish_write: parked
    stub = bs_grpc.ByteStreamStub(channel)
    status = await stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == half
    assert not status.complete
    rest = messages(name, frame[half:], size=8192, start=half)
    assert await write(channel, rest) == len(frame)
    assert await read(channel, digest) == data


async def test_compressed_batches(channel: grpc.aio.Channel) -> None:
    capabilities = await re_grpc.CapabilitiesStub(channel).GetCapabilities(
        re_pb2.GetCapabilitiesRequest()
    )
    cache = capabilities.cache_capabilities
    assert list(cache.supported_compressors) == [ZSTD]
    assert list(cache.supported_batch_update_compressors) == [ZSTD]
    big, small = compressible(100_000, 5), compressible(100, 6)
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                Request(digest=d.to_proto(), data=zstd.compress(b), compressor=ZSTD)
                for d, b in (big, small)
            ]
        )
    )
    assert [r.status.code for r in response.responses] == [0, 0]
    read_request = re_pb2.BatchReadBlobsRequest(
        digests=[big[0].to_proto(), small[0].to_proto()], acceptable_compressors=[ZSTD]
    )
    answers = (await cas.BatchReadBlobs(read_request)).responses
    assert answers[0].compressor == ZSTD
    assert zstd.decompress(answers[0].data) == big[1]
    assert answers[1].compressor == re_pb2.Compressor.IDENTITY  # too small to gain
    assert answers[1].data == small[1]
    plain = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[big[0].to_proto()]))
    assert plain.responses[0].compressor == re_pb2.Compressor.IDENTITY
    assert plain.responses[0].data == big[1]
    # Another compressor is refused per blob, naming it.
    refused = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                Request(digest=big[0].to_proto(), data=big[1], compressor=re_pb2.Compressor.BROTLI)
            ]
        )
    )
    assert "brotli" in refused.responses[0].status.message


async def test_compression_over_a_redis_index(tmp_path: Path, redis_server: RedisServer) -> None:
    index = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False),
        RedisProvider(f"redis://127.0.0.1:{redis_server.port}/6"),
        prefix=f"zstd-{uuid.uuid4().hex[:8]}",
    )
    async with (
        CasServer(index, MemoryActionCache(), address="127.0.0.1:0") as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        await test_a_compressed_upload_reads_back_every_way(channel)
        await test_compressed_batches(channel)


async def test_the_client_moves_large_blobs_compressed() -> None:
    digest, data = compressible(5 * 1024 * 1024, 7)
    async with memory_server() as server:
        async with CasClient(f"grpc://{server.target}", compressor="zstd") as client:
            await client.upload_blobs({digest: data})
            assert 0 < client.bytes_sent < len(data) // 10, "the upload was not compressed"
            assert await client.download_blobs([digest]) == {digest: data}
            assert 0 < client.bytes_received < len(data) // 10
        assert await read_all(server.storage, NO_CONTEXT, digest) == data
        with pytest.raises(UnsupportedFeature, match="brotli is not supported"):
            CasClient(f"grpc://{server.target}", compressor="brotli")


async def test_blobs_compressed_at_rest_take_less_disk_and_are_served_as_stored(
    tmp_path: Path,
) -> None:
    """`serve --compress-at-rest`: a compressible blob's file is a fraction of it; a
    compressed read from the start sends that file's bytes as they are (no compression work),
    an identity read decompresses them, from any offset."""
    digest, data = compressible(3 * 1024 * 1024, 8)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    flags = ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
             "--compress-at-rest", "--no-fsync"]  # fmt: skip
    process, target, description = await anyio.to_thread.run_sync(start, flags, env)
    try:
        assert "zstd files in" in description
        async with grpc.aio.insecure_channel(target) as channel:
            await write(channel, messages(upload_name(digest), zstd.compress(data)))
            stored = tmp_path / "data" / "cas-zstd" / "sha256" / digest.hash[:2]
            stored_file = stored / f"{digest.hash}.{digest.size_bytes}"
            on_disk = await anyio.Path(stored_file).read_bytes()
            assert len(on_disk) < len(data) // 10
            request = bs_pb2.ReadRequest(resource_name=format_read_name("", digest, "zstd"))
            frame = b"".join([r.data async for r in bs_grpc.ByteStreamStub(channel).Read(request)])
            assert frame == on_disk, "the compressed read was not the stored frame"
            plain = bs_pb2.ReadRequest(
                resource_name=format_read_name("", digest), read_offset=1_000_001, read_limit=7
            )
            chunks = [r.data async for r in bs_grpc.ByteStreamStub(channel).Read(plain)]
            assert b"".join(chunks) == data[1_000_001:1_000_008]
            assert await read(channel, digest, offset=5) == data[5:]
    finally:
        await anyio.to_thread.run_sync(stop, process, signal.SIGTERM)
