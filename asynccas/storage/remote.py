"""A storage that is another REAPI CAS, reached over grpc.aio: BuildGrid's ``RemoteStorage``,
made async. It is what lets asynccas be a caching proxy (a local store in front of it, see
``with_cache``) or a frontend over storage nodes (see ``sharded`` and ``mirrored``).

Every call carries on to the remote with the caller's instance (or a fixed one) and digest
function. Small blobs travel in batches cut to the remote's ``max_batch_total_size_bytes``
(asked once from its Capabilities, and again after it went away); larger ones through
ByteStream, streamed both ways, never whole in memory.

Failures: UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are retried ``retries``
times with capped exponential backoff and jitter (never past the caller's deadline); an
interrupted upload resumes where the remote's QueryWriteStatus says it stopped, from the
last ``REPLAY_BYTES`` this writer sent (a remote that lost more than that, e.g. one that
restarted in the middle of a large upload, gets UNAVAILABLE passed on and the client
uploads again). Each call lasts at most ``request_timeout`` seconds. What REAPI has no call
for (deleting, listing) is not offered, so a graph that needs it is refused when built.

Reads are not verified here (a partial read cannot be); every place that keeps what it read
(a cache filling itself, the client library) verifies as it writes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final, TypeVar

import anyio
import grpc

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.client.channel import (
    backoff_delay,
    check_token,
    failed_send,
    function_field,
    open_channel,
    read_response_data,
    status_code_of,
)
from asynccas.digest import Digest, DigestBatch
from asynccas.errors import (
    BackendUnavailable,
    BlobNotFound,
    CasError,
    DeadlineExceeded,
    DigestMismatch,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Overloaded,
    PermissionDenied,
    UploadConflict,
)
from asynccas.hashing import THREAD_THRESHOLD
from asynccas.outages import outages
from asynccas.resource_names import format_read_name, format_write_name
from asynccas.storage.base import CHUNK_SIZE, BlobWriter, Storage, mask_of
from asynccas.storage.context import RequestContext
from asynccas.transport import ClientTls

T = TypeVar("T")

RETRIED: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
FIRST_BACKOFF: Final = 0.1
"""Seconds before the first retry; each later one waits twice as long, up to max_backoff."""
DEFAULT_MAX_BATCH: Final = 4 * 1024 * 1024
"""What a remote that advertises no batch limit is assumed to take (gRPC's default message)."""
PER_BLOB_OVERHEAD: Final = 200
"""Bytes of framing per blob inside a batch request (digest, status, field headers)."""
FIND_MISSING_PER_REQUEST: Final = 10_000
"""Digests per FindMissingBlobs (about 1 MB of request, well under any server's limit)."""
RECONNECT_OPTIONS: Final = [
    # gRPC waits 1 s, then 1.6 times longer each time, up to 2 minutes, before reconnecting to
    # a server that went away; a storage node or upstream that comes back should be used
    # again within seconds. (channel_options can say otherwise.)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
REPLAY_BYTES: Final = 16 * CHUNK_SIZE
"""What an upload keeps of the data it already sent, to resume after an interruption: HTTP/2
flow control lets several megabytes be under way that the remote never stored. It is charged
to the process's ``WRITE_BUFFERS`` budget and shrinks to the last message when the budget is
spent, so that many large uploads at once cost resumability, not memory."""


class RemoteStorage(Storage):
    def __init__(
        self,
        remote: str,
        instance_name: str | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        credentials: ClientTls | grpc.ChannelCredentials | None = None,
        retries: int = 0,
        max_backoff: float = 64,
        request_timeout: float | None = None,
        *,
        token: str | None = None,
    ) -> None:
        """``remote``: ``grpc://host:port`` or ``grpcs://host:port``; ``instance_name``: the
        remote instance every call uses (None: each caller's own); ``credentials``: TLS (a
        ``ClientTls`` of files, or grpc's credentials); ``retries``: how many times a call
        that failed transiently is tried again; ``max_backoff``: the longest wait between
        tries, in seconds; ``request_timeout``: the longest one call may take (None: the
        caller's deadline only); ``token``: sent as ``authorization: Bearer TOKEN``."""
        if retries < 0:
            raise ValueError(f"retries cannot be negative ({retries})")
        if max_backoff <= 0:
            raise ValueError(f"max_backoff must be positive, not {max_backoff}")
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, not {request_timeout}")
        if token is not None:
            check_token(token)
        self.remote = remote
        self.instance_name = instance_name
        self.channel_options = list(channel_options or ())
        self.credentials = credentials
        self.retries = retries
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self.token = token
        self.calls: Counter[str] = Counter()
        """Calls made to the remote, by method (retries included): what benchmarks count."""
        self._channel: grpc.aio.Channel | None = None
        self._max_batch: int | None = None  # None: ask the remote before the next batch
        self._outages = outages("remote CAS", remote)

    def why_not(self, capability: type) -> str:
        return (
            f"a remote CAS ({self.remote}) does not: REAPI has no call to delete or list blobs,"
            " so nothing that evicts or reindexes can work on one"
        )

    async def start(self) -> None:
        tls = self.credentials if isinstance(self.credentials, ClientTls) else None
        ready = None if isinstance(self.credentials, ClientTls) else self.credentials
        channel = await open_channel(
            self.remote,
            tls=tls,
            credentials=ready,
            token=self.token,
            options=[*RECONNECT_OPTIONS, *self.channel_options],
        )
        self._channel = channel
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._capabilities = re_grpc.CapabilitiesStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._read: grpc.aio.UnaryStreamMultiCallable[bs_pb2.ReadRequest, bytes]
        self._read = channel.unary_stream(
            "/google.bytestream.ByteStream/Read",
            request_serializer=bs_pb2.ReadRequest.SerializeToString,
            response_deserializer=read_response_data,
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the remote (once started), for calls beyond the CAS's."""
        assert self._channel is not None, "start() the storage first"
        return self._channel

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # -- calling the remote ------------------------------------------------------------------

    def instance(self, ctx: RequestContext) -> str:
        return ctx.instance_name if self.instance_name is None else self.instance_name

    def timeout(self, ctx: RequestContext) -> float | None:
        """How long the next call may take: request_timeout, or less if the deadline is nearer."""
        remaining = ctx.time_remaining()
        if remaining is None:
            return self.request_timeout
        return remaining if self.request_timeout is None else min(remaining, self.request_timeout)

    async def call(self, ctx: RequestContext, method: str, send: Callable[..., Awaitable[T]]) -> T:
        """``send(timeout=...)``, retried as the class says; failures come out as CasErrors."""
        for attempt in range(self.retries + 1):
            self.calls[method] += 1
            try:
                result = await send(timeout=self.timeout(ctx))
            except grpc.aio.AioRpcError as exc:
                if not await self.retry_after(ctx, exc, attempt):
                    raise self.error(method, exc) from exc
                continue
            self._outages.succeeded()
            return result
        raise AssertionError("unreachable: the last attempt raises")

    async def retry_after(
        self, ctx: RequestContext, failure: grpc.aio.AioRpcError, attempt: int
    ) -> bool:
        """Record ``failure`` of try ``attempt``; if it is worth trying again, wait the backoff
        and say so."""
        code = failure.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._outages.failed(failure)
            self._max_batch = None  # perhaps another server by the time it is back
        if code not in RETRIED or attempt >= self.retries:
            return False
        delay = backoff_delay(attempt, FIRST_BACKOFF, self.max_backoff)
        remaining = ctx.time_remaining()
        if remaining is not None and remaining <= delay:
            return False
        await anyio.sleep(delay)
        return True

    def error(self, method: str, failure: grpc.aio.AioRpcError) -> CasError:
        """The remote's failure as the error asynccas's own client gets."""
        code, details = failure.code(), failure.details() or ""
        text = f"remote CAS {self.remote} answered {method} with {code.name}: {details}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"remote CAS {self.remote} did not answer {method} in time ({details})"
            )
        errors: dict[grpc.StatusCode, type[CasError]] = {
            grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
            grpc.StatusCode.NOT_FOUND: NotFound,
            grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
            grpc.StatusCode.ABORTED: UploadConflict,
            grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
            # The remote refusing asynccas's own credentials is this server's misconfiguration,
            # which the message names; the caller cannot fix it by signing in again.
            grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
            grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        }
        return errors.get(code, BackendUnavailable)(text)

    async def batch_limit(self, ctx: RequestContext) -> int:
        """The largest blob that travels in a batch (the remote's batch limit, less framing)."""
        if self._max_batch is None:
            request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance(ctx))
            answer = await self.call(
                ctx,
                "GetCapabilities",
                partial(self._capabilities.GetCapabilities, request),
            )
            limit = answer.cache_capabilities.max_batch_total_size_bytes
            self._max_batch = limit or DEFAULT_MAX_BATCH
        return max(0, self._max_batch - 4 * PER_BLOB_OVERHEAD)

    def batches(self, sizes: Sequence[int], limit: int) -> list[list[int]]:
        """Positions of blobs of ``sizes`` grouped into batches of at most ``limit`` bytes."""
        batches: list[list[int]] = []
        current: list[int] = []
        total = 0
        for position, size in enumerate(sizes):
            cost = size + PER_BLOB_OVERHEAD
            if current and total + cost > limit:
                batches.append(current)
                current, total = [], 0
            current.append(position)
            total += cost
        if current:
            batches.append(current)
        return batches

    # -- the storage protocol ----------------------------------------------------------------

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = list(dict.fromkeys(batch.digests))
        missing: list[Digest] = []
        for start in range(0, len(digests), FIND_MISSING_PER_REQUEST):
            part = digests[start : start + FIND_MISSING_PER_REQUEST]
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance(ctx),
                blob_digests=[d.to_proto() for d in part],
                digest_function=function_field(part),
            )
            answer = await self.call(
                ctx,
                "FindMissingBlobs",
                partial(self._cas.FindMissingBlobs, request),
            )
            missing += [
                Digest(d.hash, d.size_bytes, batch.function) for d in answer.missing_blob_digests
            ]
        return mask_of(batch, missing)

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        name = format_read_name(self.instance(ctx), digest)
        wanted = limit or digest.size_bytes - offset
        received = 0
        attempt = 0
        while received < wanted or attempt == 0:
            # No read_limit is sent: the stream is cut here once ``wanted`` bytes came, since
            # BuildGrid 0.4.4 fails reads with a limit under its chunk size (DATA_LOSS).
            request = bs_pb2.ReadRequest(resource_name=name, read_offset=offset + received)
            self.calls["Read"] += 1
            call = self._read(request, timeout=self.timeout(ctx))
            try:
                async for data in call:
                    if len(data) > wanted - received:
                        data = data[: wanted - received]
                    received += len(data)
                    for start in range(0, len(data), CHUNK_SIZE):
                        yield data[start : start + CHUNK_SIZE] if len(data) > CHUNK_SIZE else data
                    if received >= wanted:
                        break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise BlobNotFound(digest) from exc
                if not await self.retry_after(ctx, exc, attempt):
                    raise self.error("Read", exc) from exc
                attempt += 1
                continue
            finally:
                await _ended(call)  # a reader that stopped early ends the stream now
            self._outages.succeeded()
            return

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        return RemoteWriter(self, ctx, digest)

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        wanted = list(dict.fromkeys(digests))
        limit = await self.batch_limit(ctx)
        small = [d for d in wanted if d.size_bytes <= limit]
        found: dict[Digest, bytes] = {}
        for digest in wanted:
            if digest.size_bytes > limit:
                data = await self._whole(ctx, digest)
                if data is not None:
                    found[digest] = data
        for positions in self.batches([d.size_bytes for d in small], limit):
            part = [small[p] for p in positions]
            request = re_pb2.BatchReadBlobsRequest(
                instance_name=self.instance(ctx),
                digests=[d.to_proto() for d in part],
                digest_function=function_field(part),
            )
            answer = await self.call(
                ctx,
                "BatchReadBlobs",
                partial(self._cas.BatchReadBlobs, request),
            )
            for digest, response in zip(part, answer.responses, strict=True):
                code = status_code_of(response.status.code)
                if code == grpc.StatusCode.OK:
                    found[digest] = response.data
                elif code != grpc.StatusCode.NOT_FOUND:
                    raise BackendUnavailable(
                        f"remote CAS {self.remote} could not read {digest}: {code.name}"
                        f" {response.status.message}"
                    )
        return found

    async def _whole(self, ctx: RequestContext, digest: Digest) -> bytes | None:
        try:
            return b"".join([chunk async for chunk in self.get(ctx, digest)])
        except BlobNotFound:
            return None

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        results: list[CasError | None] = [None] * len(blobs)
        limit = await self.batch_limit(ctx)
        batched: list[int] = []
        for position, (digest, data) in enumerate(blobs):
            if Digest.of(data, digest.function) != digest:
                results[position] = DigestMismatch(f"data does not match digest {digest}")
            elif digest.size_bytes > limit:
                results[position] = await self._upload_whole(ctx, digest, data)
            else:
                batched.append(position)
        for group in self.batches([blobs[p][0].size_bytes for p in batched], limit):
            positions = [batched[g] for g in group]
            await self._update_batch(ctx, blobs, positions, results)
        return results

    async def _upload_whole(
        self, ctx: RequestContext, digest: Digest, data: bytes
    ) -> CasError | None:
        writer = await self.put(ctx, digest)
        try:
            for start in range(0, len(data), CHUNK_SIZE):
                await writer.write(data[start : start + CHUNK_SIZE])
            await writer.commit()
        except CasError as exc:
            return exc
        return None

    async def _update_batch(
        self,
        ctx: RequestContext,
        blobs: Sequence[tuple[Digest, bytes]],
        positions: list[int],
        results: list[CasError | None],
    ) -> None:
        pending = positions
        for attempt in range(self.retries + 1):
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance(ctx),
                digest_function=function_field([blobs[p][0] for p in pending]),
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(
                        digest=blobs[p][0].to_proto(), data=blobs[p][1]
                    )
                    for p in pending
                ],
            )
            answer = await self.call(
                ctx,
                "BatchUpdateBlobs",
                partial(self._cas.BatchUpdateBlobs, request),
            )
            again = []
            for position, response in zip(pending, answer.responses, strict=True):
                code = status_code_of(response.status.code)
                if code == grpc.StatusCode.OK:
                    results[position] = None
                    continue
                error = CasError(
                    f"remote CAS {self.remote} refused {blobs[position][0]}: {code.name}"
                    f" {response.status.message}"
                )
                results[position] = _as_error(code, str(error))
                if code in RETRIED:
                    again.append(position)
            if not again or attempt >= self.retries:
                return
            pending = again
            await anyio.sleep(backoff_delay(attempt, FIRST_BACKOFF, self.max_backoff))


