"""SplitBlob and SpliceBlob with FastCDC 2020: REAPI's test vectors, streaming cuts equal to
whole-buffer cuts, and the RPCs over gRPC on disk, memory and tiered servers (the ``channel``
fixture) and over a Redis index."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.chunking import FastCdcParams, chunks_of
from asynccas.client import CasClient
from asynccas.client.caches import ClientCaches
from asynccas.digest import Digest
from asynccas.errors import DigestMismatch, NotFound
from asynccas.index.redis import RedisIndex
from asynccas.redis_provider import RedisProvider
from asynccas.resource_names import format_write_name
from asynccas.server.app import CasServer
from asynccas.server.split_splice import SplitCache, splice_blob, split_blob
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import Storage, contains, missing_digests, put_chunks, read_all
from asynccas.storage.context import NO_CONTEXT, RequestContext
from asynccas.storage.disk import DiskStorage
from asynccas.storage.forwarding import ForwardingStorage
from asynccas.storage.memory import MemoryStorage
from tests.servers import memory_server
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.anyio

VECTORS_DIR = Path(__file__).parent / "data" / "fastcdc2020"
VECTORS = VECTORS_DIR / "fastcdc2020_test_vectors.txt"


def vectors() -> dict[int, list[tuple[int, int, str]]]:
    by_seed: dict[int, list[tuple[int, int, str]]] = {}
    seed = 0
    for line in VECTORS.read_text().splitlines():
        if line.startswith("# Seed:"):
            seed = int(line.split(":")[1])
            by_seed[seed] = []
        elif line and not line.startswith("#"):
            offset, length, sha256, _ = line.split()
            by_seed[seed].append((int(offset), int(length), sha256))
    return by_seed


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("seed", [0, 666])
async def test_fastcdc_reproduces_the_reapi_test_vectors(seed: int) -> None:
    """min 4096 / avg 16384 as the vectors; their max is 65535, ours avg * 4 = 65536, which
    no chunk of this input reaches. Fed in 1,000-byte pieces, as a stream arrives."""
    data = (VECTORS_DIR / "SekienAkashita.jpg").read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith("d9e749d9")
    cut = [c async for c in chunks_of(pieces(data, 1000), FastCdcParams(16384, seed))]
    offsets = [sum(map(len, cut[:i])) for i in range(len(cut))]
    got = [(o, len(c), hashlib.sha256(c).hexdigest()) for o, c in zip(offsets, cut, strict=True)]
    assert got == vectors()[seed]


@pytest.mark.parametrize("piece", [1, 65_537, 1 << 20, 9 << 20])
async def test_streamed_cuts_equal_cuts_of_the_whole_blob(piece: int) -> None:
    data = random.Random(piece).randbytes(12 << 20) if piece > 1 else os.urandom(300_000)
    params = FastCdcParams(64 * 1024)
    whole = [bytes(c.data) for c in params.chunker().cut_buf(data)]
    streamed = [c async for c in chunks_of(pieces(data, piece), params)]
    assert streamed == whole
    assert all(params.min_size <= len(c) <= params.max_size for c in whole[:-1])


def upload(data: bytes) -> tuple[Digest, list[tuple[Digest, bytes]]]:
    chunks = [bytes(c.data) for c in FastCdcParams().chunker().cut_buf(data)]
    return Digest.of(data), [(Digest.of(c), c) for c in chunks]


async def store(channel: grpc.aio.Channel, blobs: list[tuple[Digest, bytes]]) -> None:
    """Each blob by one ByteStream write (chunks can be larger than the test server's batch
    limit)."""
    stub = bs_grpc.ByteStreamStub(channel)
    for digest, data in blobs:
        name = format_write_name("", str(uuid.uuid4()), digest)
        request = bs_pb2.WriteRequest(resource_name=name, data=data, finish_write=True)
        assert (await stub.Write(iter([request]))).committed_size == digest.size_bytes


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_split_and_splice_over_grpc(channel: grpc.aio.Channel) -> None:
    capabilities = await re_grpc.CapabilitiesStub(channel).GetCapabilities(
        re_pb2.GetCapabilitiesRequest()
    )
    cache = capabilities.cache_capabilities
    assert cache.split_blob_support
    assert cache.splice_blob_support
    assert cache.fast_cdc_2020_params.avg_chunk_size_bytes == 512 * 1024
    cas = re_grpc.ContentAddressableStorageStub(channel)
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest, chunks = upload(data)
    assert len(chunks) > 2

    # Splice: the chunks first, then the blob they make.
    splice = re_pb2.SpliceBlobRequest(
        blob_digest=digest.to_proto(), chunk_digests=[d.to_proto() for d, _ in chunks]
    )
    code, details = await code_of(cas.SpliceBlob(splice))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "not in the CAS" in details
    await store(channel, chunks)
    wrong = Digest(Digest.of(b"other").hash, digest.size_bytes)
    code, details = await code_of(
        cas.SpliceBlob(
            re_pb2.SpliceBlobRequest(
                blob_digest=wrong.to_proto(), chunk_digests=splice.chunk_digests
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not make" in details
    short = re_pb2.SpliceBlobRequest(
        blob_digest=digest.to_proto(), chunk_digests=splice.chunk_digests[1:]
    )
    code, details = await code_of(cas.SpliceBlob(short))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "add up to" in details
    response = await cas.SpliceBlob(splice)
    assert response.blob_digest == digest.to_proto()
    assert not (
        await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()]))
    ).missing_blob_digests
    found = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[wrong.to_proto()])
    )
    assert list(found.missing_blob_digests) == [wrong.to_proto()], "a wrong splice was stored"

    # Split: the same cuts back, every chunk stored.
    split = await cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=digest.to_proto()))
    assert [Digest.from_proto(d) for d in split.chunk_digests] == [d for d, _ in chunks]
    assert split.chunking_function == re_pb2.ChunkingFunction.FAST_CDC_2020

    # A blob uploaded whole is split into chunks that are then stored.
    other = os.urandom(2 * 1024 * 1024)
    other_digest, other_chunks = upload(other)
    await store(channel, [(other_digest, other)])
    split = await cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=other_digest.to_proto()))
    assert [Digest.from_proto(d) for d in split.chunk_digests] == [d for d, _ in other_chunks]
    missing = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=split.chunk_digests)
    )
    assert not missing.missing_blob_digests
    code, _ = await code_of(cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=wrong.to_proto())))
    assert code == grpc.StatusCode.NOT_FOUND
    rep_max = re_pb2.SplitBlobRequest(
        blob_digest=digest.to_proto(), chunking_function=re_pb2.ChunkingFunction.REP_MAX_CDC
    )
    code, details = await code_of(cas.SplitBlob(rep_max))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "REP_MAX_CDC" in details


async def test_split_and_splice_over_a_redis_index(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    index = RedisIndex(
        DiskStorage(tmp_path / "data", fsync=False),
        RedisProvider(f"redis://127.0.0.1:{redis_server.port}/7"),
        prefix=f"split-{uuid.uuid4().hex[:8]}",
    )
    async with (
        CasServer(index, MemoryActionCache(), address="127.0.0.1:0") as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        await test_split_and_splice_over_grpc(channel)


async def test_a_large_splice_streams_in_bounded_memory(tmp_path: Path) -> None:
    """256 MiB spliced from one 4 MiB chunk named 64 times: Python allocates a few chunks'
    worth at most, not the blob."""
    chunk = os.urandom(4 * 1024 * 1024)
    chunk_digest = Digest.of(chunk)
    hasher = hashlib.sha256()
    for _ in range(64):
        hasher.update(chunk)
    digest = Digest(hasher.hexdigest(), 64 * len(chunk))
    async with DiskStorage(tmp_path / "data", fsync=False) as storage:
        assert await storage.bulk_update(NO_CONTEXT, [(chunk_digest, chunk)]) == [None]
        tracemalloc.start()
        try:
            await splice_blob(storage, NO_CONTEXT, digest, [chunk_digest] * 64)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 24 * 1024 * 1024, f"the splice held {peak >> 20} MiB"
        assert await contains(storage, NO_CONTEXT, digest)
        with pytest.raises(DigestMismatch):
            await splice_blob(
                storage, NO_CONTEXT, Digest(digest.hash[::-1], 4 << 20), [chunk_digest]
            )
        with pytest.raises(NotFound):
            await splice_blob(
                storage, NO_CONTEXT, Digest.of(b"ab"), [Digest.of(b"a"), Digest.of(b"b")]
            )
        assert await read_all(storage, NO_CONTEXT, chunk_digest) == chunk


async def test_the_client_moves_an_edited_file_by_its_changed_chunks(tmp_path: Path) -> None:
    """A 12 MiB file, then the same with 100 KB changed in the middle: the second upload
    sends only the chunks around the edit and splices; a client whose cache holds the first
    version's chunks downloads only those too."""
    first = bytearray(random.Random(1).randbytes(12 << 20))
    second = bytearray(first)
    second[6 << 20 : (6 << 20) + 100_000] = os.urandom(100_000)
    for name, data in (("first", first), ("second", second)):
        await anyio.Path(tmp_path / name).write_bytes(bytes(data))
    async with memory_server() as server:
        target = f"grpc://{server.target}"
        async with CasClient(target) as uploader:
            assert uploader.fast_cdc == FastCdcParams()
            first_digest = await uploader.upload_file(tmp_path / "first")
            sent_first = uploader.bytes_sent
            second_digest = await uploader.upload_file(tmp_path / "second")
            sent_second = uploader.bytes_sent - sent_first
        assert sent_first >= len(first)
        assert sent_second < 3 << 20, f"the edited file sent {sent_second >> 10} KiB"
        assert await read_all(server.storage, NO_CONTEXT, second_digest) == bytes(second)
        async with CasClient(target, cache=ClientCaches(tmp_path / "cache")) as downloader:
            await downloader.download_file(first_digest, tmp_path / "first-copy")
            received_first = downloader.bytes_received
            await downloader.download_file(second_digest, tmp_path / "second-copy")
            received_second = downloader.bytes_received - received_first
        assert await anyio.Path(tmp_path / "second-copy").read_bytes() == bytes(second)
        assert await anyio.Path(tmp_path / "first-copy").read_bytes() == bytes(first)
        assert received_first >= len(first)
        assert received_second < 3 << 20, f"the edited file took {received_second >> 10} KiB"


