"""``CasClient``: an async client for any REAPI cache (CAS, ByteStream, ActionCache).

Batches follow the server's advertised ``max_batch_total_size_bytes``; larger blobs go
through ByteStream as bounded chunks, never whole in memory. Transient failures are
retried with exponential backoff (uploads resume where the server says they stopped),
concurrency is bounded, and every download is checked against its digest.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aiofiles
import aiofiles.os
import anyio
import anyio.to_thread
import grpc

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.chunking import FastCdcParams, file_chunks
from asynccas.client.caches import INLINE_LIMIT, ClientCaches
from asynccas.client.channel import (
    TRANSIENT,
    backoff_delay,
    check_token,
    failed_send,
    function_field,
    open_channel,
    read_response_data,
    status_code_of,
)
from asynccas.client.merkle import build_tree, digest_of_file
from asynccas.compression import ZSTD, check_compressor, compressed, decompressed
from asynccas.digest import DEFAULT_FUNCTION, Digest, DigestFunction
from asynccas.errors import (
    BackendUnavailable,
    BlobNotFound,
    CasError,
    DigestMismatch,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    UnsupportedFeature,
)
from asynccas.hashing import OverlappedHasher
from asynccas.resource_names import format_read_name, format_write_name
from asynccas.transport import ClientTls

T = TypeVar("T")

CHUNK_SIZE: Final = 1024 * 1024
CHUNKED_FROM: Final = 4
"""Files of at least this many average chunks move by chunks (SpliceBlob, SplitBlob) when
the server offers them: below it, the chunks cost more requests than they can save."""
CHUNK_GROUP_BYTES: Final = 16 * 1024 * 1024
"""Chunks are read, uploaded and downloaded this many bytes at a time (bounded memory)."""
CHUNKS_PER_GROUP: Final = 16
DEFAULT_MAX_BATCH: Final = 4 * 1024 * 1024
_FIND_MISSING_CHUNK: Final = 10_000
_PER_BLOB_OVERHEAD: Final = 200  # bytes of framing per blob inside a batch request


@dataclass(frozen=True)
class Progress:
    """Where a transfer stands. Bytes move as each chunk is sent or received, not only when a
    whole blob is done; ``phase`` says what the client is doing now: ``hashing`` (digesting a
    local file), ``checking`` (asking which blobs the server lacks), ``sending``, ``receiving``
    or ``done``."""

    bytes_done: int
    bytes_total: int
    blobs_done: int
    blobs_total: int
    phase: str = "sending"


ProgressCallback = Callable[[Progress], None]


class _Tracker:
    """Reports one transfer's progress to ``callback`` (None: counts only)."""

    def __init__(
        self, callback: ProgressCallback | None, blobs: int, total: int, phase: str = "sending"
    ) -> None:
        self._callback = callback
        self._state = [0, total, 0, blobs]
        self._phase = phase
        self._report()

    def phase(self, phase: str) -> None:
        self._phase = phase
        self._report()

    def expect(self, blobs: int, total: int) -> None:
        """Set what the transfer will move, once that is known."""
        self._state[1], self._state[3] = total, blobs
        self._report()

    def add_bytes(self, size: int) -> None:
        """Bytes of a blob under way (its ``advance`` later counts the blob, not its bytes)."""
        self._state[0] += size
        self._report()

    def advance(self, size: int, blobs: int = 1) -> None:
        self._state[0] += size
        self._state[2] += blobs
        if self._state[2] >= self._state[3]:
            self._phase = "done"
        self._report()

    def _report(self) -> None:
        if self._callback is not None:
            done, total, blobs_done, blobs = self._state
            self._callback(Progress(done, total, blobs_done, blobs, self._phase))


class _PartsOf(_Tracker):
    """The tracker of the pieces of one blob (its chunks): their bytes move the blob's own
    tracker, and finishing a piece is not finishing a blob."""

    def __init__(self, whole: _Tracker) -> None:
        super().__init__(None, 0, 0)
        self._whole = whole

    def add_bytes(self, size: int) -> None:
        self._whole.add_bytes(size)

    def advance(self, size: int, blobs: int = 1) -> None:
        self._whole.add_bytes(size)


