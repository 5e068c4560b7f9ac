"""Persistent client caches, after Software Heritage's FuseCache: SQLite files under
``$XDG_CACHE_HOME/asynccas/client`` that survive restarts and are shared by concurrent
processes (WAL, busy timeout). Content is immutable, so nothing is ever invalidated; only a
size cap evicts, least recently used first.

- BlobCache: digest -> content, inline for small blobs, a file for large ones;
- MetadataCache: digest -> encoded Directory (decoded on the way out);
- TreeCache: directory graph edges, so one recursive query lists a known tree;
- DirEntryCache: decoded Directories in RAM, bounded by a byte budget.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import anyio.to_thread
from google.protobuf.message import Message

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import Digest
from asynccas.sqlite_database import SqliteDatabase, move_rows_off_without_rowid

INLINE_LIMIT: Final = 64 * 1024

# Rowid tables, as they hold blobs: see move_rows_off_without_rowid.
_BLOB_TABLE: Final = """
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT NOT NULL UNIQUE,   -- Digest.key
    size_bytes INTEGER NOT NULL,
    inline BLOB,                -- the content when small, else NULL: it lives in a file
    accessed_at REAL NOT NULL
)"""
_BLOB_INDEX: Final = "CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs (accessed_at)"
_BLOB_SCHEMA: Final = f"{_BLOB_TABLE};\n{_BLOB_INDEX}"
_METADATA_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT NOT NULL,          -- Digest.key of the encoded message
    type TEXT NOT NULL,         -- the message's full name, e.g. build.bazel.remote.execution.v2.Directory
    data BLOB NOT NULL,
    UNIQUE (key, type)
)"""
M = TypeVar("M", bound=Message)
_TREE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS edges (
    parent TEXT NOT NULL, child TEXT NOT NULL, PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS complete_trees (root TEXT PRIMARY KEY) WITHOUT ROWID;
"""


def default_cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "asynccas" / "client"


class BlobCache:
    def __init__(self, root: Path, *, max_bytes: int = 10 * 1024**3) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._files = root / "blobs"
        self._db = SqliteDatabase(root / "blobs.sqlite", _BLOB_SCHEMA)
        # The cap is checked after every max_bytes/16 written, not on every write.
        self._written_since_check = 0

    async def open(self) -> None:
        await self._db.open()
        await self._db.write(
            partial(
                move_rows_off_without_rowid,
                table="blobs",
                statements=[_BLOB_TABLE, _BLOB_INDEX],
                columns="key, size_bytes, inline, accessed_at",
            )
        )

    async def close(self) -> None:
        await self._db.close()

    def _path(self, digest: Digest) -> Path:
        return self._files / digest.function.lower_name / digest.hash[:2] / digest.hash

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Cached small blobs among ``digests`` (large ones: see ``get_path``)."""
        by_key = {d.key: d for d in digests}
        keys = json.dumps(list(by_key))
        now = time.time()

        def query(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            rows = conn.execute(
                "SELECT key, inline FROM blobs WHERE key IN (SELECT value FROM json_each(?))"
                " AND inline IS NOT NULL",
                (keys,),
            ).fetchall()
            if rows:
                conn.execute(
                    "UPDATE blobs SET accessed_at = ? WHERE key IN (SELECT value FROM json_each(?))",
                    (now, json.dumps([k for k, _ in rows])),
                )
            return rows

        return {by_key[key]: bytes(data) for key, data in await self._db.run(query)}

    async def get_path(self, digest: Digest) -> Path | None:
        """The file holding a cached large blob, or None."""
        path = self._path(digest)

        def check(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM blobs WHERE key = ? AND inline IS NULL", (digest.key,)
            ).fetchone()
            if row is None:
                return False
            if not path.exists():  # removed behind our back: forget it
                conn.execute("DELETE FROM blobs WHERE key = ?", (digest.key,))
                return False
            conn.execute(
                "UPDATE blobs SET accessed_at = ? WHERE key = ?", (time.time(), digest.key)
            )
            return True

        return path if await self._db.run(check) else None

    async def put_many(self, blobs: Mapping[Digest, bytes]) -> None:
        small = [
            (d.key, d.size_bytes, data, time.time())
            for d, data in blobs.items()
            if len(data) <= INLINE_LIMIT
        ]
        large = {d: data for d, data in blobs.items() if len(data) > INLINE_LIMIT}
        if large:
            await anyio.to_thread.run_sync(self._write_files, large)
        rows = small + [(d.key, d.size_bytes, None, time.time()) for d in large]
        if rows:
            await self._db.write(
                lambda conn: conn.executemany(
                    "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", rows
                )
            )
            await self._wrote(sum(len(data) for data in blobs.values()))

    async def _wrote(self, size: int) -> None:
        self._written_since_check += size
        if self._written_since_check >= self.max_bytes // 16:
            self._written_since_check = 0
            await self.clean_up()

    def _write_files(self, blobs: Mapping[Digest, bytes]) -> None:
        for digest, data in blobs.items():
            path = self._path(digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{uuid.uuid4().hex}")
            temp.write_bytes(data)
            os.replace(temp, path)

    async def put_file(self, digest: Digest, source: Path) -> None:
        """Copy a verified file into the cache (a copy: the caller may change its own)."""
        if digest.size_bytes <= INLINE_LIMIT:
            data = await anyio.Path(source).read_bytes()
            await self.put_many({digest: data})
            return
        path = self._path(digest)

        def copy() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{uuid.uuid4().hex}")
            shutil.copyfile(source, temp)
            os.replace(temp, path)

        await anyio.to_thread.run_sync(copy)
        row = (digest.key, digest.size_bytes, None, time.time())
        await self._db.write(
            lambda conn: conn.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", row)
        )
        await self._wrote(digest.size_bytes)

    async def get_cached_digests(self) -> AsyncIterator[Digest]:
        after = ""
        while True:
            rows = await self._db.run(partial(_keys_after, after=after))
            for (key,) in rows:
                yield Digest.from_key(key)
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    async def total_size(self) -> int:
        row = await self._db.run(
            lambda conn: conn.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM blobs").fetchone()
        )
        return int(row[0])

    async def clean_up(self, low_watermark: float = 0.9) -> int:
        """Evict least recently used blobs while over ``max_bytes``; returns bytes freed."""
        total = await self.total_size()
        if total <= self.max_bytes:
            return 0
        target = total - int(self.max_bytes * low_watermark)

        def evict(conn: sqlite3.Connection) -> list[tuple[str, int, bool]]:
            chosen, freed = [], 0
            for key, size, is_file in conn.execute(
                "SELECT key, size_bytes, inline IS NULL FROM blobs ORDER BY accessed_at"
            ):
                chosen.append((key, size, bool(is_file)))
                freed += size
                if freed >= target:
                    break
            conn.executemany("DELETE FROM blobs WHERE key = ?", [(k,) for k, _, _ in chosen])
            return chosen

        chosen = await self._db.write(evict)
        files = [self._path(Digest.from_key(k)) for k, _, is_file in chosen if is_file]

        def remove() -> None:
            for path in files:
                path.unlink(missing_ok=True)

        await anyio.to_thread.run_sync(remove)
        return sum(size for _, size, _ in chosen)


def _keys_after(conn: sqlite3.Connection, after: str) -> list[tuple[str]]:
    return conn.execute(
        "SELECT key FROM blobs WHERE key > ? ORDER BY key LIMIT 1000", (after,)
    ).fetchall()


class MetadataCache:
    """Encoded protobuf messages (Directory, ActionResult, Tree...) by the digest of their
    encoding, decoded on the way out."""

    def __init__(self, root: Path) -> None:
        self._db = SqliteDatabase(root / "metadata.sqlite", _METADATA_SCHEMA)

    async def open(self) -> None:
        await self._db.open()
        await self._db.write(
            partial(
                move_rows_off_without_rowid,
                table="messages",
                statements=[_METADATA_SCHEMA],
                columns="key, type, data",
            )
        )

    async def close(self) -> None:
        await self._db.close()

    async def get_messages(
        self, digests: Iterable[Digest], message_type: type[M]
    ) -> dict[Digest, M]:
        by_key = {d.key: d for d in digests}
        args = (json.dumps(list(by_key)), message_type.DESCRIPTOR.full_name)
        rows = await self._db.run(
            lambda conn: conn.execute(
                "SELECT key, data FROM messages WHERE key IN (SELECT value FROM json_each(?))"
                " AND type = ?",
                args,
            ).fetchall()
        )
        return {by_key[key]: message_type.FromString(data) for key, data in rows}

    async def put_messages(
        self, encoded: Mapping[Digest, bytes], message_type: type[Message]
    ) -> None:
        name = message_type.DESCRIPTOR.full_name
        rows = [(d.key, name, data) for d, data in encoded.items()]
        await self._db.write(
            lambda conn: conn.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?)", rows)
        )

    async def get_directories(self, digests: Iterable[Digest]) -> dict[Digest, re_pb2.Directory]:
        return await self.get_messages(digests, re_pb2.Directory)

    async def put_directories(self, directories: Mapping[Digest, bytes]) -> None:
        await self.put_messages(directories, re_pb2.Directory)


class TreeCache:
    def __init__(self, root: Path) -> None:
        self._db = SqliteDatabase(root / "trees.sqlite", _TREE_SCHEMA)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def descendants(self, root: Digest) -> list[Digest] | None:
        """Every directory of a fully known tree (root included), or None if not known."""

        def query(conn: sqlite3.Connection) -> list[tuple[str]] | None:
            if (
                conn.execute("SELECT 1 FROM complete_trees WHERE root = ?", (root.key,)).fetchone()
                is None
            ):
                return None
            # The seed's history-graph query shape: one recursive walk over the edges.
            return conn.execute(
                "WITH RECURSIVE tree(key) AS (SELECT ? UNION SELECT child FROM edges"
                " JOIN tree ON edges.parent = tree.key) SELECT key FROM tree",
                (root.key,),
            ).fetchall()

        rows = await self._db.run(query)
        return None if rows is None else [Digest.from_key(key) for (key,) in rows]

    async def record(self, root: Digest, directories: Mapping[Digest, re_pb2.Directory]) -> None:
        """Remember a tree GetTree returned whole: its edges, and that it is complete."""
        edges = [
            (parent.key, Digest.from_proto(child.digest, parent.function.proto_value).key)
            for parent, directory in directories.items()
            for child in directory.directories
        ]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO edges VALUES (?, ?)", edges)
            conn.execute("INSERT OR IGNORE INTO complete_trees VALUES (?)", (root.key,))

        await self._db.write(write)


class DirEntryCache:
    """Decoded Directory messages in RAM, least recently used out beyond ``max_ram`` bytes."""

    def __init__(self, max_ram: int = 64 * 1024 * 1024) -> None:
        self.max_ram = max_ram
        self._entries: OrderedDict[Digest, re_pb2.Directory] = OrderedDict()
        self._sizes: dict[Digest, int] = {}
        self._total = 0

    def get(self, digest: Digest) -> re_pb2.Directory | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: Digest, directory: re_pb2.Directory) -> None:
        if digest in self._entries:
            return
        size = directory.ByteSize() + 200  # the Python objects around the bytes
        self._entries[digest] = directory
        self._sizes[digest] = size
        self._total += size
        while self._total > self.max_ram and self._entries:
            evicted, _ = self._entries.popitem(last=False)
            self._total -= self._sizes.pop(evicted)


class ClientCaches:
    """The four caches together, as ``CasClient(cache=ClientCaches(...))`` uses them."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, max_bytes: int = 10 * 1024**3,
        max_ram: int = 64 * 1024 * 1024,
    ) -> None:  # fmt: skip
        self.root = Path(root) if root is not None else default_cache_dir()
        self.blobs = BlobCache(self.root, max_bytes=max_bytes)
        self.metadata = MetadataCache(self.root)
        self.trees = TreeCache(self.root)
        self.entries = DirEntryCache(max_ram)

    async def open(self) -> None:
        await self.blobs.open()
        await self.metadata.open()
        await self.trees.open()

    async def close(self) -> None:
        await self.trees.close()
        await self.metadata.close()
        await self.blobs.close()
