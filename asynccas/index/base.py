"""An index is a storage wrapping a storage: fast metadata (existence, size, recency) in front of
the blobs, plus the clean-up API of BuildGrid's indexes, made async."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from datetime import datetime

from asynccas.digest import Digest
from asynccas.storage.base import Storage


class StorageIndex(Storage):
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @abc.abstractmethod
    def least_recent_digests(self) -> AsyncIterator[tuple[Digest, int]]:
        """Indexed blobs with their sizes, least recently used first."""

    @abc.abstractmethod
    async def get_total_size(self) -> int:
        """Exact total bytes of the indexed blobs."""

    @abc.abstractmethod
    async def delete_n_bytes(
        self,
        n_bytes: int,
        dry_run: bool = False,
        protect_blobs_after: datetime | None = None,
        large_blob_threshold: int | None = None,
        large_blob_lifetime: datetime | None = None,
    ) -> int:
        """Free at least ``n_bytes`` if possible, least recently used first; return bytes freed.

        Blobs used at or after ``protect_blobs_after`` are never deleted. Blobs over
        ``large_blob_threshold`` bytes not used since ``large_blob_lifetime`` go first.
        With ``dry_run`` nothing is deleted and the bytes that would be freed are returned.
        """
