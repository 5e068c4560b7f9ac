"""REAPI's rules about blobs that every service applies: the empty blob always exists, whether
or not anyone stored it, and no blob over the advertised ``max_cas_blob_size_bytes`` is
taken. Storages are plain stores and know nothing of either."""

from __future__ import annotations

from collections.abc import Sequence

from asynccas.digest import Digest
from asynccas.errors import InvalidArgument
from asynccas.storage.base import Storage
from asynccas.storage.context import RequestContext


async def read_small_blobs(
    storage: Storage, ctx: RequestContext, digests: Sequence[Digest]
) -> dict[Digest, bytes]:
    """``bulk_read``, with the empty blob found whatever the storage holds."""
    found = await storage.bulk_read(ctx, [d for d in digests if not d.is_empty])
    found.update((d, b"") for d in digests if d.is_empty)
    return found


def check_blob_size(digest: Digest, limit: int) -> None:
    """Refuse, before any of its data is stored, a blob over this server's ``limit`` (0: none)."""
    if limit and digest.size_bytes > limit:
        raise InvalidArgument(
            f"blob {digest} is larger than this server's max_cas_blob_size_bytes ({limit})"
        )
