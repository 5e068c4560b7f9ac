"""The upload path: data gathered in memory within a bound, parked uploads holding bytes on disk
rather than in memory, and an upload's end made all-or-nothing across blob store and index."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.digest import Digest
from asynccas.errors import BlobNotFound, StorageFull
from asynccas.index.sqlite import SqliteIndex
from asynccas.resource_names import parse_write_name
from asynccas.server.app import CasServer
from asynccas.server.uploads import UploadSessions
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import WRITE_BUFFERS, Storage, contains, put_chunks
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.direct_io import DirectFile
from asynccas.storage.disk import DiskStorage
from asynccas.storage.size_differentiated import SizeDifferentiatedStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from asynccas.testing import blob

pytestmark = pytest.mark.anyio


async def chunks(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def temp_files(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir())


def tiered_index(root: Path) -> SqliteIndex:
    """The default layout: small blobs as SQLite rows, larger ones as files, one index."""
    small = SqliteBlobStorage(root / "small.sqlite", max_blob_size=64 * 1024, fsync=False)
    blobs = SizeDifferentiatedStorage(small, DiskStorage(root, fsync=False), limit=64 * 1024)
    return SqliteIndex(blobs, root / "index.sqlite")


async def test_messages_are_gathered_and_written_out_in_bounded_pieces(tmp_path: Path) -> None:
    digest, data = blob(600 * 1024, 1)
    async with DiskStorage(tmp_path, fsync=False) as storage:
        writer = await storage.put(NO_CONTEXT, digest)
        before = WRITE_BUFFERS.in_use
        await writer.write(data[:16384])
        assert temp_files(tmp_path) == [], "nothing is written for the first small message"
        assert WRITE_BUFFERS.in_use == before + 16384
        async for chunk in chunks(data[16384:]):
            await writer.write(chunk)
            assert WRITE_BUFFERS.in_use - before < WRITE_BUFFERS.limit_per_writer
        await writer.commit()
        assert WRITE_BUFFERS.in_use == before
        assert storage.path_for(digest).read_bytes() == data
        assert temp_files(tmp_path) == []


async def test_an_upload_parked_for_later_holds_its_bytes_on_disk(tmp_path: Path) -> None:
    """A parked upload used to keep what it had received in buffers (8 MiB per large upload)
    and a descriptor open."""
    digest, data = blob(20 * 1024 * 1024, 2)
    async with DiskStorage(tmp_path, fsync=False, direct_io_above=1 << 20) as storage:
        uploads = UploadSessions(storage)
        resource = parse_write_name(f"uploads/u1/blobs/{digest.hash}/{digest.size_bytes}")
        upload = await uploads.begin(NO_CONTEXT, resource, 0)
        before = WRITE_BUFFERS.in_use
        async for chunk in chunks(data[: 5 * 1024 * 1024 + 100]):
            await upload.writer.write(chunk)
        handle = upload.writer._handle  # type: ignore[attr-defined]
        assert isinstance(handle, DirectFile)
        await uploads.park(upload)
        assert WRITE_BUFFERS.in_use == before - 0
        assert handle.buffered_bytes == 0, "the device-write buffers were released"
        assert upload.writer._handle is None, "a parked upload holds no descriptor"  # type: ignore[attr-defined]
        (temp,) = temp_files(tmp_path)
        assert temp.stat().st_size == 5 * 1024 * 1024 + 100
        resumed = await uploads.begin(NO_CONTEXT, resource, upload.writer.committed_size)
        async for chunk in chunks(data[5 * 1024 * 1024 + 100 :], 1 << 20):
            await resumed.writer.write(chunk)
        await resumed.writer.commit()
        await uploads.end(resumed, abort=False)
        assert storage.path_for(digest).read_bytes() == data
        assert temp_files(tmp_path) == []


def make_index_inserts_fail(root: Path) -> None:
    """Make the real index refuse new rows the way a full disk does."""
    with sqlite3.connect(root / "index.sqlite") as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON blobs"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )


def let_index_inserts_succeed(root: Path) -> None:
    with sqlite3.connect(root / "index.sqlite") as conn:
        conn.execute("DROP TRIGGER refuse")


async def blob_is_stored(storage: Storage, digest: Digest) -> bool:
    return await contains(storage, NO_CONTEXT, digest)


@pytest.mark.parametrize("size", [1000, 100_000], ids=["small-tier row", "file"])
async def test_a_blob_the_index_cannot_record_is_not_left_stored(tmp_path: Path, size: int) -> None:
    """Publishing and indexing succeed or fail together: a blob stored but not indexed is
    served by reads, called missing by FindMissingBlobs and never evicted."""
    digest, data = blob(size, 3)
    async with tiered_index(tmp_path) as index:
        await anyio.to_thread.run_sync(make_index_inserts_fail, tmp_path)
        with pytest.raises(StorageFull):
            await index.commit_write(digest, chunks(data))
        assert not await blob_is_stored(index.storage, digest)
        assert not await index.has_blob(digest)
        assert temp_files(tmp_path) == []
        await anyio.to_thread.run_sync(let_index_inserts_succeed, tmp_path)
        await index.commit_write(digest, chunks(data))
        assert await blob_is_stored(index.storage, digest)
        assert await index.has_blob(digest)
        assert await index.get_total_size() == size


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MiB ext4 file system (a loop mount), to fill up: it takes root."""
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    mount.mkdir()
    with image.open("wb") as out:
        out.truncate(48 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    if made.returncode or os.geteuid() != 0:
        pytest.skip("needs mkfs.ext4 and root to loop-mount a small file system")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_disk_full_during_a_large_upload_is_resource_exhausted(
    small_disk: Path, tmp_path: Path
) -> None:
    """A >16 MiB upload (written with O_DIRECT) onto a full disk failed with INTERNAL
    ("BufferError: cannot close exported pointers exist") and left its temp file behind."""
    digest, data = blob(64 * 1024 * 1024, 4)
    storage = SqliteIndex(DiskStorage(small_disk, fsync=False), tmp_path / "index.sqlite")
    async with CasServer(storage, MemoryActionCache(), address="127.0.0.1:0") as server:
        name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

        # The synchronous client reports the server's status when the server answers before
        # the stream is sent (grpc.aio's reports its own failure to send the next message).
        def upload() -> grpc.RpcError:
            def requests() -> Iterator[bs_pb2.WriteRequest]:
                step = 1024 * 1024
                for offset in range(0, len(data), step):
                    yield bs_pb2.WriteRequest(
                        resource_name=name, write_offset=offset,
                        data=data[offset : offset + step],
                        finish_write=offset + step >= len(data),
                    )  # fmt: skip

            with grpc.insecure_channel(server.target) as channel:
                try:
                    bs_grpc.ByteStreamStub(channel).Write(requests())
                except grpc.RpcError as exc:
                    return exc
            raise AssertionError("the upload onto a full disk succeeded")

        failed = await anyio.to_thread.run_sync(upload)
        assert failed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.details()
        assert "disk full" in (failed.details() or "")
        assert temp_files(small_disk) == [], "the failed upload's temp file was left behind"
        assert not await contains(storage, NO_CONTEXT, digest)


async def test_a_blob_evicted_while_it_is_read_is_still_read_whole(tmp_path: Path) -> None:
    """Reads keep to the descriptor they opened: an eviction mid-read changes nothing for
    them, and a blob gone before the read is NOT_FOUND, never a disk error."""
    digest, data = blob(3 * 1024 * 1024 + 5, 5)
    async with DiskStorage(tmp_path, fsync=False) as storage:
        await put_chunks(storage, NO_CONTEXT, digest, chunks(data, 1 << 20))
        parts = []
        reading = storage.get(NO_CONTEXT, digest)
        parts.append(await anext(reading))
        await anyio.to_thread.run_sync(storage.path_for(digest).unlink)  # evicted
        parts += [chunk async for chunk in reading]
        assert b"".join(parts) == data
        with pytest.raises(BlobNotFound):
            await anext(storage.get(NO_CONTEXT, digest))
