"""Blobs as objects in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW), so
that several stateless frontends share one copy of every blob.

Each blob is one object, ``{prefix}{function}/{hash}-{size}``: the size is part of the key, so a
digest with a real hash and a wrong size is simply absent. Nothing is visible before it is
verified: a blob of up to ``part_size`` bytes is sent in one PUT after its hash checked; a
larger one goes as a multipart upload, parts sent while the client streams, and only the
CompleteMultipartUpload that follows a good hash makes it an object (a bad or abandoned upload
is aborted, its parts never seen). Reads are ranged GETs streamed in chunks.

Memory stays bounded: a writer reserves twice ``min(size, part_size)`` bytes (the messages it
gathers, and the one body they are joined into while it is sent) from the storage's
``buffer_bytes`` when it opens, waiting for room rather than growing past it. Batches and checks run as concurrent requests, at most ``max_requests`` at
once. Transient failures (5xx, throttling, dropped connections) are retried by botocore's
"standard" policy; what still fails is ``BackendUnavailable`` naming the object store, and the
next call tries again, so the store coming back needs no restart.

The client is aiobotocore (botocore on aiohttp): AWS's own request signing, the standard
credential chain (``AWS_ACCESS_KEY_ID`` and friends, ``~/.aws``, instance roles) and every S3
dialect's quirks, rather than a hand-written signer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

import anyio

from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import BackendUnavailable, BlobNotFound, CasError, ConfigurationError
from asynccas.hashing import hash_parts
from asynccas.outages import outages
from asynccas.storage.base import (
    CHUNK_SIZE,
    BlobWriter,
    Deletable,
    Listable,
    Stageable,
    Storage,
    abort_all,
    stage_with_writers,
)
from asynccas.storage.context import RequestContext
from asynccas.threads import in_thread

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MIN_PART_SIZE: Final = 5 * 1024 * 1024
"""S3's smallest part (all but the last) of a multipart upload."""
_DELETE_BATCH: Final = 1000  # DeleteObjects' limit
_KEY: Final = re.compile(r"([a-z0-9]+)/([0-9a-f]+)-(\d+)")


