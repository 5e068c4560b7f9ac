"""The ByteStream service for CAS blobs: streamed reads, resumable verified writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, Final

import anyio
import grpc

from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.auth import Access
from asynccas.compression import check_compressor, compressed
from asynccas.digest import Digest
from asynccas.errors import InvalidArgument, OutOfRange, UploadStalled
from asynccas.resource_names import parse_read_name, parse_write_name
from asynccas.server.blobs import check_blob_size
from asynccas.server.calls import authorize
from asynccas.server.errors import Context, streaming_rpc, unary_rpc
from asynccas.server.registration import (
    MalformedRequest,
    client_streaming,
    register,
    server_streaming,
    unary,
)
from asynccas.server.uploads import UploadSessions
from asynccas.storage.base import CHUNK_SIZE, Storage, contains
from asynccas.storage.context import RequestContext

HALF_CLOSE_GRACE: Final = 0.1


class IdleWatch:
    """Cancels the task that made it once it has waited ``timeout`` seconds for one message.

    ``asyncio.timeout`` around each wait did the same at about 4 us a message, three
    ``getpid`` system calls among it (asyncio checks the process on each running-loop look-up,
    and a system call is dear in a VM: they were 8% of a loaded server's time). Here a wait
    costs two attribute stores and a clock read; the one timer re-arms itself when it fires
    early, which for a stream that keeps sending is once per ``timeout``.
    """

    __slots__ = ("_fired", "_handle", "_task", "loop", "since", "timeout", "waiting")

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.timeout = timeout
        self.since = self.loop.time()
        self.waiting = False
        self._fired = False
        self._handle = self.loop.call_at(self.since + timeout, self._check)

    def _check(self) -> None:
        due = self.since + self.timeout
        if not self.waiting or self.loop.time() < due:
            self._handle = self.loop.call_at(max(due, self.loop.time() + 1e-3), self._check)
            return
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """Whether a cancellation is this watch's (then taken back, as asyncio.timeout does,
        so that the task is not left cancelled)."""
        if self._fired:
            self._fired = False
            self._task.uncancel()
            return True
        return False

    def close(self) -> None:
        self._handle.cancel()


"""Seconds to wait before parking an upload whose stream ended without finish_write."""


def _reported_stored(lookup: asyncio.Future[bool]) -> bool:
    """A finished existence lookup's answer; a failed one counts as "not stored": the
    upload goes on, and meets the same backend error when it commits."""
    return not lookup.cancelled() and lookup.exception() is None and lookup.result()


def _discard(lookup: asyncio.Future[Any]) -> None:
    """Cancel a lookup whose answer is no longer wanted, and consume whatever it ends with."""
    lookup.cancel()
    lookup.add_done_callback(lambda done: done.cancelled() or done.exception())


class ByteStreamService(bs_grpc.ByteStreamServicer):
    def __init__(
        self,
        storage: Storage,
        uploads: UploadSessions,
        *,
        stream_idle_timeout: float = 120.0,
        max_blob_size: int = 0,
    ) -> None:
        """``stream_idle_timeout``: seconds a Write stream may send nothing before its upload
        is abandoned (DEADLINE_EXCEEDED); ``max_blob_size``: larger uploads are refused (0:
        no limit)."""
        self.max_blob_size = max_blob_size
        self.storage = storage
        self.uploads = uploads
        self.stream_idle_timeout = stream_idle_timeout

    def add_to_server(self, server: grpc.aio.Server) -> None:
        register(
            server,
            "google.bytestream.ByteStream",
            {
                "Read": server_streaming(self.Read, bs_pb2.ReadRequest, bs_pb2.ReadResponse),
                "Write": client_streaming(self.Write, bs_pb2.WriteRequest, bs_pb2.WriteResponse),
                "QueryWriteStatus": unary(
                    self.QueryWriteStatus,
                    bs_pb2.QueryWriteStatusRequest,
                    bs_pb2.QueryWriteStatusResponse,
                ),
            },
        )

    @streaming_rpc
    async def Read(
        self, request: bs_pb2.ReadRequest, context: Context
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        resource = parse_read_name(request.resource_name)
        digest = resource.digest
        ctx = authorize(Access.READ, resource.instance_name, context, digest.function)
        check_compressor(resource.compressor)
        if not 0 <= request.read_offset <= digest.size_bytes:
            raise OutOfRange(
                f"read_offset {request.read_offset} is outside blob {digest}"
                f" (0 to {digest.size_bytes})"
            )
        if request.read_limit < 0:
            raise OutOfRange(f"read_limit {request.read_limit} is negative")
        if resource.compressor is not None:
            if request.read_limit:
                raise InvalidArgument(
                    f"read_limit must be 0 for a compressed read, not {request.read_limit}"
                )
            stored = self.storage.get_zstd(ctx, digest) if request.read_offset == 0 else None
            frame = stored if stored is not None and not digest.is_empty else None
            if frame is None:
                frame = compressed(self._uncompressed(ctx, digest, request.read_offset))
            async with aclosing(frame) as pieces:
                async for piece in pieces:
                    yield bs_pb2.ReadResponse(data=piece)
            return
        if digest.is_empty:
            return
        async with aclosing(
            self.storage.get(ctx, digest, request.read_offset, request.read_limit)
        ) as chunks:
            async for chunk in chunks:
                yield bs_pb2.ReadResponse(data=chunk)

    async def _uncompressed(
        self, ctx: RequestContext, digest: Digest, offset: int
    ) -> AsyncGenerator[bytes]:
        if digest.is_empty:
            return
        async with aclosing(self.storage.get(ctx, digest, offset)) as chunks:
            async for chunk in chunks:
                yield chunk

    @unary_rpc
    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        first = await anext(request_iterator, None)
        if first is None:
            raise InvalidArgument("write stream carried no requests")
        if isinstance(first, MalformedRequest):
            raise first.error()
        resource = parse_write_name(first.resource_name)
        digest = resource.digest
        ctx = authorize(Access.WRITE, resource.instance_name, context, digest.function)
        check_compressor(resource.compressor)
        # REAPI: a blob that is already there (the empty one always is) completes at once,
        # with committed_size -1 for a compressed upload (its sizes are compressed ones).
        already = -1 if resource.compressor else digest.size_bytes
        if digest.is_empty:
            return bs_pb2.WriteResponse(committed_size=already)
        check_blob_size(digest, self.max_blob_size)
        # Clients upload what FindMissingBlobs called missing, so whether the blob is there
        # is nearly always no. For a large blob the question is asked while the data streams
        # in (a yes saves receiving the rest); a blob of at most a chunk is stored without
        # asking, since storing is idempotent and the lookup's thread hop cost about as much
        # as receiving the blob (it measured 0.3-0.5 ms of a 300 KB upload's 4.5 ms).
        stored = (
            asyncio.ensure_future(contains(self.storage, ctx, digest))
            if digest.size_bytes > CHUNK_SIZE
            else None
        )
        upload = await self.uploads.begin(ctx, resource, first.write_offset)
        writer = upload.writer
        finished = False
        watch = IdleWatch(self.stream_idle_timeout)
        try:
            request: bs_pb2.WriteRequest | None = first
            while request is not None:
                if stored is not None and stored.done():
                    if _reported_stored(stored):
                        finished = True
                        await self.uploads.end(upload, abort=True)
                        return bs_pb2.WriteResponse(committed_size=already)
                    stored = None
                if request.resource_name and request.resource_name != first.resource_name:
                    raise InvalidArgument(
                        f"resource_name changed mid-stream from {first.resource_name!r}"
                        f" to {request.resource_name!r}"
                    )
                if request.write_offset != writer.committed_size:
                    raise InvalidArgument(
                        f"write_offset {request.write_offset} should be"
                        f" {writer.committed_size}, the bytes received so far"
                    )
                # Writers gather messages in memory and write them out in large pieces, so
                # most of these return without a thread hop.
                await writer.write(request.data)
                if request.finish_write:
                    await writer.commit()
                    finished = True
                    # All bytes received: the blob's size, or a compressed upload's bytes.
                    return bs_pb2.WriteResponse(committed_size=writer.committed_size)
                # A stream that stops sending holds an upload slot and its buffered data:
                # give up on it after stream_idle_timeout seconds without a message.
                watch.waiting = True
                watch.since = watch.loop.time()
                try:
                    request = await anext(request_iterator, None)
                except asyncio.CancelledError:
                    if watch.expired():
                        raise UploadStalled(
                            f"no data for {self.stream_idle_timeout:g} s after"
                            f" {writer.committed_size} bytes of {digest}: upload abandoned"
                        ) from None
                    raise
                watch.waiting = False
                if isinstance(request, MalformedRequest):
                    raise request.error()
            # The stream ended without finish_write. A client that cancelled looks the
            # same at this point: gRPC cancels this handler only a moment later. Wait
            # that moment, so a cancelled upload is discarded (below), not parked.
            await anyio.sleep(HALF_CLOSE_GRACE)
            # An upload stopped part-way is rare: ask now whether the blob is there after all.
            if stored is None:
                stored = asyncio.ensure_future(contains(self.storage, ctx, digest))
            if await asyncio.wait([stored]) and _reported_stored(stored):
                finished = True
                await self.uploads.end(upload, abort=True)
                return bs_pb2.WriteResponse(committed_size=already)
        except BaseException:
            finished = True
            with anyio.CancelScope(shield=True):
                await self.uploads.end(upload, abort=True)
            raise
        finally:
            watch.close()
            if stored is not None:
                _discard(stored)
            if finished:
                await self.uploads.end(upload, abort=False)
        # The client closed the stream early on purpose: keep the upload to resume.
        await self.uploads.park(upload)
        return bs_pb2.WriteResponse(committed_size=writer.committed_size)

    @unary_rpc
    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Context
    ) -> bs_pb2.QueryWriteStatusResponse:
        resource = parse_write_name(request.resource_name)
        digest = resource.digest
        ctx = authorize(Access.WRITE, resource.instance_name, context, digest.function)
        check_compressor(resource.compressor)
        if digest.is_empty or await contains(self.storage, ctx, digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=digest.size_bytes, complete=True)
        return bs_pb2.QueryWriteStatusResponse(
            committed_size=self.uploads.committed_size(ctx, resource), complete=False
        )
