"""The embedded default index: existence, size and recency of blobs in one SQLite file.

Persistent, and safe for several server processes sharing one data directory:
publishing a blob and inserting its row happen in one ``BEGIN IMMEDIATE``
transaction, and so do deleting rows and their files during clean-up, so a blob
re-uploaded while being evicted never ends up indexed-but-missing. The total size
is kept exact by triggers in the same transactions.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import ExitStack
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Final

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.index.base import StorageIndex
from asynccas.index.recency import TouchedThisInterval, recency_window
from asynccas.sqlite_database import LOOKUP_LIMIT, SqliteDatabase
from asynccas.storage.base import BlobWriter, CommitsInThread, Storage, mask_of, publish_staged
from asynccas.storage.context import RequestContext
from asynccas.threads import in_thread

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT PRIMARY KEY,            -- Digest.key: function:hash:size
    size_bytes INTEGER NOT NULL,
    accessed_at REAL NOT NULL,       -- unix time of the upload, or the start of the touch window of the last use
    stored_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs (accessed_at, key);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    total_size INTEGER NOT NULL,
    blob_count INTEGER NOT NULL,
    deletions INTEGER NOT NULL DEFAULT 0   -- changes on every removal: see deletion_marker()
);
INSERT OR IGNORE INTO totals (id, total_size, blob_count) VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS blobs_added AFTER INSERT ON blobs BEGIN
    UPDATE totals SET total_size = total_size + NEW.size_bytes, blob_count = blob_count + 1;
END;
CREATE TRIGGER IF NOT EXISTS blobs_removed AFTER DELETE ON blobs BEGIN
    UPDATE totals SET total_size = total_size - OLD.size_bytes, blob_count = blob_count - 1,
        deletions = deletions + 1;
END;
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an index made by an earlier asynccas up to the current schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(totals)")}
    if "deletions" not in columns:
        conn.execute("ALTER TABLE totals ADD COLUMN deletions INTEGER NOT NULL DEFAULT 0")
        conn.execute("DROP TRIGGER IF EXISTS blobs_removed")
        conn.execute(
            "CREATE TRIGGER blobs_removed AFTER DELETE ON blobs BEGIN UPDATE totals SET"
            " total_size = total_size - OLD.size_bytes, blob_count = blob_count - 1,"
            " deletions = deletions + 1; END"
        )


_UPSERT: Final = """
INSERT INTO blobs (key, size_bytes, accessed_at, stored_at) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET accessed_at = excluded.accessed_at, stored_at = excluded.stored_at
"""
_EVICTION_BATCH: Final = 256
_ONE_HOP_LIMIT: Final = 1024 * 1024  # uploads up to this size end with fsync under the lock
# Positions (json_each's key) of the listed keys that are indexed, as one string: one row
# rather than one per blob. CROSS JOIN keeps json_each the outer loop, so each key is a single
# probe of the primary key, which measured 30% faster than `key IN (SELECT value ...)`.
_PRESENT: Final = (
    "SELECT group_concat(j.key) FROM json_each(?) AS j CROSS JOIN blobs AS b ON b.key = j.value"
)
# A use raises accessed_at to the start of the current touch window, never lowers it.
_REFRESH: Final = (
    "UPDATE blobs SET accessed_at = ? WHERE key IN (SELECT value FROM json_each(?))"
    " AND accessed_at < ?"
)


class SqliteIndex(StorageIndex):
    def __init__(
        self,
        storage: Storage,
        path: str | Path,
        *,
        touch_interval: float = 60.0,
        fsync: bool = True,
    ) -> None:
        super().__init__(storage)
        self.path = Path(path)
        # Refreshing recency on every hit would turn every FindMissingBlobs into a
        # write; LRU order only needs it to within this many seconds. A use raises a blob's
        # time to the start of the current window of this length (see index.recency), so that
        # this process can skip what it has already raised: a batch read of hot blobs then
        # costs no index write and no thread hop.
        self.touch_interval = touch_interval
        self._touched = TouchedThisInterval()
        self._db = SqliteDatabase(self.path, _SCHEMA, fsync=fsync)
        # Verified uploads waiting for the writer, published together by the first of them
        # to get it (see _publish_together).
        self._waiting: list[tuple[CommitsInThread, asyncio.Future[None]]] = []

    async def start(self) -> None:
        await self.storage.start()
        await self._db.open()
        await self._db.write(_migrate)

    async def stop(self) -> None:
        await self._db.close()
        await self.storage.stop()

    # -- existence ---------------------------------------------------------------------------

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        """Answered on the batch's columns: its keys are written into the query's JSON in a
        few joins, where a ``Digest`` and a JSON encoding per digest cost more than the query
        itself."""
        if not len(batch):
            return b""
        if batch.unique() is not None:  # repeats are rare: the general path
            # Keyed by the key string, whose hash CPython computes in C and caches.
            by_key = {d.key: d for d in batch.digests}
            keys = list(by_key)
            present = {keys[i] for i in await self._present(keys, json.dumps(keys))}
            return mask_of(batch, [d for key, d in by_key.items() if key not in present])
        # Digest.key of each, one per line, written in one join and cut in one split; keys
        # are hex, digits and colons, so the JSON list needs no escaping either.
        count = len(batch)
        pieces = [f"\n{batch.function.lower_name}:"] * (4 * count)
        pieces[1::4] = batch.hashes
        pieces[2::4] = [":"] * count
        pieces[3::4] = map(str, batch.sizes)
        lines = "".join(pieces)[1:]
        keys = lines.split("\n")
        keys_json = '["' + lines.replace("\n", '","') + '"]'
        mask = bytearray(b"\x01") * count
        for position in await self._present(keys, keys_json):
            mask[position] = 0
        return bytes(mask)

    async def _present(self, keys: list[str], keys_json: str) -> list[int]:
        """Where in ``keys`` (also given as a JSON list) the indexed ones are; refreshes them."""

        def query(conn: sqlite3.Connection) -> list[int]:
            (found,) = conn.execute(_PRESENT, (keys_json,)).fetchone()
            return list(map(int, found.split(","))) if found else []

        # A few keys (Bazel asks about an action's two or three blobs) are looked up on the
        # event loop, more on a read connection beside other reads and writes. Refreshing
        # recency is a write, needed at most once per touch window per blob.
        if len(keys) <= LOOKUP_LIMIT:
            positions = await self._db.lookup(query)
        else:
            positions = await self._db.read(query)
        if positions:
            await self._touch_keys([keys[i] for i in positions])
        return positions

    async def _touch(self, digests: Iterable[Digest]) -> None:
        await self._touch_keys([d.key for d in digests])

    async def _touch_keys(self, keys: list[str]) -> None:
        window, stale = self._to_refresh(keys)
        if stale is None:
            return  # all refreshed by this process in this window: nothing to write
        # A few rows (an action's blobs) are refreshed on the event loop, where a thread hop
        # would cost more than the write (see ``SqliteDatabase.write_on_loop``).
        write = self._db.write_on_loop if len(keys) <= LOOKUP_LIMIT else self._db.run
        await write(lambda conn: conn.execute(_REFRESH, (window, stale, window)))
        self._touched.add(window, keys)

    def _to_refresh(self, keys: list[str]) -> tuple[float, str | None]:
        """The current touch window, and the ``keys`` this process has not refreshed in it yet
        as a JSON list (``None`` when there are none)."""
        window = recency_window(time.time(), self.touch_interval)
        untouched = self._touched.untouched(window, keys)
        if untouched == []:
            return window, None
        return window, json.dumps(keys if untouched is None else [keys[i] for i in untouched])

    async def _forget(self, digests: Iterable[Digest], stored_before: float) -> None:
        """Self-healing: drop rows of blobs the storage no longer has.

        Rows stored after the failed read began belong to a concurrent upload and stay.
        """
        keys = json.dumps([d.key for d in digests])
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM blobs WHERE key IN (SELECT value FROM json_each(?)) AND stored_at < ?",
                (keys, stored_before),
            )
        )

    # -- writes ------------------------------------------------------------------------------

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        if not writers:
            return
        # Files and rows of the small-blob tier publish in the index's hop (the rows in one
        # transaction of their database's, see ``CommitsInThread.publishing_together``).
        if all(isinstance(w, CommitsInThread) for w in writers):
            await self._publish_in_one_hop(writers)  # type: ignore[arg-type]
            return
        # Shielded: once a file is published its row must be committed too.
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as sql:
                await publish_staged(self.storage, writers)
                now = time.time()
                rows = [(w.digest.key, w.digest.size_bytes, now, now) for w in writers]
                await sql.commit_with(lambda conn: conn.executemany(_UPSERT, rows))
        self._used_at(now, rows)

    async def _publish_in_one_hop(
        self,
        writers: Sequence[CommitsInThread],
        verify_first: list[bytes] | None = None,
        *,
        lock_held: bool = False,
    ) -> None:
        """Publish the blobs and insert their rows in one transaction and one thread hop (an
        upload's last); if the rows do not commit, the blobs this published are taken back.

        With ``verify_first`` (one writer's pending data), the writer is verified in the same
        hop, before the transaction begins: an upload ends in a single hop.
        """
        undo: list[Callable[[], None]] = []
        now = time.time()
        rows = [(w.digest.key, w.digest.size_bytes, now, now) for w in writers]

        # One writer per store published into (per publish lock), to group the others' rows.
        one_per_store = {id(w.publish_lock()): w for w in writers}.values()

        def publish(conn: sqlite3.Connection) -> None:
            with ExitStack() as together:
                for writer in one_per_store:
                    together.enter_context(writer.publishing_together())
                for writer in writers:
                    if (take_back := writer.publish_in_thread()) is not None:
                        undo.append(take_back)
            conn.executemany(_UPSERT, rows)

        def take_back_all() -> None:
            for take_back in undo:
                take_back()

        before = None
        if verify_first is not None:
            (writer,) = writers
            before = partial(writer.verify_in_thread, verify_first)
        # Writers that publish into a database of their own (the small-blob tier) hold its
        # lock for the hop, taken after the index's, the order every path takes them in.
        locks = {id(lock): lock for w in writers if (lock := w.publish_lock()) is not None}
        with anyio.CancelScope(shield=True):  # a published blob must get its row
            await self._db.write(
                publish,
                before=before,
                on_failure=take_back_all,
                also_holding=[lock for _, lock in sorted(locks.items())],
                lock_held=lock_held,
            )
        self._used_at(now, rows)

    def _used_at(self, now: float, rows: Sequence[tuple[str, int, float, float]]) -> None:
        """Rows just written with ``now`` as their recency count as refreshed this window:
        the first uses of a blob just uploaded (Bazel reads outputs back) write nothing."""
        self._touched.add(recency_window(now, self.touch_interval), [row[0] for row in rows])

    async def commit_writer(self, writer: BlobWriter) -> None:
        # A small upload to disk ends in one thread hop. A larger one is verified (its fsync
        # may take a while) before the write lock is taken.
        if isinstance(writer, CommitsInThread) and writer.digest.size_bytes <= _ONE_HOP_LIMIT:
            writer.check_size()
            tail = writer.take_pending()
            lock = writer.publish_lock()
            if writer.verifies_in_memory:
                # Hashing a row's few KiB (at most ~40 us for 64 KiB) costs less than the
                # thread hop it would take, and the hop left then publishes it with any
                # other uploads queued for the writer.
                writer.verify_in_thread(tail)
                await self._publish_together(writer)
            elif self._db.write_lock.locked() or (lock is not None and lock.locked()):
                # Other uploads are publishing: writing, hashing and fsyncing this one under
                # the lock would make them take turns at what can run side by side.
                await in_thread(writer.verify_in_thread, tail)
                if lock is None:
                    await self._publish_together(writer)
                else:
                    await self._publish_in_one_hop([writer])
            else:
                await self._publish_in_one_hop([writer], verify_first=tail)
        else:
            await super().commit_writer(writer)

    async def _publish_together(self, writer: CommitsInThread) -> None:
        """Publish a verified upload together with every other one queued when the writer
        comes free: one hop and one transaction for all of them, where each would have
        waited for the writer to publish alone (on a busy server, uploads queue here)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Shielded: a queued upload is published by whoever takes the queue, so its handler
        # must not abort (and discard) it meanwhile.
        with anyio.CancelScope(shield=True):
            self._waiting.append((writer, done))
            async with self._db.write_lock:
                if not done.done():  # else an earlier holder took it along
                    batch, self._waiting = self._waiting, []
                    await self._publish_batch(batch)
        done.result()

    async def _publish_batch(
        self, batch: list[tuple[CommitsInThread, asyncio.Future[None]]]
    ) -> None:
        """Publish ``batch`` (under the write lock) and tell each waiter how it went."""
        failure: Exception | None = None
        try:
            await self._publish_in_one_hop([w for w, _ in batch], lock_held=True)
        except Exception as exc:
            failure = exc
        except BaseException:
            for _, waiting in batch:
                waiting.cancel()
            raise
        for _, waiting in batch:
            if failure is None:
                waiting.set_result(None)
            else:
                waiting.set_exception(failure)

    # -- deletion and clean-up ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(digests))
        rows = [(d.key,) for d in unique]
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as sql:
                await sql(lambda conn: conn.executemany("DELETE FROM blobs WHERE key = ?", rows))
                deleted = await self._delete_from_storage(unique, then_tell=False)
            # Listeners (e.g. per-instance membership in Redis) are told after the commit:
            # a network round trip inside the transaction would hold every upload's writer.
            await self._tell_deletion_listeners(unique)
        return deleted

    async def index_existing(self, blobs: Sequence[tuple[Digest, float]]) -> None:
        rows = [(d.key, d.size_bytes, used, used) for d, used in blobs]
        await self._db.write(
            lambda conn: conn.executemany(
                "INSERT OR IGNORE INTO blobs (key, size_bytes, accessed_at, stored_at)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
        )

    async def forget(self, digests: Iterable[Digest]) -> None:
        rows = [(d.key,) for d in digests]
        await self._db.write(lambda conn: conn.executemany("DELETE FROM blobs WHERE key = ?", rows))

    async def get_total_size(self) -> int:
        row = await self._db.read(
            lambda conn: conn.execute("SELECT total_size FROM totals").fetchone()
        )
        return int(row[0])

    async def deletion_marker(self) -> int | None:
        row = await self._db.read(
            lambda conn: conn.execute("SELECT deletions FROM totals").fetchone()
        )
        return int(row[0])

    async def least_recent_digests(self) -> AsyncIterator[tuple[Digest, int]]:
        after: tuple[float, str] = (-math.inf, "")
        while True:
            page = await self._db.run(partial(_page_after, after=after))
            for _accessed_at, key, size in page:
                yield Digest.from_key(key), size
            if len(page) < _EVICTION_BATCH:
                return
            after = (page[-1][0], page[-1][1])

    async def delete_n_bytes(
        self,
        n_bytes: int,
        dry_run: bool = False,
        protect_blobs_after: datetime | None = None,
        large_blob_threshold: int | None = None,
        large_blob_lifetime: datetime | None = None,
    ) -> int:
        protect = protect_blobs_after.timestamp() if protect_blobs_after else math.inf
        passes: list[tuple[str, tuple[float, ...]]] = []
        if large_blob_threshold is not None and large_blob_lifetime is not None:
            passes.append(
                (
                    "size_bytes > ? AND accessed_at < ?",
                    (large_blob_threshold, min(protect, large_blob_lifetime.timestamp())),
                )
            )
        passes.append(("accessed_at < ?", (protect,)))
        freed = 0
        for condition, params in passes:
            after: tuple[float, str] = (-math.inf, "")
            while freed < n_bytes:
                batch = await self._eviction_batch(
                    condition, params, after, n_bytes - freed, dry_run
                )
                if not batch:
                    break
                freed += sum(size for _, _, size in batch)
                after = (batch[-1][0], batch[-1][1])
        return freed

    async def _eviction_batch(
        self,
        condition: str,
        params: tuple[float, ...],
        after: tuple[float, str],
        wanted: int,
        dry_run: bool,
    ) -> list[tuple[float, str, int]]:
        """Select (and unless dry_run, delete) the oldest candidates covering ``wanted`` bytes."""
        select = (
            f"SELECT accessed_at, key, size_bytes FROM blobs WHERE {condition}"
            " AND (accessed_at, key) > (?, ?) ORDER BY accessed_at, key LIMIT ?"
        )
        args = (*params, *after, _EVICTION_BATCH)
        if dry_run:
            return _covering(
                await self._db.run(lambda c: c.execute(select, args).fetchall()), wanted
            )
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as sql:
                batch = _covering(await sql(lambda c: c.execute(select, args).fetchall()), wanted)
                keys = [(key,) for _, key, _ in batch]
                await sql(lambda conn: conn.executemany("DELETE FROM blobs WHERE key = ?", keys))
                evicted = [Digest.from_key(key) for _, key, _ in batch]
                await self._delete_from_storage(evicted, then_tell=False)
            await self._tell_deletion_listeners(evicted)  # after the commit, as in delete()
        return batch


def _page_after(conn: sqlite3.Connection, after: tuple[float, str]) -> list[tuple[float, str, int]]:
    return conn.execute(
        "SELECT accessed_at, key, size_bytes FROM blobs"
        " WHERE (accessed_at, key) > (?, ?) ORDER BY accessed_at, key LIMIT ?",
        (*after, _EVICTION_BATCH),
    ).fetchall()


def _covering(rows: list[tuple[float, str, int]], wanted: int) -> list[tuple[float, str, int]]:
    """The shortest prefix of ``rows`` whose sizes add up to at least ``wanted``."""
    total = 0
    for position, (_, _, size) in enumerate(rows):
        total += size
        if total >= wanted:
            return rows[: position + 1]
    return rows