class ByteReservations:
    """A byte budget that waits for room instead of overflowing: what bounds the memory of
    every writer buffering parts. A reservation larger than the whole budget is capped to it
    (the budget then serves that writer alone)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self._room = asyncio.Condition()

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        async with self._room:
            await self._room.wait_for(lambda: self.in_use + n <= self.total)
            self.in_use += n
        return n

    async def give_back(self, n: int) -> None:
        if n:
            async with self._room:
                self.in_use -= n
                self._room.notify_all()


class S3Storage(Storage, Stageable, Deletable, Listable):
    """One bucket (and key prefix) of an S3-compatible store; see the module's docstring."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        create_bucket: bool = False,
        max_requests: int = 32,
        part_size: int = 8 * 1024 * 1024,
        buffer_bytes: int = 512 * 1024 * 1024,
        request_timeout: float = 60.0,
        attempts: int = 3,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ConfigurationError(
                f"part_size {part_size} is under S3's smallest part ({MIN_PART_SIZE} bytes)"
            )
        if buffer_bytes < 2 * part_size:
            raise ConfigurationError(
                f"buffer_bytes {buffer_bytes} must hold at least one part twice"
                f" ({2 * part_size} bytes)"
            )
        if max_requests < 1 or attempts < 1:
            raise ConfigurationError("max_requests and attempts must be at least 1")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix
        self.create_bucket = create_bucket
        self.max_requests = max_requests
        self.part_size = part_size
        self.buffers = ByteReservations(buffer_bytes)
        self._credentials = {
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "aws_session_token": session_token,
        }
        self._timeout = request_timeout
        self._attempts = attempts
        self._client: Any = None
        self._exit = contextlib.AsyncExitStack()
        self._requests = asyncio.Semaphore(max_requests)
        self.where = f"s3://{bucket}/{prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        self._outages = outages("object store", self.where)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        session, options = await in_thread(self._prepared_client)
        self._client = await self._exit.enter_async_context(session.create_client(**options))
        try:
            await self._check_bucket()
        except BackendUnavailable as exc:
            # A store that is down at start may come back: serve, and answer UNAVAILABLE.
            logger.warning("%s", exc)
        except BaseException:
            await self.stop()
            raise

    def _prepared_client(self) -> tuple[Any, dict[str, Any]]:
        """An aiobotocore session and the options of this storage's client, prepared in a
        worker thread: importing botocore, loading its JSON service models and resolving
        credentials (environment, ~/.aws files) read files, which must not block the event
        loop. Creating one client here, on a loop of this thread's own, leaves all of that
        cached in the session, so the loop's own client is made without touching the disk."""
        try:
            from aiobotocore.session import get_session
            from botocore.config import Config
        except ImportError:  # pragma: no cover - the extra is part of dev
            raise ConfigurationError(
                "the s3 storage needs aiobotocore: pip install 'asynccas[s3]'"
            ) from None
        config = Config(
            # Checksums beyond Content-MD5 are optional in S3 and unknown to some stores; the
            # blob's own hash is checked anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "total_max_attempts": self._attempts},
            connect_timeout=5,
            read_timeout=self._timeout,
            max_pool_connections=self.max_requests,
        )
        options: dict[str, Any] = {
            "service_name": "s3",
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "config": config,
            **{k: v for k, v in self._credentials.items() if v is not None},
        }
        session = get_session()

        async def create_once() -> None:
            async with session.create_client(**options):
                pass

        asyncio.run(create_once())
        return session, options

    async def _check_bucket(self) -> None:
        try:
            await self._call("check the bucket", "head_bucket", absent_ok=True)
            return
        except _Absent:
            pass
        if not self.create_bucket:
            raise ConfigurationError(
                f"{self.where}: the bucket {self.bucket!r} does not exist"
                " (create it, or set create_bucket = true)"
            )
        await self._call("create the bucket", "create_bucket")
        logger.info("created the bucket %s", self.where)

    async def stop(self) -> None:
        self._client = None
        with anyio.CancelScope(shield=True):
            await self._exit.aclose()

    # -- keys and errors ---------------------------------------------------------------------

    def key(self, digest: Digest) -> str:
        # Validated hex and an int: no client string reaches the key unchecked.
        return f"{self.prefix}{digest.function.lower_name}/{digest.hash}-{digest.size_bytes}"

    def digest_of(self, key: str) -> Digest | None:
        """The digest an object key names, or None for an object that is not a blob."""
        match = _KEY.fullmatch(key[len(self.prefix) :]) if key.startswith(self.prefix) else None
        if match is None:
            return None
        try:
            function = DigestFunction.from_name(match.group(1))
            return Digest(match.group(2), int(match.group(3)), function)
        except (ValueError, CasError):
            return None

    @contextlib.contextmanager
    def _errors(self, action: str, *, absent_ok: bool = False) -> Iterator[None]:
        """Translate the client's errors into ``BackendUnavailable`` at this one boundary;
        with ``absent_ok``, a 404 is an answer (``_Absent``), not a failure."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if absent_ok and _status(exc) == 404:
                self._outages.succeeded()
                raise _Absent from None
            self._outages.failed(exc)
            code = exc.response.get("Error", {}).get("Code", "?")
            raise BackendUnavailable(
                f"the object store {self.where} refused to {action}: {code}: {exc}"
            ) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            self._outages.failed(exc)
            raise BackendUnavailable(
                f"the object store {self.where} is unreachable while trying to {action}: {exc}"
            ) from exc
        except Exception as exc:  # aiohttp's errors, not imported here
            if type(exc).__module__.startswith("aiohttp"):
                self._outages.failed(exc)
                raise BackendUnavailable(
                    f"the object store {self.where} failed while trying to {action}: {exc!r}"
                ) from exc
            raise
        self._outages.succeeded()

    def _connected(self) -> Any:
        if self._client is None:
            raise BackendUnavailable(f"the object store {self.where} is not started")
        return self._client

    async def _call(
        self, action: str, method: str, *, absent_ok: bool = False, **kwargs: Any
    ) -> Any:
        client = self._connected()
        async with self._requests:
            with self._errors(action, absent_ok=absent_ok):
                return await getattr(client, method)(Bucket=self.bucket, **kwargs)

    async def _exists(self, digest: Digest) -> bool:
        try:
            await self._call("check a blob", "head_object", absent_ok=True, Key=self.key(digest))
        except _Absent:
            return False
        return True

    # -- the storage protocol ----------------------------------------------------------------

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = batch.digests
        first: dict[Digest, int] = {}
        for position, digest in enumerate(digests):
            first.setdefault(digest, position)
        present = await _bounded(self.max_requests, self._exists, list(first))
        mask = bytearray(len(digests))
        for position, here in zip(first.values(), present, strict=True):
            if not here:
                mask[position] = 1
        return bytes(mask)

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        size = digest.size_bytes
        end = size if limit == 0 else min(size, offset + limit)
        if end <= offset:  # nothing to send, but an absent blob must still say so
            if not await self._exists(digest):
                raise BlobNotFound(digest)
            return
        ranged = {"Range": f"bytes={offset}-{end - 1}"} if offset or end < size else {}
        try:
            response = await self._call(
                "read a blob", "get_object", absent_ok=True, Key=self.key(digest), **ranged
            )
        except _Absent:
            raise BlobNotFound(digest) from None
        body = response["Body"]
        sent = 0
        try:
            chunks = body.iter_chunks(CHUNK_SIZE)
            while True:
                with self._errors("read a blob"):
                    chunk = await anext(chunks, b"")
                if not chunk:
                    break
                sent += len(chunk)
                yield chunk
        finally:
            body.close()
        if sent != end - offset:
            self._outages.failed(ValueError("short object"))
            raise BackendUnavailable(
                f"the object store {self.where} sent {sent} of the {end - offset} bytes asked"
                f" of blob {digest}"
            )

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        reserved = await self.buffers.take(2 * min(digest.size_bytes, self.part_size))
        return _S3Writer(self, digest, reserved)

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))

        async def read(digest: Digest) -> bytes | None:
            try:
                return b"".join([chunk async for chunk in self.get(ctx, digest)])
            except BlobNotFound:
                return None

        found = await _bounded(self.max_requests, read, unique)
        return {d: data for d, data in zip(unique, found, strict=True) if data is not None}

    # Batches: each blob verified in memory, then all sent side by side.

    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        return await stage_with_writers(self, ctx, blobs)

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        await _bounded(self.max_requests, _publish, writers)

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        await abort_all(writers)

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(digests))
        present = await _bounded(self.max_requests, self._exists, unique)
        gone = [d for d, here in zip(unique, present, strict=True) if here]
        for start in range(0, len(gone), _DELETE_BATCH):
            objects = [{"Key": self.key(d)} for d in gone[start : start + _DELETE_BATCH]]
            reply = await self._call(
                "delete blobs", "delete_objects", Delete={"Objects": objects, "Quiet": True}
            )
            if reply.get("Errors"):
                error = reply["Errors"][0]
                raise BackendUnavailable(
                    f"the object store {self.where} did not delete {error.get('Key')}:"
                    f" {error.get('Code')}: {error.get('Message')}"
                )
        return gone

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        token: dict[str, Any] = {}
        while True:
            page = await self._call(
                "list blobs", "list_objects_v2", Prefix=self.prefix, MaxKeys=1000, **token
            )
            for entry in page.get("Contents", ()):
                digest = self.digest_of(entry["Key"])
                if digest is not None:
                    yield digest, entry["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}


class _S3Writer(BlobWriter):
    """Buffers up to a part; a blob larger than a part becomes a multipart upload whose parts
    are sent as they fill and which only ``publish`` completes."""

    def __init__(self, storage: S3Storage, digest: Digest, reserved: int) -> None:
        super().__init__(digest)
        self._storage = storage
        self._reserved = reserved
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._published = False

    async def _write(self, parts: list[bytes]) -> None:
        await hash_parts(self._hasher, parts)
        for part in parts:
            self._buffer.append(part)
            self._buffered += len(part)
            # A part goes once the buffer is full; the last one (whatever its size) only when
            # the whole blob is in, at ``_finish``.
            if self._buffered >= self._storage.part_size:
                await self._send_part()

    async def _send_part(self) -> None:
        storage = self._storage
        key = storage.key(self.digest)
        if self._upload_id is None:
            reply = await storage._call(
                "start a multipart upload", "create_multipart_upload", Key=key
            )
            self._upload_id = reply["UploadId"]
        body, self._buffer, self._buffered = b"".join(self._buffer), [], 0
        number = len(self._parts) + 1
        reply = await storage._call(
            "send a part", "upload_part", Key=key, UploadId=self._upload_id,
            PartNumber=number, Body=body,
        )  # fmt: skip
        self._parts.append({"ETag": reply["ETag"], "PartNumber": number})

    async def _finish(self, tail: list[bytes]) -> None:
        if tail:
            await hash_parts(self._hasher, tail)
            self._buffer += tail
            self._buffered += sum(map(len, tail))
        if self._upload_id is not None and self._buffer:
            await self._send_part()

    async def _publish(self) -> None:
        if self._published:
            return
        storage = self._storage
        key = storage.key(self.digest)
        if self._upload_id is None:
            await storage._call("store a blob", "put_object", Key=key, Body=b"".join(self._buffer))
        else:
            await storage._call(
                "complete a multipart upload", "complete_multipart_upload", Key=key,
                UploadId=self._upload_id, MultipartUpload={"Parts": self._parts},
            )  # fmt: skip
        self._published = True
        self._buffer, self._buffered = [], 0

    async def _abort(self) -> None:
        self._buffer, self._buffered = [], 0
        upload_id, self._upload_id = self._upload_id, None
        reserved, self._reserved = self._reserved, 0
        try:
            if upload_id is not None and not self._published:
                with anyio.CancelScope(shield=True):
                    await self._storage._call(
                        "abort a multipart upload", "abort_multipart_upload",
                        Key=self._storage.key(self.digest), UploadId=upload_id,
                    )  # fmt: skip
        except BackendUnavailable as exc:
            # Its parts are invisible; a bucket lifecycle rule removes them eventually.
            logger.warning("could not abort an unfinished upload: %s", exc)
        finally:
            await self._storage.buffers.give_back(reserved)


async def _publish(writer: BlobWriter) -> None:
    await writer.publish()


def _status(error: Any) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class _Absent(Exception):
    """The object (or bucket) asked for does not exist: an answer, not an outage."""


async def _bounded(width: int, call: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R]:
    """``call`` on every item, at most ``width`` at once, results in order; the first error
    cancels the rest and is raised."""
    results: list[Any] = [None] * len(items)
    positions = iter(range(len(items)))  # shared: each worker takes the next item

    async def worker() -> None:
        for position in positions:
            results[position] = await call(items[position])

    try:
        async with anyio.create_task_group() as group:
            for _ in range(min(width, len(items))):
                group.start_soon(worker)
    except BaseExceptionGroup as failures:
        # Callers handle one error (e.g. BackendUnavailable), as from a plain loop.
        raise failures.exceptions[0] from None
    return results