async def _ended(call: grpc.aio.Call) -> None:
    """Cancel ``call`` if it is still under way, and wait until grpc has taken the
    cancellation in: left to finish later, its last events can reach an event loop that has
    closed meanwhile (a library user's, or a test's)."""
    if call.done():
        return
    call.cancel()
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await call.code()


def _as_error(code: grpc.StatusCode, text: str) -> CasError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(text)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(text)
    return BackendUnavailable(text)


_BROKEN_STREAM: Final = "the upload stream broke while sending"


class RemoteWriter(BlobWriter):
    """One upload to the remote over one ByteStream Write stream, opened by the first data.

    The blob's hash is checked here before the last message (the one with ``finish_write``)
    goes out, so the remote never finishes an upload of wrong data; the remote makes the blob
    visible when it finishes, which makes ``publish`` a no-op. Uploads up to a megabyte (a
    build's usual blob) arrive whole at ``verify`` (``BlobWriter`` gathers them) and go out as
    one message, which can always be sent again."""

    def __init__(self, remote: RemoteStorage, ctx: RequestContext, digest: Digest) -> None:
        super().__init__(digest)
        self._remote = remote
        self._ctx = ctx
        self._name = format_write_name(remote.instance(ctx), str(uuid.uuid4()), digest)
        self._call: grpc.aio.StreamUnaryCall[bs_pb2.WriteRequest, bs_pb2.WriteResponse] | None
        self._call = None
        self._offset = 0  # where the next message's data starts
        self._first_message = True  # the first of each stream names the upload
        self._sent: deque[tuple[int, bytes]] = deque()  # recent messages, for resuming
        self._sent_bytes = 0
        self._remote_has_it = False

    async def _write(self, parts: list[bytes]) -> None:
        await self._hash(parts)
        await self._send(parts, finish=False)

    async def verify(self) -> None:
        self.check_size()
        tail = self.take_pending()
        await self._hash(tail)
        self.check_hash()  # before the remote sees the end of a wrong upload
        await self._send(tail, finish=True)

    async def _hash(self, parts: list[bytes]) -> None:
        for part in parts:
            if len(part) >= THREAD_THRESHOLD:
                await anyio.to_thread.run_sync(self._hasher.update, part)
            else:
                self._hasher.update(part)

    async def _publish(self) -> None:
        """The remote made the blob visible when the upload finished (in ``verify``)."""

    async def _abort(self) -> None:
        if self._call is not None:
            call, self._call = self._call, None
            await _ended(call)
        self._forget_sent()

    async def _send(self, parts: list[bytes], *, finish: bool) -> None:
        pending = deque(
            part[start : start + CHUNK_SIZE]
            for part in parts
            for start in range(0, len(part), CHUNK_SIZE)
        )
        remote = self._remote
        attempt = 0
        while not self._remote_has_it:
            try:
                await self._send_messages(pending, finish)
                return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                failure = await self._outcome(exc)
                if failure is None:  # the remote answered early: it has the blob
                    self._remote_has_it = True
                    return
                # A broken stream is most often a remote that answered early (another upload
                # of the blob just finished) while this one was still sending: ask first.
                broken = (failure.details() or "").startswith(_BROKEN_STREAM)
                if broken and await self._committed_size() >= self.digest.size_bytes:
                    self._remote_has_it = True
                    return
                if not await remote.retry_after(self._ctx, failure, attempt):
                    raise remote.error("Write", failure) from failure
                attempt += 1
                await self._resume(pending)

    async def _send_messages(self, pending: deque[bytes], finish: bool) -> None:
        """Send ``pending`` (emptying it as messages go); with ``finish``, end the upload with
        the last one (or an empty one) and wait for the remote's answer."""
        remote = self._remote
        if not pending and not finish:
            return
        if self._call is None:
            remote.calls["Write"] += 1
            self._call = remote._bytestream.Write(timeout=remote.timeout(self._ctx))
            self._first_message = True
        while pending or finish:
            data = pending[0] if pending else b""
            last = finish and len(pending) <= 1
            await self._call.write(
                bs_pb2.WriteRequest(
                    resource_name=self._name if self._first_message else "",
                    write_offset=self._offset,
                    data=data,
                    finish_write=last,
                )
            )
            self._first_message = False
            if pending:
                pending.popleft()
            self._remember(data)
            if last:
                break
        if not finish:
            return
        assert self._call is not None
        await self._call.done_writing()
        answer = await self._call
        self._call = None
        self._forget_sent()
        remote._outages.succeeded()
        if answer.committed_size not in (self.digest.size_bytes, -1):
            raise DigestMismatch(
                f"remote CAS {remote.remote} committed {answer.committed_size} of"
                f" {self.digest.size_bytes} bytes of {self.digest}"
            )

    def _remember(self, data: bytes) -> None:
        if data:
            self._sent.append((self._offset, data))
            self._sent_bytes += len(data)
            self._buffers.in_use += len(data)
            self._offset += len(data)
        buffers = self._buffers
        while len(self._sent) > 1 and (
            self._sent_bytes - len(self._sent[0][1]) >= REPLAY_BYTES
            or buffers.in_use > buffers.total
        ):
            dropped = len(self._sent.popleft()[1])
            self._sent_bytes -= dropped
            buffers.in_use -= dropped

    def _forget_sent(self) -> None:
        self._buffers.in_use -= self._sent_bytes
        self._sent.clear()
        self._sent_bytes = 0

    async def _outcome(self, exc: BaseException) -> grpc.aio.AioRpcError | None:
        """The failure behind ``exc``, or None if the stream ended because the remote already
        had the blob (it may answer before reading everything)."""
        call, self._call = self._call, None
        if isinstance(exc, grpc.aio.AioRpcError):
            if failed_send(exc):
                # The stream is gone, like a dropped connection; QueryWriteStatus (and a new
                # stream) will say why.
                return grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    f"{_BROKEN_STREAM}: {exc.details()}",
                )
            return exc
        assert call is not None
        try:
            answer = await call
        except grpc.aio.AioRpcError as failure:
            return failure
        if answer.committed_size in (self.digest.size_bytes, -1):
            return None
        raise DigestMismatch(
            f"remote CAS {self._remote.remote} ended the upload of {self.digest} at"
            f" {answer.committed_size} bytes"
        )

    async def _resume(self, pending: deque[bytes]) -> None:
        """Continue a broken upload where the remote says it stopped: the data it lacks goes
        back to the front of ``pending`` (from what this writer still holds)."""
        committed = await self._committed_size()
        if committed >= self.digest.size_bytes:
            self._remote_has_it = True
            return
        oldest = self._sent[0][0] if self._sent else self._offset
        if not oldest <= committed <= self._offset:
            raise BackendUnavailable(
                f"remote CAS {self._remote.remote} lost {oldest - committed} bytes of an"
                f" interrupted upload of {self.digest}; upload it again"
            )
        for start, data in reversed(self._sent):
            if start + len(data) > committed:
                pending.appendleft(data[max(0, committed - start) :])
        self._forget_sent()
        self._offset = committed

    async def _committed_size(self) -> int:
        remote = self._remote
        remote.calls["QueryWriteStatus"] += 1
        try:
            status = await remote._bytestream.QueryWriteStatus(
                bs_pb2.QueryWriteStatusRequest(resource_name=self._name),
                timeout=remote.timeout(self._ctx),
            )
        except grpc.aio.AioRpcError:
            return 0  # the remote keeps no partial uploads (or cannot say): from the start
        return int(status.committed_size)
