"""Small blobs in one storage, large ones in another (bb-storage's SizeDistinguishingBlobAccess)."""

from __future__ import annotations

from asynccas.digest import Digest
from asynccas.storage.base import Storage
from asynccas.storage.routing import RoutingStorage


class SizeDifferentiatedStorage(RoutingStorage):
    """Blobs up to ``limit`` bytes in ``small`` (e.g. SQLite rows or memory), larger ones in
    ``large`` (e.g. disk). Where a blob lives follows from its digest alone."""

    def __init__(self, small: Storage, large: Storage, *, limit: int = 64 * 1024) -> None:
        super().__init__([small, large])
        self.small = small
        self.large = large
        self.limit = limit

    def route(self, digest: Digest) -> int:
        return 0 if digest.size_bytes <= self.limit else 1