class CasClient:
    """``async with CasClient("grpc://host:port", instance_name="") as cas: ...``"""

    def __init__(
        self,
        endpoint: str,
        instance_name: str = "",
        *,
        max_concurrency: int = 16,
        max_attempts: int = 5,
        backoff: float = 0.1,
        timeout: float = 300.0,
        progress: ProgressCallback | None = None,
        cache: ClientCaches | None = None,
        chunk_size: int = CHUNK_SIZE,
        tls: ClientTls | None = None,
        token: str | None = None,
        digest_function: DigestFunction | None = None,
        compressor: str | None = None,
    ) -> None:
        """``chunk_size``: the data per ByteStream WriteRequest (Bazel sends 16 KiB);
        ``tls``: the CA to trust and a client certificate (a ``grpcs://`` endpoint without it
        trusts the system's CAs); ``token``: sent as ``authorization: Bearer TOKEN``;
        ``digest_function``: hash new blobs with this one (e.g. BLAKE3), which the server must
        offer; by default SHA256, or the first function the server offers; ``compressor``:
        ``"zstd"`` to move ByteStream data zstd-compressed, if the server offers it."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        if token is not None:
            check_token(token)
        check_compressor(compressor)
        self.compressor = compressor
        self.chunk_size = chunk_size
        self.endpoint = endpoint
        self._wanted_function = digest_function
        self.tls = tls
        self.token = token
        self.cache = cache
        self.instance_name = instance_name
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.timeout = timeout
        self.progress = progress
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._channel: grpc.aio.Channel | None = None
        self.max_batch_bytes = DEFAULT_MAX_BATCH
        self.digest_function = DEFAULT_FUNCTION
        self.capabilities = re_pb2.ServerCapabilities()
        # Blob bytes moved by every call so far, counted as each message goes or comes (not
        # when a whole blob is done): what a load test shows while a large blob is under way.
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- connection ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.cache is not None:
            await self.cache.open()
        channel = await open_channel(self.endpoint, tls=self.tls, token=self.token)
        self._channel = channel
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._read: grpc.aio.UnaryStreamMultiCallable[bs_pb2.ReadRequest, bytes]
        self._read = channel.unary_stream(
            "/google.bytestream.ByteStream/Read",
            request_serializer=bs_pb2.ReadRequest.SerializeToString,
            response_deserializer=read_response_data,
        )
        self._action_cache = re_grpc.ActionCacheStub(channel)
        try:
            self.capabilities = await self._retrying(
                lambda: re_grpc.CapabilitiesStub(channel).GetCapabilities(
                    re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name),
                    timeout=self.timeout,
                )
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            self._channel = None
            raise _connection_error(self.endpoint, exc) from exc
        cache = self.capabilities.cache_capabilities
        if self.compressor and re_pb2.Compressor.ZSTD not in cache.supported_compressors:
            await self.__aexit__(None, None, None)
            raise UnsupportedFeature(
                f"{self.endpoint} does not offer {self.compressor} compression"
            )
        self.max_batch_bytes = cache.max_batch_total_size_bytes or DEFAULT_MAX_BATCH
        offered = set(cache.digest_functions)
        wanted = self._wanted_function
        if wanted is not None:
            if offered and wanted.proto_value not in offered:
                await self.__aexit__(None, None, None)
                raise UnsupportedFeature(
                    f"{self.endpoint} does not offer digest function {wanted.lower_name}"
                )
            self.digest_function = wanted
        elif offered and DEFAULT_FUNCTION.proto_value not in offered:
            self.digest_function = next(
                (f for f in DigestFunction if f.proto_value in offered), DEFAULT_FUNCTION
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self.cache is not None:
            await self.cache.close()

    @property
    def batch_blob_limit(self) -> int:
        """Blobs up to this size travel in batches; larger ones through ByteStream."""
        return max(0, self.max_batch_bytes - 4 * _PER_BLOB_OVERHEAD)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.max_attempts):
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in TRANSIENT or attempt + 1 == self.max_attempts:
                    raise
                await anyio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.backoff, 5.0)

    # -- blobs -------------------------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(d for d in digests if not d.is_empty))
        # One request per digest function (REAPI: a request's digests share one), which is
        # also how its answers are read back.
        by_function: dict[DigestFunction, list[Digest]] = {}
        for digest in unique:
            by_function.setdefault(digest.function, []).append(digest)
        missing: list[Digest] = []
        for function, group in by_function.items():
            for start in range(0, len(group), _FIND_MISSING_CHUNK):
                chunk = group[start : start + _FIND_MISSING_CHUNK]
                request = re_pb2.FindMissingBlobsRequest(
                    instance_name=self.instance_name,
                    blob_digests=[d.to_proto() for d in chunk],
                    digest_function=function_field(chunk),
                )
                response = await self._retrying(
                    partial(self._cas.FindMissingBlobs, request, timeout=self.timeout)
                )
                missing += [
                    Digest.from_proto(d, function.proto_value)
                    for d in response.missing_blob_digests
                ]
        return missing

    async def upload_blobs(
        self, blobs: Mapping[Digest, bytes] | Iterable[tuple[Digest, bytes]]
    ) -> list[Digest]:
        """Upload what the server lacks; returns the digests that were actually sent."""
        items = dict(blobs.items() if isinstance(blobs, Mapping) else blobs)
        for digest, data in items.items():
            if len(data) != digest.size_bytes:
                raise DigestMismatch(f"{len(data)} bytes given for digest {digest}")
        missing = await self.find_missing(items)
        tracker = _Tracker(self.progress, len(missing), sum(d.size_bytes for d in missing))
        small = [d for d in missing if d.size_bytes <= self.batch_blob_limit]
        large = [d for d in missing if d.size_bytes > self.batch_blob_limit]
        await _run_all(
            [
                partial(self._upload_batch, [(d, items[d]) for d in b], tracker)
                for b in self._batches(small)
            ]
            + [partial(self._upload_bytes, d, items[d], tracker) for d in large]
        )
        return missing

    async def batch_update_blobs(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        """One BatchUpdateBlobs call, as given (no FindMissingBlobs first): for load tests."""
        items = list(blobs)
        await self._upload_batch(items, _Tracker(None, len(items), 0))

    async def batch_read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """One BatchReadBlobs call, each blob verified; raises BlobNotFound for an absent one."""
        wanted = list(digests)
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance_name,
            digests=[d.to_proto() for d in wanted],
            digest_function=function_field(wanted),
        )
        response = await self._retrying(
            partial(self._cas.BatchReadBlobs, request, timeout=self.timeout)
        )
        found = {}
        for digest, result in zip(wanted, response.responses, strict=True):
            status = result.status
            if status.code:
                if status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                    raise BlobNotFound(digest)
                raise InvalidArgument(f"server failed to read {digest}: {status.message}")
            data = result.data  # each access copies the bytes out of the message
            _verify(digest, data)
            self.bytes_received += len(data)
            found[digest] = data
        return found

    async def write_stream(
        self, digest: Digest, chunks_from: Callable[[int], AsyncGenerator[bytes]]
    ) -> None:
        """One ByteStream upload fed by ``chunks_from(offset)``, which must yield the blob's
        bytes from ``offset`` on (called again from the server's offset after a failure)."""
        async with self._limiter:
            await self._write(digest, chunks_from)

    async def write_blob(self, digest: Digest, data: bytes) -> None:
        """One ByteStream upload of ``data`` (no FindMissingBlobs first)."""
        await self._upload_bytes(digest, data, _Tracker(None, 1, 0))

    def _batches(self, digests: list[Digest]) -> list[list[Digest]]:
        batches: list[list[Digest]] = []
        current: list[Digest] = []
        size = 0
        for digest in sorted(digests, key=lambda d: d.size_bytes):
            cost = digest.size_bytes + _PER_BLOB_OVERHEAD
            if current and size + cost > self.max_batch_bytes:
                batches.append(current)
                current, size = [], 0
            current.append(digest)
            size += cost
        if current:
            batches.append(current)
        return batches

    async def _upload_batch(self, blobs: list[tuple[Digest, bytes]], tracker: _Tracker) -> None:
        async with self._limiter:
            pending = blobs
            for attempt in range(self.max_attempts):
                request = re_pb2.BatchUpdateBlobsRequest(
                    instance_name=self.instance_name,
                    digest_function=function_field([d for d, _ in pending]),
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=b)
                        for d, b in pending
                    ],
                )
                response = await self._retrying(
                    partial(self._cas.BatchUpdateBlobs, request, timeout=self.timeout)
                )
                retry = []
                for (digest, data), result in zip(pending, response.responses, strict=True):
                    code = grpc.StatusCode.OK.value[0]
                    if result.status.code == code:
                        self.bytes_sent += digest.size_bytes
                        tracker.advance(digest.size_bytes)
                    elif (
                        status_code_of(result.status.code) in TRANSIENT
                        and attempt + 1 < self.max_attempts
                    ):
                        retry.append((digest, data))
                    else:
                        raise InvalidArgument(
                            f"server refused blob {digest}: {status_code_of(result.status.code).name}"
                            f" {result.status.message}"
                        )
                if not retry:
                    return
                pending = retry
                await anyio.sleep(self._delay(attempt))

    async def _upload_bytes(self, digest: Digest, data: bytes, tracker: _Tracker) -> None:
        async def chunks(offset: int) -> AsyncGenerator[bytes]:
            view = memoryview(data)
            for start in range(offset, len(data), CHUNK_SIZE):
                yield bytes(view[start : start + CHUNK_SIZE])

        async with self._limiter:
            await self._write(digest, chunks)
        tracker.advance(digest.size_bytes)

    async def _write(
        self,
        digest: Digest,
        chunks_from: Callable[[int], AsyncGenerator[bytes]],
        tracker: _Tracker | None = None,
    ) -> None:
        """ByteStream Write, resuming at the server's committed size after transient errors.
        With ``tracker``, each message's bytes count as they are sent; the caller's
        ``advance(0)`` then counts the blob."""
        if self.compressor is not None:
            await self._write_compressed(digest, chunks_from)
            return
        name = format_write_name(self.instance_name, str(uuid.uuid4()), digest)
        offset = 0
        reported = 0  # bytes counted so far: a resume may send some of them again
        listen_first = 0.0
        for attempt in range(self.max_attempts):

            async def requests(start: int = offset) -> AsyncGenerator[bs_pb2.WriteRequest]:
                position = start
                async with aclosing(chunks_from(start)) as chunks:
                    async for chunk in chunks:
                        # Messages of at most chunk_size, whatever size the source yields.
                        for piece in _pieces(chunk, self.chunk_size):
                            end = position + len(piece)
                            yield bs_pb2.WriteRequest(
                                resource_name=name if position == start else "",
                                write_offset=position,
                                data=piece,
                                finish_write=end == digest.size_bytes,
                            )
                            position = end
                            self.bytes_sent += len(piece)
                            nonlocal reported
                            if tracker is not None and end > reported:
                                tracker.add_bytes(end - reported)
                                reported = end
                if position == start == digest.size_bytes:
                    yield bs_pb2.WriteRequest(
                        resource_name=name, write_offset=position, finish_write=True
                    )

            try:
                response = await self._send_write(requests(), listen_first)
            except grpc.aio.AioRpcError as exc:
                if not self._retryable(exc, attempt):
                    raise
                listen_first = await self._wait_before_retry(exc, attempt)
                offset = await self._committed_size(name)
                if offset == digest.size_bytes:
                    return
                continue
            if response.committed_size not in (digest.size_bytes, -1):
                raise DigestMismatch(
                    f"server committed {response.committed_size} of {digest.size_bytes} bytes"
                    f" for {digest}"
                )
            return

    async def _write_compressed(
        self, digest: Digest, chunks_from: Callable[[int], AsyncGenerator[bytes]]
    ) -> None:
        """ByteStream Write of the blob as one zstd frame. A failed attempt starts over (with a
        new upload name): resuming would mean compressing everything before the server's
        offset again only to skip it."""
        listen_first = 0.0
        for attempt in range(self.max_attempts):
            name = format_write_name(self.instance_name, str(uuid.uuid4()), digest, ZSTD)
            sent = 0

            async def requests(name: str = name) -> AsyncGenerator[bs_pb2.WriteRequest]:
                nonlocal sent
                held: bytes | None = None  # one piece behind, so the last can say finish_write
                async with aclosing(compressed(chunks_from(0))) as frame:
                    async for chunk in frame:
                        for piece in _pieces(chunk, self.chunk_size):
                            if held is not None:
                                yield bs_pb2.WriteRequest(
                                    resource_name=name if sent == 0 else "",
                                    write_offset=sent, data=held,
                                )  # fmt: skip
                                sent += len(held)
                                self.bytes_sent += len(held)
                            held = piece
                last = held or b""
                yield bs_pb2.WriteRequest(
                    resource_name=name if sent == 0 else "", write_offset=sent, data=last,
                    finish_write=True,
                )  # fmt: skip
                sent += len(last)
                self.bytes_sent += len(last)

            try:
                response = await self._send_write(requests(), listen_first)
            except grpc.aio.AioRpcError as exc:
                if not self._retryable(exc, attempt):
                    raise
                listen_first = await self._wait_before_retry(exc, attempt)
                continue
            if response.committed_size not in (sent, -1):
                raise DigestMismatch(
                    f"server committed {response.committed_size} of the {sent} compressed bytes"
                    f" of {digest}"
                )
            return

    async def _send_write(
        self, requests: AsyncGenerator[bs_pb2.WriteRequest], listen_first: float
    ) -> bs_pb2.WriteResponse:
        """One ByteStream Write of ``requests``. With ``listen_first``, the stream pauses after
        its first message until the server answers or that many seconds pass: a server that
        refuses an upload at its first message ends the stream while a client still sends,
        and grpc.aio may then report its own failed send instead of the server's status
        (``failed_send``). A retry after such a send listens, so the caller gets the answer."""
        if not listen_first:
            return await self._bytestream.Write(requests, timeout=self.timeout)
        answered = asyncio.Event()

        async def listening() -> AsyncIterator[bs_pb2.WriteRequest]:
            async with aclosing(requests):
                first = True
                async for request in requests:
                    yield request
                    if first:
                        first = False
                        with anyio.move_on_after(listen_first):
                            await answered.wait()
                        if answered.is_set():
                            return  # the server's answer, not the rest of the blob

        call = self._bytestream.Write(listening(), timeout=self.timeout)
        call.add_done_callback(lambda _: answered.set())
        return await call

    async def _wait_before_retry(self, exc: grpc.aio.AioRpcError, attempt: int) -> float:
        """Back off before retry ``attempt + 1``; returns how long that retry listens after its
        first message (``_send_write``). After a failed send the backoff is spent listening
        rather than sleeping: the server has most likely answered already."""
        delay = self._delay(attempt)
        if failed_send(exc):
            return delay
        await anyio.sleep(delay)
        return 0.0

    def _retryable(self, exc: grpc.aio.AioRpcError, attempt: int) -> bool:
        """Whether a failed upload is tried again: a transient status, or a stream that broke
        under a send (the server may have answered early; asking again gets its answer)."""
        if attempt + 1 == self.max_attempts:
            return False
        return exc.code() in TRANSIENT or failed_send(exc)

    async def _committed_size(self, name: str) -> int:
        try:
            status = await self._bytestream.QueryWriteStatus(
                bs_pb2.QueryWriteStatusRequest(resource_name=name), timeout=self.timeout
            )
        except grpc.aio.AioRpcError:
            return 0  # the server keeps no partial uploads (or does not say): start over
        return int(status.committed_size)

    async def download_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Download whole blobs (mind their size); raises BlobNotFound for an absent one."""
        return await self._download_blobs(digests, _Tracker(self.progress, 0, 0))

    async def _download_blobs(
        self, digests: Iterable[Digest], tracker: _Tracker
    ) -> dict[Digest, bytes]:
        """``download_blobs``, reporting to ``tracker`` (set to the blobs to fetch)."""
        unique = list(dict.fromkeys(digests))
        found: dict[Digest, bytes] = {d: b"" for d in unique if d.is_empty}
        wanted = [d for d in unique if not d.is_empty]
        if self.cache is not None:
            found.update(await self._cached_blobs(wanted))
            wanted = [d for d in wanted if d not in found]
        fetched_from = len(found)
        small = [d for d in wanted if d.size_bytes <= self.batch_blob_limit]
        large = [d for d in wanted if d.size_bytes > self.batch_blob_limit]
        tracker.expect(len(wanted), sum(d.size_bytes for d in wanted))

        async def read_batch(batch: list[Digest]) -> None:
            async with self._limiter:
                request = re_pb2.BatchReadBlobsRequest(
                    instance_name=self.instance_name,
                    digests=[d.to_proto() for d in batch],
                    digest_function=function_field(batch),
                )
                response = await self._retrying(
                    lambda: self._cas.BatchReadBlobs(request, timeout=self.timeout)
                )
            for digest, result in zip(batch, response.responses, strict=True):
                if result.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                    raise BlobNotFound(digest)
                if result.status.code != grpc.StatusCode.OK.value[0]:
                    raise InvalidArgument(
                        f"server failed to read {digest}: {result.status.message}"
                    )
                data = result.data  # each access copies the bytes out of the message
                _verify(digest, data)
                self.bytes_received += len(data)
                found[digest] = data
                tracker.advance(digest.size_bytes)

        async def read_large(digest: Digest) -> None:
            async with self._limiter:
                parts = [chunk async for chunk in self.read_blob(digest)]
            found[digest] = b"".join(parts)
            tracker.advance(digest.size_bytes)

        await _run_all(
            [partial(read_batch, b) for b in self._batches(small)]
            + [partial(read_large, d) for d in large]
        )
        if self.cache is not None and wanted:
            await self.cache.blobs.put_many({d: found[d] for d in list(found)[fetched_from:]})
        return found

    async def _cached_blobs(self, digests: list[Digest]) -> dict[Digest, bytes]:
        assert self.cache is not None
        found = await self.cache.blobs.get_many(d for d in digests if d.size_bytes <= INLINE_LIMIT)
        for digest in digests:
            if digest.size_bytes > INLINE_LIMIT and digest not in found:
                path = await self.cache.blobs.get_path(digest)
                if path is not None:
                    found[digest] = await anyio.Path(path).read_bytes()
        return found

    async def read_blob(self, digest: Digest) -> AsyncIterator[bytes]:
        """Stream a blob through ByteStream, resuming after transient errors; verified at the
        end. With a compressor, each attempt reads one zstd frame from the offset reached."""
        hasher = OverlappedHasher(digest.function.new_hasher())
        name = format_read_name(self.instance_name, digest, self.compressor)
        received = 0
        attempt = 0
        while True:
            request = bs_pb2.ReadRequest(resource_name=name, read_offset=received)
            pieces = self._counted(self._read(request, timeout=self.timeout))
            if self.compressor is not None:
                rest = Digest(digest.hash, digest.size_bytes - received, digest.function)
                pieces = decompressed(pieces, rest)
            try:
                async for data in pieces:
                    await hasher.update(data)
                    received += len(data)
                    yield data
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise BlobNotFound(digest) from exc
                attempt += 1
                if exc.code() not in TRANSIENT or attempt == self.max_attempts:
                    raise
                await anyio.sleep(self._delay(attempt))
        if received != digest.size_bytes or await hasher.hexdigest() != digest.hash:
            raise DigestMismatch(f"server sent {received} bytes that do not match {digest}")

    async def _counted(self, pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for piece in pieces:
            self.bytes_received += len(piece)
            yield piece

    # -- files -------------------------------------------------------------------------------

    async def upload_file(self, path: str | os.PathLike[str]) -> Digest:
        """Upload one file, streamed from disk (skipped if the server has it)."""
        source = Path(path)
        size = (await anyio.Path(source).stat()).st_size
        tracker = _Tracker(self.progress, 1, size, phase="hashing")
        digest = await anyio.to_thread.run_sync(digest_of_file, source, self.digest_function)
        tracker.phase("checking")
        if not await self.find_missing([digest]):
            tracker.advance(digest.size_bytes)
            return digest
        tracker.phase("sending")
        await self._upload_path(digest, source, tracker)
        return digest

    @property
    def fast_cdc(self) -> FastCdcParams | None:
        """The server's FastCDC parameters if it splits and splices blobs, else None."""
        cache = self.capabilities.cache_capabilities
        if not (cache.split_blob_support and cache.splice_blob_support):
            return None
        if not cache.HasField("fast_cdc_2020_params"):
            return FastCdcParams()
        try:
            return FastCdcParams.from_proto(cache.fast_cdc_2020_params)
        except ValueError:
            return None  # parameters outside the API's range: do not chunk at all

    def _chunked(self, size: int) -> FastCdcParams | None:
        """The parameters to move a blob of ``size`` bytes by chunks, if worth it."""
        params = self.fast_cdc
        return (
            params if params is not None and size >= CHUNKED_FROM * params.avg_chunk_size else None
        )

    async def _upload_path(self, digest: Digest, source: Path, tracker: _Tracker) -> None:
        params = self._chunked(digest.size_bytes)
        if params is not None and await self._upload_chunked(digest, source, params, tracker):
            return
        if digest.size_bytes <= self.batch_blob_limit:
            async with aiofiles.open(source, "rb") as handle:
                data = await handle.read()
            _verify(digest, data)  # the file changed since it was hashed
            await self._upload_batch([(digest, data)], tracker)
            return

        async def chunks(offset: int) -> AsyncGenerator[bytes]:
            async with aiofiles.open(source, "rb") as handle:
                await handle.seek(offset)
                while chunk := await handle.read(CHUNK_SIZE):
                    yield chunk

        async with self._limiter:
            await self._write(digest, chunks, tracker)
        tracker.advance(0)  # its bytes were counted as they were sent

    async def _upload_chunked(
        self, digest: Digest, source: Path, params: FastCdcParams, tracker: _Tracker
    ) -> bool:
        """Upload the file's FastCDC chunks the server lacks, then splice them into the blob.
        False if the server lost chunks before the splice (the caller then uploads whole)."""
        cuts = await anyio.to_thread.run_sync(file_chunks, source, params)
        function = digest.function
        chunk_digests = await anyio.to_thread.run_sync(_digests_of_pieces, source, cuts, function)
        missing = set(await self.find_missing(chunk_digests))
        group: list[tuple[Digest, bytes]] = []
        group_bytes = 0
        async with aiofiles.open(source, "rb") as handle:
            for (offset, length), chunk_digest in zip(cuts, chunk_digests, strict=True):
                if chunk_digest not in missing:
                    tracker.add_bytes(length)
                    continue
                missing.discard(chunk_digest)  # a chunk repeated in the file goes once
                await handle.seek(offset)
                group.append((chunk_digest, await handle.read(length)))
                group_bytes += length
                if group_bytes >= CHUNK_GROUP_BYTES:
                    await self._upload_chunks(group, tracker)
                    group, group_bytes = [], 0
        await self._upload_chunks(group, tracker)
        request = re_pb2.SpliceBlobRequest(
            instance_name=self.instance_name,
            blob_digest=digest.to_proto(),
            chunk_digests=[d.to_proto() for d in chunk_digests],
            digest_function=function_field([digest]),
            chunking_function=re_pb2.ChunkingFunction.FAST_CDC_2020,
        )
        try:
            await self._retrying(partial(self._cas.SpliceBlob, request, timeout=self.timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise DigestMismatch(
                    f"the server refused the chunks of {digest}: {exc.details()}"
                ) from exc
            raise
        tracker.advance(0)
        return True

    async def _upload_chunks(self, chunks: list[tuple[Digest, bytes]], file: _Tracker) -> None:
        tracker = _PartsOf(file)
        small = {d: b for d, b in chunks if d.size_bytes <= self.batch_blob_limit}
        jobs = [partial(self._upload_batch, [(d, small[d]) for d in batch], tracker)
                for batch in self._batches(list(small))]  # fmt: skip
        jobs += [partial(self._upload_bytes, d, b, tracker) for d, b in chunks
                 if d.size_bytes > self.batch_blob_limit]  # fmt: skip
        await _run_all(jobs)

    async def download_file(
        self, digest: Digest, path: str | os.PathLike[str], *, executable: bool = False
    ) -> None:
        """Stream a blob into ``path`` (via a temp file renamed into place once verified)."""
        target = Path(path)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        tracker = _Tracker(self.progress, 1, digest.size_bytes, phase="receiving")
        cached = None if self.cache is None else await self.cache.blobs.get_path(digest)
        received = 0
        try:
            params = self._chunked(digest.size_bytes) if self.cache is not None else None
            if cached is not None:
                await anyio.to_thread.run_sync(shutil.copyfile, cached, temp)
            elif params is not None and await self._download_chunked(digest, temp, tracker):
                received = digest.size_bytes
                assert self.cache is not None
                await self.cache.blobs.put_file(digest, temp)
            else:
                async with aiofiles.open(temp, "wb") as handle:
                    async for chunk in self.read_blob(digest):
                        await handle.write(chunk)
                        tracker.add_bytes(len(chunk))
                        received += len(chunk)
                if self.cache is not None:
                    await self.cache.blobs.put_file(digest, temp)
            await anyio.to_thread.run_sync(_finish_file, temp, target, executable)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: temp.unlink(missing_ok=True))
            raise
        tracker.advance(digest.size_bytes - received)

    async def _download_chunked(self, digest: Digest, temp: Path, tracker: _Tracker) -> bool:
        """Write ``digest`` into ``temp`` from its chunks (SplitBlob), fetching only those the
        client cache lacks; False if the server cannot split it (the caller reads it whole)."""
        assert self.cache is not None
        request = re_pb2.SplitBlobRequest(
            instance_name=self.instance_name,
            blob_digest=digest.to_proto(),
            digest_function=function_field([digest]),
            chunking_function=re_pb2.ChunkingFunction.FAST_CDC_2020,
        )
        try:
            split = await self._retrying(
                partial(self._cas.SplitBlob, request, timeout=self.timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                return False
            raise
        chunks = [Digest.from_proto(d, digest.function.proto_value) for d in split.chunk_digests]
        hasher = OverlappedHasher(digest.function.new_hasher())
        async with aiofiles.open(temp, "wb") as handle:
            for start in range(0, len(chunks), CHUNKS_PER_GROUP):
                group = chunks[start : start + CHUNKS_PER_GROUP]
                # Cached chunks are not fetched; every chunk counts once written.
                found = await self._download_blobs(group, _Tracker(None, 0, 0))
                for chunk in group:
                    data = found[chunk]
                    await hasher.update(data)
                    await handle.write(data)
                    tracker.add_bytes(len(data))
        if sum(c.size_bytes for c in chunks) != digest.size_bytes or (
            await hasher.hexdigest() != digest.hash
        ):
            raise DigestMismatch(f"the server's chunks of {digest} do not make it")
        return True

    # -- directories -------------------------------------------------------------------------

    async def upload_directory(self, path: str | os.PathLike[str]) -> Digest:
        """Upload a directory as a REAPI Merkle tree; returns the root Directory's digest."""
        tree = await anyio.to_thread.run_sync(build_tree, Path(path), self.digest_function)
        missing = set(await self.find_missing([*tree.directories, *tree.files]))
        sizes = [d.size_bytes for d in missing]
        tracker = _Tracker(self.progress, len(missing), sum(sizes))
        small_files = [
            d for d in tree.files if d in missing and d.size_bytes <= self.batch_blob_limit
        ]
        large_files = [
            d for d in tree.files if d in missing and d.size_bytes > self.batch_blob_limit
        ]
        directories = [(d, b) for d, b in tree.directories.items() if d in missing]
        await _run_all(
            [
                partial(self._upload_batch, [(d, tree.directories[d]) for d in b], tracker)
                for b in self._batches([d for d, _ in directories])
            ]
            + [
                partial(self._upload_file_batch, b, tree.files, tracker)
                for b in self._batches(small_files)
            ]
            + [partial(self._upload_path, d, tree.files[d], tracker) for d in large_files]
        )
        return tree.root

    async def _upload_file_batch(
        self, batch: list[Digest], paths: Mapping[Digest, Path], tracker: _Tracker
    ) -> None:
        def read_all() -> list[tuple[Digest, bytes]]:
            return [(d, paths[d].read_bytes()) for d in batch]

        async with self._limiter:
            blobs = await anyio.to_thread.run_sync(read_all)
        for digest, data in blobs:
            _verify(digest, data)
        await self._upload_batch(blobs, tracker)

    async def get_tree(self, root: Digest) -> list[re_pb2.Directory]:
        """Every Directory under ``root`` (GetTree, all pages)."""
        directories: list[re_pb2.Directory] = []
        token = ""
        while True:
            request = re_pb2.GetTreeRequest(
                instance_name=self.instance_name,
                root_digest=root.to_proto(),
                page_token=token,
                digest_function=function_field([root]),
            )
            token = ""
            try:
                async for page in self._cas.GetTree(request, timeout=self.timeout):
                    directories.extend(page.directories)
                    token = page.next_page_token
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise BlobNotFound(root) from exc
                raise
            if not token:
                return directories

    async def tree(self, root: Digest) -> dict[Digest, re_pb2.Directory]:
        """Every Directory under ``root`` by digest: from the caches when the tree is known
        whole (one recursive query), else from GetTree, then remembered."""
        if self.cache is not None:
            known = await self.cache.trees.descendants(root)
            if known is not None:
                found = {d: e for d in known if (e := self.cache.entries.get(d)) is not None}
                found.update(
                    await self.cache.metadata.get_directories(d for d in known if d not in found)
                )
                if len(found) == len(known):
                    return found
        encoded = {
            Digest.of(data, root.function): data
            for data in (d.SerializeToString(deterministic=True) for d in await self.get_tree(root))
        }
        by_digest = {digest: re_pb2.Directory.FromString(data) for digest, data in encoded.items()}
        if root.is_empty:
            by_digest.setdefault(root, re_pb2.Directory())
        if self.cache is not None and _complete(root, by_digest):
            for digest, directory in by_digest.items():
                self.cache.entries.put(digest, directory)
            await self.cache.metadata.put_directories(encoded)
            await self.cache.trees.record(root, by_digest)
        return by_digest

    async def download_directory(self, root: Digest, path: str | os.PathLike[str]) -> None:
        """Recreate the tree under ``root`` at ``path`` (created if needed)."""
        by_digest = await self.tree(root)
        plan = _Plan()
        _plan_directory(root, Path(path), by_digest, plan)
        await anyio.to_thread.run_sync(plan.make_directories)
        small = [d for d in plan.files if d.size_bytes <= self.batch_blob_limit]
        large = [d for d in plan.files if d.size_bytes > self.batch_blob_limit]
        await _run_all(
            [partial(self._download_file_batch, b, plan) for b in self._batches(small)]
            + [partial(self._download_large_file, d, plan) for d in large]
        )
        await anyio.to_thread.run_sync(plan.make_symlinks)

    async def _download_file_batch(self, batch: list[Digest], plan: _Plan) -> None:
        blobs = await self.download_blobs(batch)
        await anyio.to_thread.run_sync(plan.write_files, blobs)

    async def _download_large_file(self, digest: Digest, plan: _Plan) -> None:
        (first, executable), *others = plan.files[digest]
        await self.download_file(digest, first, executable=executable)
        await anyio.to_thread.run_sync(plan.copy_file, first, others)

    # -- action cache ------------------------------------------------------------------------

    async def get_action_result(self, action: Digest) -> re_pb2.ActionResult | None:
        request = re_pb2.GetActionResultRequest(
            instance_name=self.instance_name,
            action_digest=action.to_proto(),
            digest_function=function_field([action]),
        )
        try:
            result: re_pb2.ActionResult = await self._retrying(
                lambda: self._action_cache.GetActionResult(request, timeout=self.timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return result

    async def update_action_result(
        self, action: Digest, result: re_pb2.ActionResult
    ) -> re_pb2.ActionResult:
        request = re_pb2.UpdateActionResultRequest(
            instance_name=self.instance_name,
            action_digest=action.to_proto(),
            action_result=result,
            digest_function=function_field([action]),
        )
        stored: re_pb2.ActionResult = await self._retrying(
            lambda: self._action_cache.UpdateActionResult(request, timeout=self.timeout)
        )
        return stored


def _pieces(chunk: bytes, size: int) -> Iterator[bytes]:
    if len(chunk) <= size:
        yield chunk
        return
    view = memoryview(chunk)
    for start in range(0, len(chunk), size):
        yield bytes(view[start : start + size])


async def _run_all(jobs: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run jobs concurrently; if any fails, the others are cancelled and the first error is
    raised as itself (library callers catch BlobNotFound, not an ExceptionGroup)."""
    try:
        async with anyio.create_task_group() as tasks:
            for job in jobs:
                tasks.start_soon(job)
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        first = next((e for e in errors if isinstance(e, Exception)), errors[0])
        raise first from group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return found


def _connection_error(endpoint: str, exc: grpc.aio.AioRpcError) -> CasError:
    """A failed first call to ``endpoint`` as the asynccas error a caller can act on."""
    code, details = exc.code(), exc.details() or ""
    text = f"{endpoint} answered {code.name}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(text)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(text)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return BackendUnavailable(f"cannot reach {endpoint} ({code.name}): {details}")
    return CasError(text)


def _digests_of_pieces(
    source: Path, pieces: Sequence[tuple[int, int]], function: DigestFunction
) -> list[Digest]:
    """The digest of each (offset, length) piece of a file (blocking)."""
    digests = []
    with source.open("rb") as handle:
        for offset, length in pieces:
            handle.seek(offset)
            digests.append(Digest.of(handle.read(length), function))
    return digests


def _verify(digest: Digest, data: bytes) -> None:
    hasher = digest.function.new_hasher()
    hasher.update(data)
    if len(data) != digest.size_bytes or hasher.hexdigest() != digest.hash:
        actual = Digest.of(data, digest.function)
        raise DigestMismatch(f"got data with digest {actual}, expected {digest}")


def _finish_file(temp: Path, target: Path, executable: bool) -> None:
    os.chmod(temp, 0o755 if executable else 0o644)
    os.replace(temp, target)


def _complete(root: Digest, tree: Mapping[Digest, re_pb2.Directory]) -> bool:
    """Whether GetTree returned every directory the tree refers to (none were missing)."""
    if root not in tree:
        return False
    for directory in tree.values():
        for child in directory.directories:
            if Digest.from_proto(child.digest, root.function.proto_value) not in tree:
                return False
    return True


def _safe_name(name: str) -> str:
    """A Directory entry name from the server must be one plain path segment."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise InvalidArgument(f"the tree names an entry {name!r}, which is not a plain file name")
    return name


class _Plan:
    """Where each downloaded blob goes, worked out before any file is written."""

    def __init__(self) -> None:
        self.directories: list[Path] = []
        self.files: dict[Digest, list[tuple[Path, bool]]] = {}
        self.symlinks: list[tuple[Path, str]] = []

    def make_directories(self) -> None:
        for directory in self.directories:
            directory.mkdir(parents=True, exist_ok=True)

    def write_files(self, blobs: Mapping[Digest, bytes]) -> None:
        for digest, data in blobs.items():
            for path, executable in self.files[digest]:
                path.write_bytes(data)
                os.chmod(path, 0o755 if executable else 0o644)

    def copy_file(self, source: Path, others: list[tuple[Path, bool]]) -> None:
        data_path = source
        for path, executable in others:
            with data_path.open("rb") as src, path.open("wb") as dst:
                while chunk := src.read(CHUNK_SIZE):
                    dst.write(chunk)
            os.chmod(path, 0o755 if executable else 0o644)

    def make_symlinks(self) -> None:
        for path, target in self.symlinks:
            os.symlink(target, path)


def _plan_directory(
    digest: Digest, path: Path, by_digest: Mapping[Digest, re_pb2.Directory], plan: _Plan
) -> None:
    directory = by_digest.get(digest)
    if directory is None:
        raise BlobNotFound(digest)
    plan.directories.append(path)
    for node in directory.files:
        file_digest = Digest.from_proto(node.digest, digest.function.proto_value)
        target = path / _safe_name(node.name)
        plan.files.setdefault(file_digest, []).append((target, node.is_executable))
    for link in directory.symlinks:
        plan.symlinks.append((path / _safe_name(link.name), link.target))
    for child in directory.directories:
        child_digest = Digest.from_proto(child.digest, digest.function.proto_value)
        _plan_directory(child_digest, path / _safe_name(child.name), by_digest, plan)
