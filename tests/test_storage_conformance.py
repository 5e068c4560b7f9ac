"""Every backend and index passes the same conformance check from asynccas.testing."""

from __future__ import annotations

import inspect
import sqlite3
from pathlib import Path
from typing import cast

import pytest

from asynccas.errors import ConfigurationError, StorageFull
from asynccas.index.base import StorageIndex
from asynccas.index.redis import RedisIndex
from asynccas.index.sqlite import SqliteIndex
from asynccas.storage.base import Deletable, Listable, Stageable, contains
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.disk import DiskStorage
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.size_differentiated import SizeDifferentiatedStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from asynccas.testing import blob, check_index, check_storage
from tests.conftest import STORAGE_KINDS, make_storage

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", STORAGE_KINDS)
async def test_storage_conformance(kind: str, tmp_path: Path) -> None:
    async with make_storage(kind, tmp_path) as storage:
        if isinstance(storage, StorageIndex):
            await check_index(storage)
        else:
            await check_storage(storage)


@pytest.mark.parametrize("kind", ["disk", "sqlite-blobs", "tiered", "disk-zstd"])
async def test_stores_that_can_list_their_blobs_list_them_all(kind: str, tmp_path: Path) -> None:
    """What ``asynccas reindex`` rebuilds an index from: every blob, whichever tier holds it."""
    blobs = [blob(size, seed) for seed, size in enumerate([10, 1000, 70_000, 300_000])]
    async with make_storage(kind, tmp_path) as storage:
        assert await storage.bulk_update(NO_CONTEXT, blobs) == [None] * len(blobs)
        assert storage.offers(Listable)
        listed = [digest async for digest, _ in cast(Listable, storage).list_blobs()]
    assert sorted(listed) == sorted(d for d, _ in blobs)


async def test_optional_capabilities_are_offered_only_where_they_work(tmp_path: Path) -> None:
    """A wrapper offers what everything it wraps offers, and no more; building on a storage
    that lacks what a part needs is refused when it is built, naming both."""
    memory = MemoryStorage()
    assert memory.offers(Deletable)
    assert not memory.offers(Listable)
    disk = DiskStorage(tmp_path / "disk")
    assert disk.offers(Listable)
    assert disk.offers(Stageable)
    assert not SizeDifferentiatedStorage(memory, disk).offers(Listable)
    assert SizeDifferentiatedStorage(disk, disk).offers(Listable)
    assert not SizeDifferentiatedStorage(memory, disk).offers(Stageable)
    assert not SqliteIndex(memory, tmp_path / "index.sqlite").offers(Listable)
    assert SqliteIndex(disk, tmp_path / "index.sqlite").offers(Listable)

    class ReadOnly(MemoryStorage):
        def offers(self, capability: type) -> bool:
            return capability is not Deletable and super().offers(capability)

    with pytest.raises(ConfigurationError, match=r"SqliteIndex.*Deletable.*ReadOnly"):
        SqliteIndex(ReadOnly(), tmp_path / "index.sqlite")


async def test_disk_leaves_no_temp_files(tmp_path: Path) -> None:
    async with make_storage("sqlite-disk", tmp_path) as storage:
        await check_storage(storage)
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


async def test_batch_reports_storage_full_per_blob() -> None:
    small, big = blob(100, 1), blob(5000, 2)
    async with MemoryStorage(max_bytes=1000) as storage:
        results = await storage.bulk_update(NO_CONTEXT, [big, small])
        assert isinstance(results[0], StorageFull)
        assert results[1] is None
        assert await contains(storage, NO_CONTEXT, small[0])


async def test_sqlite_blob_store_of_an_earlier_release_keeps_its_blobs(tmp_path: Path) -> None:
    """Stores written before the rowid table (WITHOUT ROWID, ~1.0) are moved over on start."""
    path = tmp_path / "small.sqlite"
    kept = [blob(size, seed) for seed, size in enumerate([1, 4096, 60_000])]
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID")
        conn.executemany("INSERT INTO blobs VALUES (?, ?)", [(d.key, data) for d, data in kept])
    conn.close()
    async with SqliteBlobStorage(path) as storage:
        assert await storage.bulk_read(NO_CONTEXT, [d for d, _ in kept]) == dict(kept)
        added = blob(5000, 9)
        assert await storage.bulk_update(NO_CONTEXT, [added]) == [None]
    async with SqliteBlobStorage(path) as storage:  # the second start finds nothing to move
        wanted = [added[0], kept[0][0]]
        assert await storage.bulk_read(NO_CONTEXT, wanted) == dict([added, kept[0]])
    with sqlite3.connect(path) as conn:
        tables = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert sorted((name, "WITHOUT ROWID" in sql) for name, sql in tables) == [
        ("blobs", False),
        ("settings", False),
    ]


BUILDGRID_INDEX_API = [
    "has_blob",
    "get_blob",
    "delete_blob",
    "commit_write",
    "bulk_delete",
    "missing_blobs",
    "bulk_update_blobs",
    "bulk_read_blobs",
    "least_recent_digests",
    "get_total_size",
    "delete_n_bytes",
]


@pytest.mark.parametrize("index_class", [SqliteIndex, RedisIndex])
def test_indexes_keep_buildgrids_index_api(index_class: type[StorageIndex]) -> None:
    """People coming from BuildGrid find its index methods under their names (check_index
    exercises each of them); delete_n_bytes takes BuildGrid's parameters, in its order."""
    assert [name for name in BUILDGRID_INDEX_API if not callable(getattr(index_class, name))] == []
    parameters = list(inspect.signature(index_class.delete_n_bytes).parameters)
    assert parameters == [
        "self",
        "n_bytes",
        "dry_run",
        "protect_blobs_after",
        "large_blob_threshold",
        "large_blob_lifetime",
    ]
