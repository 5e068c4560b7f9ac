"""Small blobs inline in one SQLite file: a batch of many small blobs is one transaction,
not one file each. Meant as the small tier of ``SizeDifferentiatedStorage``.

The store records the ``max_blob_size`` it was created with and refuses to open with another:
a tiered store routes blobs by that size, so a different one would hide blobs already stored.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BlobNotFound, CasError, DigestMismatch, StorageFull
from asynccas.sqlite_database import (
    LOOKUP_LIMIT,
    SqliteDatabase,
    immediate_transaction,
    move_rows_off_without_rowid,
    sqlite_errors,
)
from asynccas.storage.base import (
    CHUNK_SIZE,
    BlobWriter,
    CommitsInThread,
    Deletable,
    Listable,
    Stageable,
    Storage,
    abort_all,
    mask_of,
)
from asynccas.storage.context import RequestContext
from asynccas.threads import in_thread

_Rows = list[Any]
HASH_ON_LOOP_LIMIT: Final = 64 * 1024
"""Uploads up to this size are hashed on the event loop when they end (see ``_SqliteWriter``)."""
_LOOP_READ_LIMIT: Final = 1024 * 1024
"""Bytes of rows read at most on the event loop (a copy of 1 MiB takes ~0.1 ms here)."""
# A rowid table: see move_rows_off_without_rowid for why not WITHOUT ROWID.
_BLOBS: Final = "CREATE TABLE IF NOT EXISTS blobs (key TEXT NOT NULL UNIQUE, data BLOB NOT NULL)"
_SETTINGS: Final = (
    "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
)
_RECORDED_MAX: Final = "SELECT value FROM settings WHERE name = 'max_blob_size'"
_MIGRATE: Final = functools.partial(
    move_rows_off_without_rowid, table="blobs", statements=[_BLOBS], columns="key, data"
)


def recorded_max_blob_size(path: str | Path) -> int | None:
    """The ``max_blob_size`` a store at ``path`` was created with; ``None`` if there is no
    store there, or it was made before stores recorded it. Blocking: call it in a thread."""
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return None  # no such file
    try:
        row = conn.execute(_RECORDED_MAX).fetchone()
    except sqlite3.OperationalError:
        return None  # no settings table: made by an earlier release
    finally:
        conn.close()
    return None if row is None else int(row[0])


class SqliteBlobStorage(Storage, Stageable, Deletable, Listable):
    def __init__(
        self, path: str | Path, *, max_blob_size: int = 1024 * 1024, fsync: bool = True
    ) -> None:
        self.path = Path(path)
        self.max_blob_size = max_blob_size
        # Durable commits: a blob must be on disk before the index row naming it commits.
        self._db = SqliteDatabase(
            self.path, f"{_BLOBS};\n{_SETTINGS}", fsync=fsync, durable_commits=True
        )

    async def start(self) -> None:
        await self._db.open()
        await self._db.write(_MIGRATE)
        recorded = await self._db.write(self._record_max_blob_size)
        if recorded != self.max_blob_size:
            await self._db.close()
            raise CasError(
                f"{self.path} keeps blobs of up to {recorded} bytes; opening it for"
                f" {self.max_blob_size} would hide some of them"
            )

    def _record_max_blob_size(self, conn: sqlite3.Connection) -> int:
        """Record this store's limit if it has none yet (new, or from an earlier release, which
        trusted the caller as this does once); return the recorded one."""
        conn.execute(
            "INSERT OR IGNORE INTO settings VALUES ('max_blob_size', ?)", (self.max_blob_size,)
        )
        (recorded,) = conn.execute(_RECORDED_MAX).fetchone()
        return int(recorded)

    async def stop(self) -> None:
        await self._db.close()

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        by_key = {d.key: d for d in batch.digests}
        keys = json.dumps(list(by_key))
        rows = await self._read(
            len(by_key) <= LOOKUP_LIMIT,
            lambda conn: conn.execute(
                "SELECT key FROM blobs WHERE key IN (SELECT value FROM json_each(?))", (keys,)
            ).fetchall(),
        )
        present = {key for (key,) in rows}
        return mask_of(batch, [d for key, d in by_key.items() if key not in present])

    async def list_blobs(self) -> AsyncGenerator[tuple[Digest, float]]:
        """Every stored blob, in pages of keys. Rows keep no access time, so each is listed as
        used now: an index rebuilt from them will not evict them first."""
        now = time.time()
        after = ""
        while True:
            keys = await self._db.run(functools.partial(_keys_after, after=after))
            if not keys:
                return
            for (key,) in keys:
                try:
                    digest = Digest.from_key(key)
                except (CasError, ValueError):
                    continue  # not a key this storage wrote
                yield digest, now
            after = keys[-1][0]

    async def get(
        self, ctx: RequestContext, digest: Digest, offset: int = 0, limit: int = 0
    ) -> AsyncGenerator[bytes]:
        data = (await self.bulk_read(ctx, [digest])).get(digest)
        if data is None:
            raise BlobNotFound(digest)
        end = len(data) if limit == 0 else min(len(data), offset + limit)
        for start in range(offset, end, CHUNK_SIZE):
            yield data[start : min(end, start + CHUNK_SIZE)]

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        by_key = {d.key: d for d in digests}
        keys = json.dumps(list(by_key))
        few = len(by_key) <= LOOKUP_LIMIT
        small = sum(min(d.size_bytes, self.max_blob_size) for d in by_key.values())
        rows = await self._read(
            few and small <= _LOOP_READ_LIMIT,
            lambda conn: conn.execute(
                "SELECT key, data FROM blobs WHERE key IN (SELECT value FROM json_each(?))",
                (keys,),
            ).fetchall(),
        )
        return {by_key[key]: bytes(data) for key, data in rows}

    async def _read(self, on_loop: bool, func: Callable[[sqlite3.Connection], _Rows]) -> _Rows:
        """A read of a few small rows is done on the event loop (``SqliteDatabase.lookup``),
        others in a worker thread."""
        if on_loop:
            return await self._db.lookup(func)
        return await self._db.read(func)

    async def put(self, ctx: RequestContext, digest: Digest) -> BlobWriter:
        if digest.size_bytes > self.max_blob_size:
            raise StorageFull(
                f"blob {digest} is larger than this store's {self.max_blob_size} bytes"
            )
        return _SqliteWriter(self, digest)

    async def stage(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[BlobWriter | CasError]:
        def verify_all() -> list[BlobWriter | CasError]:  # hashing in one thread hop
            staged: list[BlobWriter | CasError] = []
            for digest, data in blobs:
                actual = Digest.of(data, digest.function)
                if actual != digest:
                    staged.append(DigestMismatch(f"data has digest {actual}, not {digest}"))
                elif digest.size_bytes > self.max_blob_size:
                    staged.append(StorageFull(f"blob {digest} is too large for this store"))
                else:
                    staged.append(_SqliteWriter(self, digest, data))
            return staged

        return await in_thread(verify_all)

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        rows = [(w.digest.key, w.data) for w in writers if isinstance(w, _SqliteWriter)]
        if rows:
            await self._db.write(
                lambda conn: conn.executemany(
                    "INSERT OR IGNORE INTO blobs (key, data) VALUES (?, ?)", rows
                )
            )

    async def release_staged(self, writers: Sequence[BlobWriter]) -> None:
        await abort_all(writers)  # staged rows are only in memory: nothing to do in a thread

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(digests))

        def delete(conn: sqlite3.Connection) -> list[Digest]:
            gone = []
            for digest in unique:
                if conn.execute("DELETE FROM blobs WHERE key = ?", (digest.key,)).rowcount:
                    gone.append(digest)
            return gone

        return await self._db.write(delete)


def _keys_after(conn: sqlite3.Connection, after: str) -> list[tuple[str]]:
    return conn.execute(
        "SELECT key FROM blobs WHERE key > ? ORDER BY key LIMIT 1000", (after,)
    ).fetchall()


class _SqliteWriter(BlobWriter, CommitsInThread):
    def __init__(
        self, storage: SqliteBlobStorage, digest: Digest, data: bytes | None = None
    ) -> None:
        super().__init__(digest)
        self._storage = storage
        # Hashing 64 KiB takes ~40 us here, less than a thread hop; rows may hold larger blobs.
        self.verifies_in_memory = digest.size_bytes <= HASH_ON_LOOP_LIMIT
        self._parts: list[bytes] = []
        self.data = b""
        if data is not None:  # staged: already verified
            self.data = data
            self.committed_size = len(data)
            self._verified = True

    async def _write(self, parts: list[bytes]) -> None:
        for part in parts:
            self._hasher.update(part)
        self._parts += parts

    async def _finish(self, tail: list[bytes]) -> None:
        await self._write(tail)
        self.data = b"".join(self._parts)
        self._parts = []

    async def _publish(self) -> None:
        await self._storage.publish_staged([self])

    async def _abort(self) -> None:
        self._parts = []

    # CommitsInThread: an index ends the upload with this row in one hop.

    def publish_lock(self) -> asyncio.Lock:
        return self._storage._db.write_lock

    def verify_in_thread(self, tail: list[bytes]) -> None:
        for part in tail:
            self._hasher.update(part)
        self._parts += tail
        self.data = b"".join(self._parts)
        self._parts = []
        self.check_hash()

    @contextmanager
    def publishing_together(self) -> Iterator[None]:
        storage = self._storage
        with sqlite_errors(storage.path), immediate_transaction(storage._db.write_connection()):
            yield

    def publish_in_thread(self) -> Callable[[], None] | None:
        storage = self._storage
        key = self.digest.key
        with sqlite_errors(storage.path):
            conn = storage._db.write_connection()
            inserted = conn.execute(
                "INSERT OR IGNORE INTO blobs (key, data) VALUES (?, ?)", (key, self.data)
            ).rowcount
        if not inserted:
            return None

        def take_back() -> None:
            with sqlite_errors(storage.path):
                conn.execute("DELETE FROM blobs WHERE key = ?", (key,))

        return take_back
