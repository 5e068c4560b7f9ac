"""ByteStream Read/Write/QueryWriteStatus over a real grpc.aio server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.digest import Digest
from asynccas.index.sqlite import SqliteIndex
from asynccas.resource_names import format_read_name, format_write_name
from asynccas.server.app import CasServer
from asynccas.storage.base import contains
from asynccas.storage.context import NO_CONTEXT
from asynccas.testing import blob

pytestmark = pytest.mark.anyio


def write_requests(
    name: str, data: bytes, chunk: int = 64 * 1024, *, offset: int = 0, finish: bool = True
) -> list[bs_pb2.WriteRequest]:
    requests = []
    for start in range(offset, max(len(data), offset + 1), chunk):
        piece = data[start : start + chunk]
        requests.append(
            bs_pb2.WriteRequest(
                resource_name=name if start == offset else "",
                write_offset=start,
                data=piece,
                finish_write=finish and start + chunk >= len(data),
            )
        )
    return requests


async def write(
    channel: grpc.aio.Channel, requests: Sequence[bs_pb2.WriteRequest]
) -> bs_pb2.WriteResponse:
    async def stream() -> AsyncIterator[bs_pb2.WriteRequest]:
        for request in requests:
            yield request

    return await bs_grpc.ByteStreamStub(channel).Write(stream())


async def read(channel: grpc.aio.Channel, name: str, offset: int = 0, limit: int = 0) -> bytes:
    request = bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    return b"".join([r.data async for r in bs_grpc.ByteStreamStub(channel).Read(request)])


async def expect_error(code: grpc.StatusCode, awaitable: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


def upload_name(digest: Digest, instance: str = "") -> str:
    return format_write_name(instance, str(uuid.uuid4()), digest)


async def test_write_then_read_large_blob_in_chunks(channel: grpc.aio.Channel) -> None:
    digest, data = blob(3 * 1024 * 1024 + 7, 1)
    response = await write(channel, write_requests(upload_name(digest, "ci/main"), data))
    assert response.committed_size == len(data)
    name = format_read_name("ci/main", digest)
    assert await read(channel, name) == data
    assert await read(channel, name, 1000, 100) == data[1000:1100]
    assert await read(channel, name, len(data)) == b""
    # Blobs are shared across instances: the content is the same whoever asks.
    assert await read(channel, format_read_name("", digest)) == data


async def test_read_errors(channel: grpc.aio.Channel) -> None:
    digest, data = blob(1000, 2)
    await write(channel, write_requests(upload_name(digest), data))
    name = format_read_name("", digest)
    assert "read_offset" in await expect_error(
        grpc.StatusCode.OUT_OF_RANGE, read(channel, name, -1)
    )
    await expect_error(grpc.StatusCode.OUT_OF_RANGE, read(channel, name, 1001))
    await expect_error(grpc.StatusCode.OUT_OF_RANGE, read(channel, name, 0, -5))
    absent = format_read_name("", blob(10, 3)[0])
    await expect_error(grpc.StatusCode.NOT_FOUND, read(channel, absent))
    for hostile in [
        f"blobs/../../../../etc/passwd/{digest.size_bytes}",
        f"blobs/{digest.hash.upper()}/1000",
        f"/blobs/{digest.hash}/1000",
        f"blobs/{digest.hash}/-1",
        f"blobs/{digest.hash}/1000/extra",
        f"a/uploads/b/blobs/{digest.hash}/1000",
        f"compressed-blobs/deflate/{digest.hash}/1000",  # a compressor it does not offer
        "",
    ]:
        await expect_error(grpc.StatusCode.INVALID_ARGUMENT, read(channel, hostile))
    assert await read(channel, format_read_name("", Digest.empty())) == b""


async def test_write_rejects_mismatches_and_stores_nothing(channel: grpc.aio.Channel) -> None:
    digest, data = blob(200_000, 4)
    corrupt = data[:-1] + bytes([data[-1] ^ 1])
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        write(channel, write_requests(upload_name(digest), corrupt)),
    )
    assert "hashes to" in details
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        write(channel, write_requests(upload_name(digest), data + b"extra")),
    )
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        write(channel, write_requests(upload_name(digest), data[:-1])),
    )
    requests = write_requests(upload_name(digest), data)
    requests[1].write_offset += 1
    assert "write_offset" in await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, write(channel, requests)
    )
    await expect_error(grpc.StatusCode.INVALID_ARGUMENT, write(channel, []))
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        write(channel, write_requests("uploads/x/blobs/zz/1", b"z")),
    )
    await expect_error(grpc.StatusCode.NOT_FOUND, read(channel, format_read_name("", digest)))


async def test_write_returns_early_when_blob_exists(channel: grpc.aio.Channel) -> None:
    digest, data = blob(100_000, 5)
    await write(channel, write_requests(upload_name(digest), data))
    # Only the first chunk is sent; the server answers at once with the full size.
    response = await write(channel, write_requests(upload_name(digest), data)[:1])
    assert response.committed_size == digest.size_bytes
    empty = await write(channel, write_requests(upload_name(Digest.empty()), b""))
    assert empty.committed_size == 0


async def test_resumable_write_across_streams(channel: grpc.aio.Channel) -> None:
    digest, data = blob(500_000, 6)
    name = upload_name(digest)
    stub = bs_grpc.ByteStreamStub(channel)
    status = await stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (0, False)
    first_part = write_requests(name, data[:200_000], finish=False)
    response = await write(channel, first_part)
    assert response.committed_size == 200_000
    status = await stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (200_000, False)
    # Not yet visible.
    await expect_error(grpc.StatusCode.NOT_FOUND, read(channel, format_read_name("", digest)))
    # Resuming at a wrong offset is refused and names the right one. (One message: a client
    # still sending when the refusal arrives may see its own send fail, INTERNAL, instead.)
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        write(channel, write_requests(name, data, offset=100)[:1]),
    )
    assert "200000" in details
    await write(channel, write_requests(name, data[:200_000], finish=False))
    response = await write(channel, write_requests(name, data, offset=200_000))
    assert response.committed_size == len(data)
    status = await stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (len(data), True)
    assert await read(channel, format_read_name("", digest)) == data


async def test_concurrent_writes_of_one_blob(
    server: CasServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    digest, data = blob(256 * 1024, 7)
    sizes: list[int] = []

    async def one_writer() -> None:
        response = await write(channel, write_requests(upload_name(digest), data, 32 * 1024))
        sizes.append(response.committed_size)

    async with anyio.create_task_group() as tasks:
        for _ in range(200):
            tasks.start_soon(one_writer)
    assert sizes == [len(data)] * 200
    assert await read(channel, format_read_name("", digest)) == data
    if isinstance(server.storage, SqliteIndex):
        assert await server.storage.get_total_size() == len(data), "one copy indexed"
        files = await anyio.to_thread.run_sync(lambda: list((tmp_path / "data").rglob(digest.hash)))
        assert len(files) == 1
        leftovers = await anyio.to_thread.run_sync(
            lambda: list((tmp_path / "data" / "tmp").iterdir())
        )
        assert leftovers == []


async def test_cancelled_write_leaves_nothing(
    server: CasServer, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    digest, data = blob(1024 * 1024, 8)
    halfway = anyio.Event()

    async def stalling_stream() -> AsyncIterator[bs_pb2.WriteRequest]:
        requests = write_requests(upload_name(digest), data)
        for request in requests[: len(requests) // 2]:
            yield request
        halfway.set()
        await anyio.sleep_forever()

    call = bs_grpc.ByteStreamStub(channel).Write(stalling_stream())
    await halfway.wait()
    await anyio.sleep(0.2)  # let the server consume what was sent
    assert call.cancel()  # the client goes away mid-upload
    temp_dir = tmp_path / "data" / "tmp"

    def leftovers() -> bool:
        return temp_dir.exists() and any(temp_dir.iterdir())

    async def cleaned_up() -> bool:
        busy = bool(server.uploads._active or server.uploads._parked)
        return not busy and not await anyio.to_thread.run_sync(leftovers)

    with anyio.fail_after(5):  # cleanup is prompt, not left to the idle timeout
        while not await cleaned_up():  # noqa: ASYNC110 - polling files; no event to wait on
            await anyio.sleep(0.02)
    assert not await contains(server.storage, NO_CONTEXT, digest)
    if isinstance(server.storage, SqliteIndex):
        assert await server.storage.get_total_size() == 0, "no index entry"


async def test_query_write_status_of_stored_blob(channel: grpc.aio.Channel) -> None:
    digest, data = blob(10, 9)
    await re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)]
        )
    )
    status = await bs_grpc.ByteStreamStub(channel).QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=upload_name(digest))
    )
    assert (status.committed_size, status.complete) == (10, True)
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        bs_grpc.ByteStreamStub(channel).QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name="uploads/../blobs/x/1")
        ),
    )
