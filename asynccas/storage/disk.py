"""Blobs as files under a directory: ``cas/{function}/{hash[:2]}/{hash}``.

Writes go to ``tmp/`` (same filesystem), are hashed as they stream, optionally
fsynced, then hard-linked into place, so a reader never sees a partial blob and
concurrent writers of one digest leave exactly one file. Paths are derived only
from validated ``Digest`` values. Safe for several processes on one directory.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, ParamSpec, Protocol, TypeVar

import anyio

from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import BackendUnavailable, BlobNotFound, CasError, DigestMismatch, StorageFull
from asynccas.outages import outages
from asynccas.storage.base import (
    CHUNK_SIZE,
    BlobWriter,
    CommitsInThread,
    Deletable,
    Listable,
    Stageable,
    Storage,
    mask_of,
)
from asynccas.storage.context import RequestContext
from asynccas.storage.direct_io import open_direct
from asynccas.threads import in_thread

_READ_BATCH = 256  # files read per thread hop by bulk_read
DEFAULT_DIRECT_IO_ABOVE: Final = 16 * 1024 * 1024

P = ParamSpec("P")
T = TypeVar("T")


_DISK_OUTAGES: Final = outages("disk", "this machine")


@contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    """Translate OSError into asynccas errors once, at the backend boundary."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"disk full while trying to {action}") from exc
        if exc.errno == errno.EFBIG:
            raise StorageFull(f"file too large for the disk while trying to {action}") from exc
        _DISK_OUTAGES.failed(exc)
        raise BackendUnavailable(f"disk error while trying to {action}: {exc}") from exc
    _DISK_OUTAGES.succeeded()


def _read_up_to_at(fd: int, limit: int, offset: int) -> bytes:
    """``pread`` until ``limit`` bytes or end of file."""
    data = os.pread(fd, limit, offset)
    while len(data) < limit and (more := os.pread(fd, limit - len(data), offset + len(data))):
        data += more
    return data


def _read_up_to(fd: int, limit: int) -> bytes:
    """Read until ``limit`` bytes or end of file: one call locally, more on some network mounts."""
    data = os.read(fd, limit)
    while len(data) < limit and (more := os.read(fd, limit - len(data))):
        data += more
    return data


_in_thread: Final = in_thread


