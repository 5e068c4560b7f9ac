"""Every backend and index passes the same conformance check from asynccas.testing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from asynccas.errors import StorageFull
from asynccas.index.base import StorageIndex
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.sqlite import SqliteBlobStorage
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


@pytest.mark.parametrize("kind", ["disk", "sqlite-blobs", "tiered"])
async def test_stores_that_can_list_their_blobs_list_them_all(kind: str, tmp_path: Path) -> None:
    """What ``asynccas reindex`` rebuilds an index from: every blob, whichever tier holds it."""
    blobs = [blob(size, seed) for seed, size in enumerate([10, 1000, 70_000, 300_000])]
    async with make_storage(kind, tmp_path) as storage:
        assert await storage.bulk_update_blobs(blobs) == [None] * len(blobs)
        listed = [digest async for digest, _ in storage.list_blobs()]
    assert sorted(listed) == sorted(d for d, _ in blobs)


async def test_stores_that_cannot_list_say_so() -> None:
    with pytest.raises(NotImplementedError):
        async for _ in MemoryStorage().list_blobs():
            pass


async def test_disk_leaves_no_temp_files(tmp_path: Path) -> None:
    async with make_storage("sqlite-disk", tmp_path) as storage:
        await check_storage(storage)
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


async def test_batch_reports_storage_full_per_blob() -> None:
    small, big = blob(100, 1), blob(5000, 2)
    async with MemoryStorage(max_bytes=1000) as storage:
        results = await storage.bulk_update_blobs([big, small])
        assert isinstance(results[0], StorageFull)
        assert results[1] is None
        assert await storage.has_blob(small[0])


async def test_sqlite_blob_store_of_an_earlier_release_keeps_its_blobs(tmp_path: Path) -> None:
    """Stores written before the rowid table (WITHOUT ROWID, ~1.0) are moved over on start."""
    path = tmp_path / "small.sqlite"
    kept = [blob(size, seed) for seed, size in enumerate([1, 4096, 60_000])]
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID")
        conn.executemany("INSERT INTO blobs VALUES (?, ?)", [(d.key, data) for d, data in kept])
    conn.close()
    async with SqliteBlobStorage(path) as storage:
        assert await storage.bulk_read_blobs(d for d, _ in kept) == dict(kept)
        added = blob(5000, 9)
        assert await storage.bulk_update_blobs([added]) == [None]
    async with SqliteBlobStorage(path) as storage:  # the second start finds nothing to move
        assert await storage.bulk_read_blobs([added[0], kept[0][0]]) == dict([added, kept[0]])
    with sqlite3.connect(path) as conn:
        tables = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert sorted((name, "WITHOUT ROWID" in sql) for name, sql in tables) == [
        ("blobs", False),
        ("settings", False),
    ]
