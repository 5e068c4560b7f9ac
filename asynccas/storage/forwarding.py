"""The base of wrappers around one storage: every call goes to ``inner`` unless the wrapper
changes it, and each optional capability is offered exactly when ``inner`` offers it. A wrapper
then overrides only what it is about (a read cache: ``get``, ``bulk_read`` and ``delete``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import cast

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import CasError
from asynccas.storage.base import (
    BlobWriter,
    Deletable,
    DeletionMarked,
    Listable,
    Stageable,
    Storage,
    deletion_marker,
    publish_staged,
    release_staged,
    stage,
)
from asynccas.storage.context import RequestContext


class ForwardingStorage(Storage, Stageable, Deletable, Listable, DeletionMarked):
    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def offers(self, capability: type) -> bool:
        return isinstance(self, capability) and self.inner.offers(capability)

    def wrapped(self) -> Storage:
        return self.inner

    def why_not(self, capability: type) -> str:
        if isinstance(self, capability):
            return f"{type(self).__name__} wraps a storage that does not: {self.inner.why_not(capability)}"
        return super().why_not(capability)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        return await self.inner.find_missing(ctx, batch)

    def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        return self.inner.get(ctx, digest, offset, limit)

    def get_zstd(self, ctx: RequestContext, digest: Digest) -> AsyncGenerator[bytes] | None:
        return self.inner.get_zstd(ctx, digest)

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        return await self.inner.put(ctx, digest)

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        return await self.inner.bulk_read(ctx, digests)

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        return await self.inner.bulk_update(ctx, blobs)

    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        return await stage(self.inner, ctx, blobs)

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        await publish_staged(self.inner, writers)

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        await release_staged(self.inner, writers)

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        return await cast(Deletable, self.inner).delete(digests)

    def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        return cast(Listable, self.inner).list_blobs()

    async def deletion_marker(self) -> int | None:
        return await deletion_marker(self.inner)


def innermost(storage: Storage, kind: type) -> Storage | None:
    """The first storage of type ``kind`` found going down through wrappers (the index that
    eviction works through, under a read cache or behind a proxy's upstream)."""
    below: Storage | None = storage
    while below is not None:
        if isinstance(below, kind):
            return below
        below = below.wrapped()
    return None
