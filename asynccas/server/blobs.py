"""REAPI's rule about blobs that every service applies: the empty blob always exists, whether
or not anyone stored it. Storages are plain stores and know nothing of it."""

from __future__ import annotations

from collections.abc import Sequence

from asynccas.digest import Digest
from asynccas.storage.base import Storage
from asynccas.storage.context import RequestContext


async def read_small_blobs(
    storage: Storage, ctx: RequestContext, digests: Sequence[Digest]
) -> dict[Digest, bytes]:
    """``bulk_read``, with the empty blob found whatever the storage holds."""
    found = await storage.bulk_read(ctx, [d for d in digests if not d.is_empty])
    found.update((d, b"") for d in digests if d.is_empty)
    return found
