"""The client's persistent caches: shared across clients, recursive tree look-ups, LRU caps."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.client import CasClient
from asynccas.client.caches import BlobCache, ClientCaches, DirEntryCache
from asynccas.digest import Digest
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.memory import MemoryStorage
from asynccas.testing import blob
from tests.test_client import expected_root, make_tree

pytestmark = pytest.mark.anyio


async def test_a_known_tree_downloads_from_the_cache_alone(tmp_path: Path) -> None:
    source = tmp_path / "source"
    await anyio.to_thread.run_sync(make_tree, source)
    cache_dir = tmp_path / "cache"
    full = CasServer(MemoryStorage(), MemoryActionCache(), address="127.0.0.1:0")
    async with full, CasClient(f"grpc://{full.target}", cache=ClientCaches(cache_dir)) as cas:
        root = await cas.upload_directory(source)
        await cas.download_directory(root, tmp_path / "first")
    # A server that holds nothing: every byte of this download must come from the cache.
    empty = CasServer(MemoryStorage(), MemoryActionCache(), address="127.0.0.1:0")
    caches = ClientCaches(cache_dir)
    async with empty, CasClient(f"grpc://{empty.target}", cache=caches) as cas:
        await cas.download_directory(root, tmp_path / "second")
        cached = [d async for d in caches.blobs.get_cached_digests()]
    assert await anyio.to_thread.run_sync(expected_root, tmp_path / "second") == root
    assert len(cached) >= 4


async def test_tree_cache_lists_every_descendant_in_one_query(tmp_path: Path) -> None:
    caches = ClientCaches(tmp_path)
    await caches.open()
    try:
        leaf = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=blob(1, 1)[0].to_proto())])
        leaf_digest = Digest.of(leaf.SerializeToString())
        middle = re_pb2.Directory(
            directories=[re_pb2.DirectoryNode(name="l", digest=leaf_digest.to_proto())]
        )
        middle_digest = Digest.of(middle.SerializeToString())
        top = re_pb2.Directory(
            directories=[
                re_pb2.DirectoryNode(name="m", digest=middle_digest.to_proto()),
                re_pb2.DirectoryNode(name="n", digest=leaf_digest.to_proto()),
            ]
        )
        top_digest = Digest.of(top.SerializeToString())
        assert await caches.trees.descendants(top_digest) is None
        await caches.trees.record(
            top_digest, {top_digest: top, middle_digest: middle, leaf_digest: leaf}
        )
        assert set(await caches.trees.descendants(top_digest) or []) == {
            top_digest, middle_digest, leaf_digest,
        }  # fmt: skip
    finally:
        await caches.close()


async def test_blob_cache_keeps_to_its_size_cap(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=300_000)
    await cache.open()
    try:
        blobs = [blob(100_000, i) for i in range(6)]  # 600 kB: twice the cap, all as files
        for digest, data in blobs:
            await cache.put_many({digest: data})
            await anyio.sleep(0.01)
        # The cap is enforced as blobs arrive, without anyone calling clean_up().
        assert await cache.total_size() <= 300_000
        assert await cache.get_path(blobs[0][0]) is None, "oldest went first"
        assert await cache.get_path(blobs[-1][0]) is not None
        files = await anyio.to_thread.run_sync(
            lambda: [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
        )
        assert len(files) == len([d async for d in cache.get_cached_digests()])
    finally:
        await cache.close()


def test_dir_entry_cache_is_bounded_by_ram() -> None:
    entries = DirEntryCache(max_ram=10_000)
    keys = [Digest.of(str(i).encode()) for i in range(200)]
    for i, key in enumerate(keys):
        entries.put(key, re_pb2.Directory(files=[re_pb2.FileNode(name=f"file-{i}")]))
    assert entries._total <= 10_000
    assert entries.get(keys[-1]) is not None
    assert entries.get(keys[0]) is None


async def test_metadata_cache_keeps_action_results_and_directories_apart(tmp_path: Path) -> None:
    caches = ClientCaches(tmp_path)
    await caches.open()
    try:
        result = re_pb2.ActionResult(exit_code=3, stdout_raw=b"out")
        encoded = result.SerializeToString()
        digest = Digest.of(encoded)
        await caches.metadata.put_messages({digest: encoded}, re_pb2.ActionResult)
        assert await caches.metadata.get_messages([digest], re_pb2.ActionResult) == {digest: result}
        assert await caches.metadata.get_directories([digest]) == {}
    finally:
        await caches.close()
    reopened = ClientCaches(tmp_path)  # persistent: another client, or another process
    await reopened.open()
    try:
        assert await reopened.metadata.get_messages([digest], re_pb2.ActionResult) == {
            digest: result
        }
    finally:
        await reopened.close()


async def test_caches_of_an_earlier_release_keep_their_entries(tmp_path: Path) -> None:
    """Blob and message tables made WITHOUT ROWID (before rowid tables) are moved on open."""
    (small, data), directory = blob(3000, 1), re_pb2.Directory()
    directory.files.add(name="a", digest=small.to_proto())
    encoded = directory.SerializeToString()
    listed = Digest.of(encoded)
    with sqlite3.connect(tmp_path / "blobs.sqlite") as conn:
        conn.execute(
            "CREATE TABLE blobs (key TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, inline BLOB,"
            " accessed_at REAL NOT NULL) WITHOUT ROWID"
        )
        conn.execute("CREATE INDEX blobs_by_access ON blobs (accessed_at)")
        conn.execute("INSERT INTO blobs VALUES (?, ?, ?, 1.0)", (small.key, len(data), data))
    conn.close()
    with sqlite3.connect(tmp_path / "metadata.sqlite") as conn:
        conn.execute(
            "CREATE TABLE messages (key TEXT NOT NULL, type TEXT NOT NULL, data BLOB NOT NULL,"
            " PRIMARY KEY (key, type)) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO messages VALUES (?, ?, ?)",
            (listed.key, re_pb2.Directory.DESCRIPTOR.full_name, encoded),
        )
    conn.close()
    caches = ClientCaches(tmp_path)
    await caches.open()
    try:
        assert await caches.blobs.get_many([small]) == {small: data}
        assert await caches.metadata.get_directories([listed]) == {listed: directory}
    finally:
        await caches.close()
    with sqlite3.connect(tmp_path / "blobs.sqlite") as conn:
        schema = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))
    conn.close()
    assert set(schema) == {"blobs", "blobs_by_access"}
    assert "WITHOUT ROWID" not in schema["blobs"]