class DiskStorage(Storage, Stageable, Deletable, Listable):
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        direct_io_above: int = DEFAULT_DIRECT_IO_ABOVE,
    ) -> None:
        """``direct_io_above``: blobs larger than this many bytes are written around the page
        cache (see ``direct_io``); 0 writes every blob through it."""
        self.root = Path(root)
        self.fsync = fsync
        self.direct_io_above = direct_io_above
        self._cas = self.root / "cas"
        self._tmp = self.root / "tmp"

    def path_for(self, digest: Digest) -> Path:
        return self._cas / digest.function.lower_name / digest.hash[:2] / digest.hash

    async def start(self) -> None:
        with _disk_errors("create the storage directories"):
            await _in_thread(self._prepare_directories)

    def _prepare_directories(self) -> None:
        self._cas.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Temp files are named after their process; only dead processes' are garbage.
        for leftover in self._tmp.iterdir():
            pid = leftover.name.split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                leftover.unlink(missing_ok=True)

    def _has_blob_sync(self, digest: Digest) -> bool:
        return self.intact(self.path_for(digest), digest)

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = batch.digests
        with _disk_errors("check for blobs"):
            return await _in_thread(
                lambda: mask_of(batch, [d for d in set(digests) if not self._has_blob_sync(d)])
            )

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        # The first hop opens, checks and reads the first chunk, and for a blob of one chunk
        # (most of a build's) also closes: one thread hop per read instead of five. The size
        # is checked on the descriptor, so a blob evicted after the open is still read whole,
        # and one evicted before it is NOT_FOUND, never a disk error.
        with _disk_errors(f"read blob {digest}"):
            fd, chunk, remaining = await _in_thread(self._open_and_read, digest, offset, limit)
        try:
            if chunk:
                yield chunk
            position = offset + len(chunk)
            while remaining > 0:
                with _disk_errors(f"read blob {digest}"):
                    chunk = await _in_thread(os.pread, fd, min(CHUNK_SIZE, remaining), position)
                if not chunk:
                    raise BackendUnavailable(f"blob {digest} ended early on disk")
                remaining -= len(chunk)
                position += len(chunk)
                yield chunk
        finally:
            if fd >= 0:
                with anyio.CancelScope(shield=True):
                    await _in_thread(os.close, fd)

    def _open_and_read(self, digest: Digest, offset: int, limit: int) -> tuple[int, bytes, int]:
        """Open the blob's file and read its first chunk: (descriptor, or -1 once closed;
        the chunk; bytes still to read)."""
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        try:
            size = os.fstat(fd).st_size
            if size != digest.size_bytes:  # truncated by a crash or tampered with
                raise BlobNotFound(digest)
            end = size if limit == 0 else min(size, offset + limit)
            wanted = end - offset
            chunk = _read_up_to_at(fd, min(CHUNK_SIZE, wanted), offset)
            if len(chunk) < min(CHUNK_SIZE, wanted):
                raise BackendUnavailable(f"blob {digest} ended early on disk")
        except BaseException:
            os.close(fd)
            raise
        remaining = wanted - len(chunk)
        if remaining == 0:
            os.close(fd)
            fd = -1
        return fd, chunk, remaining

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        # Small blobs (batch RPCs, Directory messages): a whole chunk of files per thread
        # hop, chunks in parallel, instead of several hops per file.
        unique = list(dict.fromkeys(digests))
        chunks = [unique[i : i + _READ_BATCH] for i in range(0, len(unique), _READ_BATCH)]
        found: dict[Digest, bytes] = {}

        async def read(chunk: list[Digest]) -> None:
            with _disk_errors("read blobs"):
                found.update(await _in_thread(self._read_many_sync, chunk))

        async with anyio.create_task_group() as tasks:
            for chunk in chunks:
                tasks.start_soon(read, chunk)
        return found

    def _read_many_sync(self, digests: list[Digest]) -> dict[Digest, bytes]:
        found = {}
        for digest in digests:
            # os.open/os.read: a buffered file object per 4 KiB blob costs more than the read.
            try:
                fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                data = _read_up_to(fd, digest.size_bytes + 1)
            finally:
                os.close(fd)
            if len(data) == digest.size_bytes:  # else truncated or tampered with: absent
                found[digest] = data
        return found

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        # The temp file is made with the first data written: no thread hop here, and none at
        # all for an upload that turns out to be stored already.
        return self._writer(digest)

    def _writer(self, digest: Digest, handle: _BlobFile | None = None) -> _DiskWriter:
        return _DiskWriter(self, digest, handle)

    def intact(self, path: Path, digest: Digest) -> bool:
        """Whether the file at ``path`` is a whole copy of ``digest`` (a crash can leave a
        truncated one behind)."""
        try:
            return path.stat().st_size == digest.size_bytes
        except FileNotFoundError:
            return False

    def _new_temp(self, direct: bool = False) -> _BlobFile:
        path = str(self._tmp / _temp_name())
        if direct:
            handle = open_direct(path)
            if handle is not None:
                return handle
        return _TempFile(path)

    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        # One thread hop for a whole batch of small blobs, not several per blob.
        return await _in_thread(self._stage_sync, blobs)

    def _stage_sync(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[BlobWriter | CasError]:
        staged: list[BlobWriter | CasError] = []
        try:
            for digest, data in blobs:
                actual = Digest.of(data, digest.function)
                if actual != digest:
                    staged.append(DigestMismatch(f"data has digest {actual}, not {digest}"))
                    continue
                with _disk_errors(f"store blob {digest}"):
                    handle = self._new_temp()
                    disk_writer = self._writer(digest, handle)
                    staged.append(disk_writer)
                    handle.write(disk_writer.encoded_whole(data))
                    disk_writer.close_sync()
                    disk_writer.mark_verified(len(data))
        except BaseException:
            for writer in staged:
                if isinstance(writer, _DiskWriter):
                    writer.discard_sync()
            raise
        return staged

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        disk_writers = [w for w in writers if isinstance(w, _DiskWriter)]

        def publish_all() -> None:
            for writer in disk_writers:
                writer.publish_sync()

        with _disk_errors("publish blobs"):
            await _in_thread(publish_all)

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        disk_writers = [w for w in writers if isinstance(w, _DiskWriter)]
        if not disk_writers:
            return

        def discard_all() -> None:
            for writer in disk_writers:
                writer.discard_sync()

        await _in_thread(discard_all)  # one thread hop for the batch, not one per blob

    def _delete_sync(self, digest: Digest) -> bool:
        try:
            self.path_for(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(digests))
        with _disk_errors("delete blobs"):
            return await _in_thread(lambda: [d for d in unique if self._delete_sync(d)])

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        """Every stored blob with its modification time, for rebuilding an index."""
        for function in DigestFunction:
            base = self._cas / function.lower_name
            shards = await _in_thread(_list_shards, base)
            for shard in shards:
                entries = await _in_thread(_scan_shard, shard, function)
                for entry in entries:
                    yield entry


def _list_shards(base: Path) -> list[Path]:
    return sorted(base.iterdir()) if base.is_dir() else []


def _scan_shard(shard: Path, function: DigestFunction) -> list[tuple[Digest, float]]:
    found = []
    with os.scandir(shard) as entries:
        for entry in entries:
            try:
                stat = entry.stat()
                found.append((Digest(entry.name, stat.st_size, function), stat.st_mtime))
            except (CasError, FileNotFoundError):
                continue  # not a blob of ours, or deleted meanwhile
    return found


_TEMP_SEQUENCE = itertools.count()
_TEMP_NAMES = (0, "")  # the process the prefix was drawn in, and the prefix


def _temp_name() -> str:
    """``{pid}-{random}-{sequence}``: unique among processes sharing the directory (and
    across restarts, by the random part) without a ``getrandom`` system call per file."""
    global _TEMP_NAMES
    pid = os.getpid()
    if _TEMP_NAMES[0] != pid:  # first use, or a forked worker: draw a prefix of its own
        _TEMP_NAMES = (pid, f"{pid}-{uuid.uuid4().hex}")
    return f"{_TEMP_NAMES[1]}-{next(_TEMP_SEQUENCE)}"


class _TempFile:
    """A new file on a bare descriptor. A Python file object costs three more system calls
    to open (fstat, the isatty ioctl, lseek), each a release of the GIL that a busy server's
    other threads contend for; uploads write large pieces, so buffering gains nothing."""

    __slots__ = ("_fd", "name")

    def __init__(self, name: str, fd: int | None = None) -> None:
        self.name = name
        flags = os.O_WRONLY | os.O_CLOEXEC
        self._fd = fd if fd is not None else os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o666)

    @classmethod
    def for_appending(cls, name: str) -> _TempFile:
        return cls(name, os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        return len(data)

    def flush(self) -> None:
        return None  # nothing is buffered here

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _BlobFile(Protocol):
    """What a blob writer needs of its temporary file: a binary file or a ``DirectFile``."""

    @property
    def name(self) -> str: ...

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class _DiskWriter(BlobWriter, CommitsInThread):
    def __init__(
        self, storage: DiskStorage, digest: Digest, handle: _BlobFile | None = None
    ) -> None:
        super().__init__(digest)
        self._storage = storage
        self._handle: _BlobFile | None = handle
        self._temp_path: Path | None = None if handle is None else Path(handle.name)
        self._closed = False

    async def _write(self, parts: list[bytes]) -> None:
        # Hashing and writing share one thread hop; hashlib releases the GIL on big chunks.
        with _disk_errors(f"write blob {self.digest}"):
            await _in_thread(self._write_sync, parts)

    def _write_sync(self, parts: list[bytes]) -> None:
        assert not self._closed, "write after commit or abort"
        if self._handle is None and self._temp_path is not None:  # resumed after a park
            self._handle = _TempFile.for_appending(str(self._temp_path))
        elif self._handle is None:
            direct = 0 < self._storage.direct_io_above < self.digest.size_bytes
            self._handle = self._storage._new_temp(direct)
            self._temp_path = Path(self._handle.name)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        # One update for the whole piece: hashlib releases the GIL on each call, and on a
        # loaded server every release is a hand-over the event loop then waits to get back
        # (nineteen per 300 KB upload in Bazel's 16 KiB messages, hashed part by part).
        self._hasher.update(data)
        self._handle.write(self.encoded(data))

    def encoded(self, data: bytes) -> bytes:
        """What goes into the file for the next ``data`` of the blob (a compressing writer
        changes it)."""
        return data

    def encoded_whole(self, data: bytes) -> bytes:
        """What goes into the file for a whole blob written at once (``stage``)."""
        return data

    async def _finish(self, tail: list[bytes]) -> None:
        with _disk_errors(f"store blob {self.digest}"):
            await _in_thread(self._finish_sync, tail)

    def _finish_sync(self, tail: list[bytes]) -> None:
        """The last data, then flush, fsync and close: one thread hop at the end of an upload."""
        if tail or self._handle is None:  # the empty blob still gets its (empty) file
            self._write_sync(tail or [b""])
        self.close_sync()

    async def release_memory(self) -> None:
        """Write out what is gathered and close the temp file (a resume reopens it): a parked
        upload holds bytes on disk, but neither memory nor a descriptor."""
        await self.flush()
        if self._handle is not None:
            with _disk_errors(f"write blob {self.digest}"):
                await _in_thread(self._close_for_later)

    def _close_for_later(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()  # a DirectFile writes out its buffers and gives them back

    def publish_lock(self) -> None:
        return None  # files are linked into place atomically; no lock needed

    def verify_in_thread(self, tail: list[bytes]) -> None:
        with _disk_errors(f"store blob {self.digest}"):
            self._finish_sync(tail)
        self.check_hash()

    def close_sync(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self._storage.fsync:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        self._closed = True

    def mark_verified(self, size: int) -> None:
        self.committed_size = size
        self._verified = True

    async def _publish(self) -> None:
        with _disk_errors(f"publish blob {self.digest}"):
            await _in_thread(self.publish_sync)

    def publish_sync(self) -> bool:
        """Link the verified temp file into place; True if this call created the blob's file
        (False: it was there already, or this writer has published and released it)."""
        if self._temp_path is None:
            return False
        final = self._storage.path_for(self.digest)
        # Other writers and evictors (in any process) race us on ``final``: retry until our
        # data, or an intact copy of it, is in place.
        while True:
            try:
                os.link(self._temp_path, final)
                return True
            except FileNotFoundError:  # first blob of its shard
                final.parent.mkdir(parents=True, exist_ok=True)
                continue
            except FileExistsError:
                pass
            if self._storage.intact(final, self.digest):
                return False  # another writer got there first: keep its copy
            if not final.exists():
                continue  # evicted between our link and our look: link again
            # A damaged copy (e.g. truncated by a crash): replace it atomically.
            side = final.with_name(f"{final.name}.{uuid.uuid4().hex}")
            os.link(self._temp_path, side)
            os.replace(side, final)
            return True

    def publish_in_thread(self) -> Callable[[], None] | None:
        """Publish, then drop the temp file, in the calling (worker) thread, for an index that
        makes the blob visible and indexes it in one thread hop, and never publishes again.

        Returns how to take the blob back out (if this call put it there), for when the index
        could not record it: a blob must never be stored but unindexed.
        """
        with _disk_errors(f"publish blob {self.digest}"):
            created = self.publish_sync()
            self.discard_sync()
        if not created:
            return None
        final = self._storage.path_for(self.digest)
        return lambda: final.unlink(missing_ok=True)

    async def _abort(self) -> None:
        self._closed = True
        if self._temp_path is not None or self._handle is not None:
            await _in_thread(self.discard_sync)

    def discard_sync(self) -> None:
        try:
            if self._handle is not None:
                handle, self._handle = self._handle, None
                with contextlib.suppress(OSError):  # the data is being thrown away anyway
                    handle.close()
        finally:
            if self._temp_path is not None:
                self._temp_path.unlink(missing_ok=True)
                self._temp_path = None
