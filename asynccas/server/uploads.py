"""ByteStream uploads in progress, kept between streams so that a client can resume one.

A write stream that ends without ``finish_write`` parks its upload here under its
resource name; ``QueryWriteStatus`` reports how far it got and a later stream
continues at that offset. Parked uploads hold temp files (but no memory and no open
descriptor), so they expire after ``idle_timeout`` seconds and the oldest are dropped
beyond ``max_parked``. At most ``max_active`` uploads stream at once: one client opening
streams and sending nothing cannot take every descriptor or every byte of the write buffers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio

from asynccas import metrics
from asynccas.compression import DecompressingWriter
from asynccas.errors import InvalidArgument, Overloaded, UploadConflict
from asynccas.resource_names import BlobResource
from asynccas.storage.base import BlobWriter, Storage
from asynccas.storage.context import RequestContext

UploadKey = tuple[str, str, str, str, str]
"""Caller, instance name, upload id, digest key, compressor ("" for none)."""


def upload_key(ctx: RequestContext, resource: BlobResource) -> UploadKey:
    """Uploads are the caller's own: another caller naming the same upload id (guessed, or
    by chance) neither resumes it nor learns how far it got."""
    caller = ctx.identity.name if ctx.identity is not None else ""
    return (caller, resource.instance_name, resource.upload_id, resource.digest.key,
            resource.compressor or "")  # fmt: skip


@dataclass
class Upload:
    key: UploadKey
    writer: BlobWriter
    last_used: float = field(default_factory=time.monotonic)


class UploadSessions:
    def __init__(
        self,
        storage: Storage,
        *,
        idle_timeout: float = 600.0,
        max_parked: int = 1000,
        max_active: int = 1000,
        max_parked_compressed: int = 16,
    ) -> None:
        self.storage = storage
        self.idle_timeout = idle_timeout
        self.max_parked = max_parked
        self.max_active = max_active
        self.max_parked_compressed = max_parked_compressed
        self._parked: OrderedDict[UploadKey, Upload] = OrderedDict()
        self._active: set[UploadKey] = set()

    async def begin(self, ctx: RequestContext, resource: BlobResource, write_offset: int) -> Upload:
        """Start or resume the caller's upload named by ``resource`` at ``write_offset``."""
        key = upload_key(ctx, resource)
        if key in self._active:
            raise UploadConflict(f"another stream is already writing upload {resource.upload_id}")
        if len(self._active) >= self.max_active:
            raise Overloaded(
                f"{len(self._active)} uploads are in progress, this server's limit; retry later"
            )
        parked = self._parked.pop(key, None)
        if parked is not None and write_offset == parked.writer.committed_size:
            self._active.add(key)
            self._count_active()
            return parked
        if parked is not None:
            await _abort(parked)
        if write_offset != 0:
            held = parked.writer.committed_size if parked else 0
            raise InvalidArgument(
                f"write_offset {write_offset} does not continue upload {resource.upload_id}:"
                f" the server holds {held} bytes of it (see QueryWriteStatus)"
            )
        writer = await self.storage.put(ctx, resource.digest)
        if resource.compressor is not None:
            writer = DecompressingWriter(writer)
        upload = Upload(key, writer)
        self._active.add(key)
        self._count_active()
        return upload

    async def park(self, upload: Upload) -> None:
        """Keep an unfinished upload for a later stream to resume."""
        self._active.discard(upload.key)
        self._count_active()
        try:
            await upload.writer.release_memory()  # parked data waits on disk, not in memory
        except BaseException:
            await _abort(upload)
            raise
        upload.last_used = time.monotonic()
        self._parked[upload.key] = upload
        while len(self._parked) > self.max_parked:
            _, oldest = self._parked.popitem(last=False)
            await _abort(oldest)
        # A parked compressed upload also keeps its decoder's window (up to 16 MiB) in memory.
        compressed = [
            k for k, u in self._parked.items() if isinstance(u.writer, DecompressingWriter)
        ]
        for key in compressed[: max(0, len(compressed) - self.max_parked_compressed)]:
            await _abort(self._parked.pop(key))

    async def end(self, upload: Upload, *, abort: bool) -> None:
        try:
            if abort:
                await _abort(upload)
        finally:
            self._active.discard(upload.key)
            self._count_active()

    def _count_active(self) -> None:
        counting = metrics.active()
        if counting is not None:
            counting.uploads_in_flight.set(len(self._active))

    def committed_size(self, ctx: RequestContext, resource: BlobResource) -> int:
        parked = self._parked.get(upload_key(ctx, resource))
        return parked.writer.committed_size if parked else 0

    async def expire_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for key, upload in list(self._parked.items()):
            if upload.last_used < cutoff:
                del self._parked[key]
                await _abort(upload)

    async def run_expiry(self, interval: float = 30.0) -> None:
        while True:
            await anyio.sleep(interval)
            await self.expire_idle()

    async def close(self) -> None:
        while self._parked:
            _, upload = self._parked.popitem()
            await _abort(upload)


async def _abort(upload: Upload) -> None:
    with anyio.CancelScope(shield=True):
        await upload.writer.abort()