async def test_unknown_enum_values_are_invalid_arguments_naming_them(
    channel: grpc.aio.Channel,
) -> None:
    """A chunking function or compressor number this server does not know is the client's
    mistake, named, not an INTERNAL error (looking its name up raised)."""
    cas = re_grpc.ContentAddressableStorageStub(channel)
    digest = Digest.of(b"unknown enums")
    code, details = await code_of(
        cas.SplitBlob(
            re_pb2.SplitBlobRequest(blob_digest=digest.to_proto(), chunking_function=99)  # type: ignore[arg-type]
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "value 99" in details
    response = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=digest.to_proto(),
                    data=b"unknown enums",
                    compressor=42,  # type: ignore[arg-type]
                )
            ]
        )
    )
    assert response.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "value 42" in response.responses[0].status.message


class CountingReads(ForwardingStorage):
    """A storage that counts reads of each blob: tells a split that read its blob from one
    that did not."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.reads: Counter[Digest] = Counter()

    def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        self.reads[digest] += 1
        return super().get(ctx, digest, offset, limit)


async def test_a_blob_split_before_is_answered_from_its_chunk_list() -> None:
    """SplitBlob read and hashed the whole blob on every call; a repeat now asks only whether
    the chunks are still stored, and splits again when one is not."""
    memory = MemoryStorage(64 << 20)
    storage = CountingReads(memory)
    data = random.Random(5).randbytes(3 << 20)
    digest = Digest.of(data)

    async def whole() -> AsyncIterator[bytes]:
        yield data

    await put_chunks(storage, NO_CONTEXT, digest, whole())
    cache, params = SplitCache(1000), FastCdcParams()
    first = await split_blob(storage, NO_CONTEXT, digest, params, cache)
    assert len(first) > 2
    assert storage.reads[digest] == 1
    assert await split_blob(storage, NO_CONTEXT, digest, params, cache) == first
    assert storage.reads[digest] == 1, "the blob was read again"
    await memory.delete([first[1]])  # evicted, say
    assert await split_blob(storage, NO_CONTEXT, digest, params, cache) == first
    assert storage.reads[digest] == 2
    assert await missing_digests(memory, NO_CONTEXT, first) == [], "the chunk was not restored"


def test_the_split_cache_keeps_the_most_recent_chunk_lists_within_its_bound() -> None:
    blobs = [Digest.of(bytes([n])) for n in range(4)]
    chunks = [[Digest.of(bytes([n, c])) for c in range(3)] for n in range(4)]
    cache = SplitCache(7)
    cache.add(blobs[0], chunks[0])
    cache.add(blobs[1], chunks[1])
    assert cache.get(blobs[0]) == chunks[0]  # now the most recent
    cache.add(blobs[2], chunks[2])  # 9 chunks > 7: the least recent list goes
    assert cache.get(blobs[1]) is None
    assert cache.get(blobs[0]) == chunks[0]
    assert cache.get(blobs[2]) == chunks[2]
    cache.add(blobs[3], [chunks[3][0]] * 8)  # larger than the whole bound: not kept
    assert cache.get(blobs[3]) is None
    assert cache.get(blobs[2]) == chunks[2]
