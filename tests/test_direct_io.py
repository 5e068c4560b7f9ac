"""O_DIRECT writes of large blobs: exact bytes for every size and chunking, and the fallback."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest

from asynccas.storage.base import contains
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.direct_io import ALIGNMENT, BUFFER_SIZE, DirectFile, open_direct
from asynccas.storage.disk import DiskStorage
from asynccas.testing import blob

pytestmark = pytest.mark.anyio

SIZES = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, BUFFER_SIZE - 1, BUFFER_SIZE,
         BUFFER_SIZE + 1, 3 * BUFFER_SIZE + 12_345]  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunk", [1000, 65_536, 1 << 20, 5 << 20])
def test_direct_file_writes_exactly_the_bytes_given(tmp_path: Path, size: int, chunk: int) -> None:
    data = random.Random(size ^ chunk).randbytes(size)
    path = tmp_path / "blob"
    handle = open_direct(str(path))
    assert isinstance(handle, DirectFile), "this machine's temp directory supports O_DIRECT"
    for start in range(0, size, chunk):
        handle.write(data[start : start + chunk])
    handle.flush()
    os.fsync(handle.fileno())
    assert path.read_bytes() == data, "flush must write everything, for the fsync after it"
    handle.close()
    handle.close()  # idempotent, as the writers' error paths rely on
    assert path.read_bytes() == data


def test_file_systems_without_o_direct_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside the real test above: a file system that refuses O_DIRECT (EINVAL)."""
    real_open = os.open

    def refusing_open(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing_open)
    assert open_direct(str(tmp_path / "blob")) is None


def test_file_systems_refusing_o_direct_at_write_time_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside the real test above: EINVAL from a direct write (some FUSE file systems)."""
    real_write = os.write

    def refusing_write(fd: int, data: bytes) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    data = random.Random(5).randbytes(2 * BUFFER_SIZE + 99)
    handle = open_direct(str(tmp_path / "blob"))
    assert handle is not None
    monkeypatch.setattr(os, "write", refusing_write)
    handle.write(data)
    handle.close()
    monkeypatch.undo()
    assert (tmp_path / "blob").read_bytes() == data


async def test_disk_storage_streams_large_blobs_around_the_page_cache(tmp_path: Path) -> None:
    digest, data = blob(BUFFER_SIZE * 2 + 777, 7)
    async with DiskStorage(tmp_path, fsync=True, direct_io_above=1 << 20) as storage:
        writer = await storage.put(NO_CONTEXT, digest)
        await writer.write(data[: 1 << 20])  # the temp file is made with the first data
        assert isinstance(writer._handle, DirectFile)  # type: ignore[attr-defined]
        for start in range(1 << 20, len(data), 1 << 20):
            await writer.write(data[start : start + (1 << 20)])
        await writer.commit()
        assert storage.path_for(digest).read_bytes() == data
        small, small_data = blob(1000, 8)
        small_writer = await storage.put(NO_CONTEXT, small)
        await small_writer.write(small_data)
        await small_writer.flush()
        assert not isinstance(small_writer._handle, DirectFile)  # type: ignore[attr-defined]
        await small_writer.commit()
        assert await contains(storage, NO_CONTEXT, small)
