"""SqliteIndex behaviour beyond the conformance check: exact totals under concurrency, two
indexes (as two server processes would) sharing one data directory, and self-healing."""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asynccas import threads
from asynccas.digest import Digest
from asynccas.errors import BackendUnavailable, DigestMismatch
from asynccas.index.sqlite import SqliteIndex
from asynccas.sqlite_database import LOOKUP_LIMIT, LOOP_WRITES_PER_CHECKPOINT, SqliteDatabase
from asynccas.storage.action_cache import SqliteActionCache
from asynccas.storage.base import put_chunks
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.disk import DiskStorage
from asynccas.storage.size_differentiated import SizeDifferentiatedStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from asynccas.testing import blob, check_eviction_racing_uploads, check_index_concurrency
from tests.support.clock import clear_of_window_edge

pytestmark = pytest.mark.anyio


def open_index(root: Path) -> SqliteIndex:
    return SqliteIndex(DiskStorage(root / "data", fsync=False), root / "index.sqlite")


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_total_size_is_exact_under_concurrent_churn(tmp_path: Path) -> None:
    # Two indexes on one directory stand in for two worker processes.
    async with open_index(tmp_path) as first, open_index(tmp_path) as second:
        await check_index_concurrency(first, second)


async def test_eviction_racing_reupload_never_loses_an_indexed_blob(tmp_path: Path) -> None:
    async with open_index(tmp_path) as writer, open_index(tmp_path) as evictor:
        await check_eviction_racing_uploads(writer, evictor)


async def test_index_heals_when_storage_lost_a_blob(tmp_path: Path) -> None:
    digest, data = blob(5000, 1)
    async with open_index(tmp_path) as index:
        await index.commit_write(digest, chunks(data))
        assert isinstance(index.storage, DiskStorage)
        await anyio.to_thread.run_sync(index.storage.path_for(digest).unlink)
        assert await index.bulk_read_blobs([digest]) == {}
        assert not await index.has_blob(digest), "a lost blob must be de-indexed"
        assert await index.get_total_size() == 0


async def test_index_persists_across_restarts(tmp_path: Path) -> None:
    digest, data = blob(5000, 2)
    async with open_index(tmp_path) as index:
        await index.commit_write(digest, chunks(data))
    async with open_index(tmp_path) as reopened:
        assert await reopened.has_blob(digest)
        assert await reopened.get_total_size() == len(data)
        assert [d async for d, _ in reopened.least_recent_digests()] == [digest]


async def test_least_recent_order(tmp_path: Path) -> None:
    blobs = [blob(100, i) for i in range(3)]
    async with SqliteIndex(
        DiskStorage(tmp_path / "d", fsync=False), tmp_path / "i.sqlite", touch_interval=0
    ) as index:
        for digest, data in blobs:
            await index.commit_write(digest, chunks(data))
            await anyio.sleep(0.01)
        await anyio.sleep(0.01)
        await index.missing_blobs([blobs[0][0]])  # a use moves it to the back
        order: list[Digest] = [d async for d, _ in index.least_recent_digests()]
        assert order == [blobs[1][0], blobs[2][0], blobs[0][0]]


async def test_an_index_from_before_deletion_markers_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    def old_schema() -> None:
        conn = sqlite3.connect(tmp_path / "index.sqlite")
        conn.executescript(
            "CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), total_size INTEGER NOT NULL,"
            " blob_count INTEGER NOT NULL); INSERT INTO totals VALUES (0, 0, 0);"
        )
        conn.close()

    await anyio.to_thread.run_sync(old_schema)
    digest, data = blob(100, 1)
    async with open_index(tmp_path) as index:
        before = await index.deletion_marker()
        await index.commit_write(digest, chunks(data))
        await index.delete_blob(digest)
        assert await index.deletion_marker() == (before or 0) + 1
        assert await index.get_total_size() == 0


@pytest.mark.parametrize(("fsync", "synchronous"), [(True, 1), (False, 0)])
async def test_no_fsync_reaches_sqlite(tmp_path: Path, fsync: bool, synchronous: int) -> None:
    # `serve --no-fsync` trades durability for speed in the databases too, not only for files.
    index = SqliteIndex(DiskStorage(tmp_path / "data"), tmp_path / "index.sqlite", fsync=fsync)
    async with index:
        mode = await index._db.run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert mode == synchronous  # 1 is NORMAL, 0 is OFF


@pytest.mark.parametrize(("fsync", "synchronous"), [(True, 2), (False, 0)])
async def test_small_blobs_are_durable_before_their_index_row_commits(
    tmp_path: Path, fsync: bool, synchronous: int
) -> None:
    # Under NORMAL a power loss could take back a row of small-blob data whose index row (a
    # later commit, in another database) survived: FindMissingBlobs would then say present.
    async with SqliteBlobStorage(tmp_path / "rows.sqlite", fsync=fsync) as rows:
        mode = await rows._db.run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert mode == synchronous  # 2 is FULL: the WAL is fsynced at every commit


@pytest.mark.parametrize("how", ["write", "transaction"])
async def test_a_failed_commit_does_not_leave_a_transaction_open(tmp_path: Path, how: str) -> None:
    """A COMMIT can fail (here: a deferred foreign key); the next write must still work."""
    schema = """
    CREATE TABLE IF NOT EXISTS parents (id INTEGER PRIMARY KEY);
    CREATE TABLE IF NOT EXISTS children (
        parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
    );
    """
    database = SqliteDatabase(tmp_path / "db.sqlite", schema)
    await database.open()
    try:
        await database.run(lambda conn: conn.execute("PRAGMA foreign_keys = ON"))

        def orphan(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO children VALUES (7)")

        async def write_orphan() -> None:
            if how == "write":
                await database.write(orphan)
            else:
                async with database.transaction() as sql:
                    await sql(orphan)

        with pytest.raises(BackendUnavailable, match="FOREIGN KEY"):
            await write_orphan()
        await database.write(lambda conn: conn.execute("INSERT INTO parents VALUES (7)"))
        await database.write(orphan)
        rows = await database.run(lambda conn: conn.execute("SELECT * FROM children").fetchall())
        assert rows == [(7,)]
    finally:
        await database.close()


async def test_recency_is_refreshed_once_per_window_by_each_process(tmp_path: Path) -> None:
    """A use raises accessed_at to the start of the touch window; what this process raised in
    this window it leaves alone (reads of hot blobs then write nothing), another process not."""
    digest, data = blob(300, 3)
    storage = DiskStorage(tmp_path / "data", fsync=False)

    async def accessed_at(index: SqliteIndex) -> float:
        row = await index._db.run(
            lambda c: c.execute("SELECT accessed_at FROM blobs WHERE key = ?", (digest.key,))
        )
        return float(row.fetchone()[0])

    async def make_stale(index: SqliteIndex) -> None:
        await index._db.write(
            lambda c: c.execute("UPDATE blobs SET accessed_at = 7 WHERE key = ?", (digest.key,))
        )

    path = tmp_path / "index.sqlite"
    await clear_of_window_edge()
    async with SqliteIndex(storage, path, touch_interval=3600) as uploader:
        await uploader.commit_write(digest, chunks(data))
    async with SqliteIndex(storage, path, touch_interval=3600) as index:
        await make_stale(index)
        assert await index.bulk_read_blobs([digest]) == {digest: data}
        refreshed = await accessed_at(index)
        assert refreshed > 7, "a read refreshes recency"
        assert refreshed % 3600 == 0, "to the start of the touch window"
        await make_stale(index)
        assert await index.missing_blobs([digest]) == []
        assert await index.bulk_read_blobs([digest]) == {digest: data}
        assert await accessed_at(index) == 7, "refreshed twice in one window by one process"
        async with SqliteIndex(storage, path, touch_interval=3600) as other:
            assert await other.missing_blobs([digest]) == []
            assert await accessed_at(other) == refreshed


async def test_blobs_are_refreshed_on_the_loop_and_not_right_after_their_upload(
    tmp_path: Path, hops: _CountingPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [blob(300, 1700 + i) for i in range(3)]
    await clear_of_window_edge()
    async with open_tiered_index(tmp_path) as index:
        refreshes: list[object] = []
        write_on_loop, run = index._db.write_on_loop, index._db.run

        async def counted_on_loop(func: Callable[[sqlite3.Connection], object]) -> object:
            refreshes.append(func)
            return await write_on_loop(func)

        async def counted_run(func: Callable[[sqlite3.Connection], object]) -> object:
            refreshes.append(func)
            return await run(func)

        monkeypatch.setattr(index._db, "write_on_loop", counted_on_loop)
        monkeypatch.setattr(index._db, "run", counted_run)
        for digest, data in blobs:
            await index.commit_write(digest, chunks(data))
        # Uploaded with the present time: using them in the same window writes nothing.
        assert await index.missing_blobs([d for d, _ in blobs]) == []
        assert await index.bulk_read_blobs([d for d, _ in blobs]) == dict(blobs)
        assert refreshes == []
        # In a later window the first use refreshes them, on the event loop.
        index.touch_interval = 1e-3
        await anyio.sleep(0.01)
        hops.hops = 0
        assert await index.missing_blobs([d for d, _ in blobs]) == []
        assert (len(refreshes), hops.hops) == (1, 0)


async def test_commit_with_ends_the_transaction_with_its_statement(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "db.sqlite", "CREATE TABLE IF NOT EXISTS t (v INTEGER)")
    await database.open()

    def insert(value: int) -> Callable[[sqlite3.Connection], object]:
        return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (value,))

    def fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    try:
        async with database.transaction() as sql:
            await sql(insert(1))
            await sql.commit_with(insert(2))
            with pytest.raises(RuntimeError, match="already been committed"):
                await sql(insert(3))

        async def insert_then_fail() -> None:
            async with database.transaction() as sql:
                await sql(insert(4))
                await sql.commit_with(fail)  # the whole transaction rolls back

        with pytest.raises(BackendUnavailable, match="no_such_table"):
            await insert_then_fail()
        rows = await database.run(lambda conn: conn.execute("SELECT v FROM t").fetchall())
        assert rows == [(1,), (2,)]
    finally:
        await database.close()


@asynccontextmanager
async def _commits_queued_behind_a_busy_writer(
    index: SqliteIndex, blobs: list[tuple[Digest, bytes]], results: list[BaseException | None]
) -> AsyncIterator[None]:
    """Upload ``blobs`` while the index's writer is held; yields once every upload waits for
    it (each verified and queued), then frees it. Each upload's outcome goes to ``results``."""

    async def upload(position: int, digest: Digest, data: bytes) -> None:
        try:
            await index.commit_write(digest, chunks(data))
        except (Exception, anyio.get_cancelled_exc_class()) as exc:
            results[position] = exc
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise

    writer_lock = index._db.write_lock
    await writer_lock.acquire()
    try:
        async with anyio.create_task_group() as uploads:
            for position, (digest, data) in enumerate(blobs):
                uploads.start_soon(upload, position, digest, data)
            with anyio.fail_after(10):
                while len(index._waiting) < len(blobs):  # noqa: ASYNC110  (no event to wait on)
                    await anyio.sleep(0.005)
            yield
            writer_lock.release()
    finally:
        if writer_lock.locked():
            writer_lock.release()


def _count_publish_batches(index: SqliteIndex, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of uploads in each of the index's publishing hops, as they happen."""
    batches: list[int] = []
    publish = index._publish_in_one_hop

    async def counted(writers: list[object], *args: object, **kwargs: object) -> None:
        batches.append(len(writers))
        await publish(writers, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "_publish_in_one_hop", counted)
    return batches


async def test_uploads_waiting_for_the_writer_are_published_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [blob(300_000, 300 + i) for i in range(6)]
    results: list[BaseException | None] = [None] * len(blobs)
    async with open_index(tmp_path) as index:
        batches = _count_publish_batches(index, monkeypatch)
        async with _commits_queued_behind_a_busy_writer(index, blobs, results):
            pass
        assert results == [None] * len(blobs)
        assert batches == [len(blobs)], "the queued uploads should share one transaction"
        for digest, data in blobs:
            assert await index.has_blob(digest)
            assert await index.bulk_read_blobs([digest]) == {digest: data}
        assert await index.get_total_size() == sum(d.size_bytes for d, _ in blobs)


async def test_a_failed_shared_publish_fails_every_upload_in_it_and_stores_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [blob(300_000, 400 + i) for i in range(4)]
    results: list[BaseException | None] = [None] * len(blobs)
    async with open_index(tmp_path) as index:
        assert isinstance(index.storage, DiskStorage)
        storage = index.storage
        link = os.link

        def failing_link(source: str, target: object) -> None:
            if str(target).endswith(blobs[-1][0].hash):  # the batch's last blob cannot be stored
                raise OSError(errno.EIO, "simulated disk error")
            link(source, target)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "link", failing_link)
        async with _commits_queued_behind_a_busy_writer(index, blobs, results):
            pass
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        for digest, _ in blobs:  # the blobs published before the failure were taken back
            assert not await index.has_blob(digest)
            assert not storage.path_for(digest).exists()
        assert await index.get_total_size() == 0
        assert list((tmp_path / "data" / "tmp").iterdir()) == [], "temp files left behind"


async def test_a_queued_upload_cancelled_meanwhile_is_still_stored_and_indexed(
    tmp_path: Path,
) -> None:
    blobs = [blob(300_000, 500 + i) for i in range(3)]
    results: list[BaseException | None] = [None] * len(blobs)
    async with open_index(tmp_path) as index:
        assert isinstance(index.storage, DiskStorage)
        with anyio.CancelScope() as scope:
            async with _commits_queued_behind_a_busy_writer(index, blobs, results):
                scope.cancel()  # every upload is cancelled while it waits for the writer
        # Queued uploads are published by whoever takes the queue: never half-done.
        for digest, data in blobs:
            assert await index.has_blob(digest)
            assert index.storage.path_for(digest).read_bytes() == data
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


async def test_deletion_listeners_are_told_after_the_transaction(tmp_path: Path) -> None:
    # A listener may be a network round trip (per-instance membership in Redis): told inside
    # the transaction, it held the writer that every upload needs.
    blobs = [blob(3000, 600 + i) for i in range(4)]
    told: list[tuple[list[Digest], bool]] = []
    async with open_index(tmp_path) as index:

        async def listener(digests: Sequence[Digest]) -> None:
            told.append((list(digests), index._db.write_lock.locked()))

        index.deletion_listeners.append(listener)
        for digest, data in blobs:
            await index.commit_write(digest, chunks(data))
        await index.delete([blobs[0][0]])
        await index.delete_n_bytes(blobs[1][0].size_bytes)  # eviction: the oldest one
    assert told == [([blobs[0][0]], False), ([blobs[1][0]], False)]


class _CountingPool:
    """Counts the thread hops (``asynccas.threads.in_thread``) made through it."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.hops = 0

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        self.hops += 1
        return self.pool.submit(*args, **kwargs)


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> _CountingPool:
    counting = _CountingPool(threads._POOL)
    monkeypatch.setattr(threads, "_POOL", counting)
    return counting


def open_tiered_index(root: Path) -> SqliteIndex:
    """The default layout: blobs up to 64 KiB as SQLite rows, larger ones as files."""
    return SqliteIndex(
        SizeDifferentiatedStorage(
            SqliteBlobStorage(root / "small.sqlite"), DiskStorage(root / "data", fsync=False)
        ),
        root / "index.sqlite",
    )


async def test_a_small_upload_is_hashed_on_the_loop_and_published_in_one_hop(
    tmp_path: Path, hops: _CountingPool
) -> None:
    digest, data = blob(20_000, 700)
    async with open_tiered_index(tmp_path) as index:
        hops.hops = 0
        await index.commit_write(digest, chunks(data))
        assert hops.hops == 1
        assert await index.bulk_read_blobs([digest]) == {digest: data}


async def test_small_uploads_waiting_for_the_writer_share_one_hop_and_transaction(
    tmp_path: Path, hops: _CountingPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bazel's traffic is mostly blobs of a few KiB, several uploads at once: each verified
    # in a hop of its own and then published alone cost two hops and a transaction apiece.
    blobs = [blob(3000 + i, 800 + i) for i in range(5)]
    results: list[BaseException | None] = [None] * len(blobs)
    async with open_tiered_index(tmp_path) as index:
        batches = _count_publish_batches(index, monkeypatch)
        rows_statements = _trace_rows_writes(index)
        hops.hops = 0
        async with _commits_queued_behind_a_busy_writer(index, blobs, results):
            assert hops.hops == 0, "small uploads are hashed on the loop"
        assert results == [None] * len(blobs)
        assert batches == [len(blobs)]
        assert hops.hops == 1
        # One commit (one fsync) of the rows' database, not one per upload.
        assert rows_statements == ["BEGIN", *["INSERT"] * len(blobs), "COMMIT"]
        for digest, data in blobs:
            assert await index.bulk_read_blobs([digest]) == {digest: data}
        assert await index.get_total_size() == sum(d.size_bytes for d, _ in blobs)


def _trace_rows_writes(index: SqliteIndex) -> list[str]:
    """The first word of each statement run on the small-blob rows' write connection."""
    assert isinstance(index.storage, SizeDifferentiatedStorage)
    assert isinstance(index.storage.small, SqliteBlobStorage)
    statements: list[str] = []
    connection = index.storage.small._db.write_connection()
    connection.set_trace_callback(lambda sql: statements.append(sql.split()[0]))
    return statements


async def test_a_batch_of_small_blobs_is_published_in_one_hop_and_one_commit(
    tmp_path: Path, hops: _CountingPool
) -> None:
    blobs = [blob(4096, 1500 + i) for i in range(20)]
    async with open_tiered_index(tmp_path) as index:
        rows_statements = _trace_rows_writes(index)
        hops.hops = 0
        assert await index.bulk_update_blobs(blobs) == [None] * len(blobs)
        assert hops.hops == 2, "hashing, then publishing rows and index rows in one hop"
        assert rows_statements == ["BEGIN", *["INSERT"] * len(blobs), "COMMIT"]
        assert await index.bulk_read_blobs([d for d, _ in blobs]) == dict(blobs)


async def test_small_blobs_whose_index_rows_fail_are_taken_back_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = [blob(4096, 1600 + i) for i in range(3)]
    async with open_tiered_index(tmp_path) as index:
        await index._db.write(
            lambda conn: conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON blobs"
                " BEGIN SELECT RAISE(ABORT, 'index refused'); END"
            )
        )
        with pytest.raises(BackendUnavailable, match="index refused"):
            await index.bulk_update_blobs(blobs)
        assert isinstance(index.storage, SizeDifferentiatedStorage)
        # The rows had committed before the index failed: none may stay, stored but unindexed.
        assert await index.storage.small.bulk_read(NO_CONTEXT, [d for d, _ in blobs]) == {}
    # A refused statement is not the database going away: nothing to tell the operator.
    assert not [r for r in caplog.records if r.name == "asynccas.outages"]


async def test_a_wrong_small_upload_queued_with_others_fails_alone(tmp_path: Path) -> None:
    good = [blob(3000 + i, 900 + i) for i in range(3)]
    wrong_digest = blob(3000, 950)[0]
    blobs = [*good, (wrong_digest, b"x" * 3000)]  # bytes that are not the digest's
    results: list[BaseException | None] = [None] * len(blobs)
    async with open_tiered_index(tmp_path) as index:
        writer_lock = index._db.write_lock
        await writer_lock.acquire()
        try:

            async def upload(position: int, digest: Digest, data: bytes) -> None:
                try:
                    await index.commit_write(digest, chunks(data))
                except Exception as exc:
                    results[position] = exc

            async with anyio.create_task_group() as uploads:
                for position, (digest, data) in enumerate(blobs):
                    uploads.start_soon(upload, position, digest, data)
                with anyio.fail_after(10):
                    while len(index._waiting) < len(good):  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                writer_lock.release()
        finally:
            if writer_lock.locked():
                writer_lock.release()
        assert results[: len(good)] == [None] * len(good)
        assert isinstance(results[-1], DigestMismatch)
        assert not await index.has_blob(wrong_digest)
        for digest, data in good:
            assert await index.bulk_read_blobs([digest]) == {digest: data}


async def test_lookups_of_a_few_keys_take_no_thread_hop(
    tmp_path: Path, hops: _CountingPool
) -> None:
    stored = [blob(2000 + i, 1000 + i) for i in range(3)]
    absent = blob(2000, 1100)[0]
    async with open_tiered_index(tmp_path) as index:
        for digest, data in stored:
            await index.commit_write(digest, chunks(data))
        await index.missing_blobs([absent, *(d for d, _ in stored)])  # refreshes recency
        hops.hops = 0
        assert await index.missing_blobs([absent, *(d for d, _ in stored)]) == [absent]
        assert await index.bulk_read_blobs([stored[0][0]]) == {stored[0][0]: stored[0][1]}
        assert hops.hops == 0
        many = [blob(10, 2000 + i)[0] for i in range(LOOKUP_LIMIT + 1)]
        assert await index.missing_blobs(many) == many
        assert hops.hops > 0, "a long list is looked up in a worker thread"


async def test_a_lookup_that_finds_sqlite_busy_is_done_in_a_thread(tmp_path: Path) -> None:
    # A WAL reader meets SQLITE_BUSY only in rare moments (another process recovering the
    # WAL); rather than wait on the loop, or fail, the lookup is read again in a thread.
    database = SqliteDatabase(tmp_path / "t.sqlite", "CREATE TABLE IF NOT EXISTS t (v INTEGER)")
    await database.open()
    try:
        await database.write(lambda conn: conn.execute("INSERT INTO t VALUES (7)"))
        on_loop = threading.get_ident()
        threads_used: list[bool] = []

        def read(conn: sqlite3.Connection) -> int:
            threads_used.append(threading.get_ident() != on_loop)
            if not threads_used[-1]:
                busy = sqlite3.OperationalError("database is locked")
                busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
                raise busy
            return int(conn.execute("SELECT v FROM t").fetchone()[0])

        assert await database.lookup(read) == 7
        assert threads_used == [False, True]

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT absent_column FROM t")

        with pytest.raises(BackendUnavailable, match="no such column"):
            await database.lookup(broken)  # any other error is the caller's, not retried
    finally:
        await database.close()


async def test_rows_read_on_the_loop_are_few_and_small(tmp_path: Path, hops: _CountingPool) -> None:
    small, large = blob(20_000, 1200), [blob(600_000, 1300 + i) for i in range(2)]
    async with SqliteBlobStorage(tmp_path / "rows.sqlite") as rows:
        for digest, data in [small, *large]:
            await put_chunks(rows, NO_CONTEXT, digest, chunks(data))
        hops.hops = 0
        assert await rows.bulk_read(NO_CONTEXT, [small[0]]) == {small[0]: small[1]}
        assert hops.hops == 0
        # 1.2 MB of rows: copied in a worker thread, not on the loop.
        assert await rows.bulk_read(NO_CONTEXT, [d for d, _ in large]) == dict(large)
        assert hops.hops > 0


_ROWS_SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB)"


def _insert(key: int, value: bytes) -> Callable[[sqlite3.Connection], object]:
    return lambda conn: conn.execute("INSERT INTO t VALUES (?, ?)", (key, value))


def _wal_frames(path: Path) -> int:
    """The frames the WAL holds now (a PASSIVE checkpoint reports them and changes nothing
    they would not have)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


async def test_small_writes_take_no_thread_hop_and_the_wal_is_still_checkpointed(
    tmp_path: Path, hops: _CountingPool
) -> None:
    database = SqliteDatabase(tmp_path / "t.sqlite", _ROWS_SCHEMA)
    await database.open()
    try:
        hops.hops = 0
        writes = 20 * LOOP_WRITES_PER_CHECKPOINT
        for key in range(writes):
            await database.write_on_loop(_insert(key, os.urandom(4000)))
        # One write in LOOP_WRITES_PER_CHECKPOINT goes to a worker thread, where its commit
        # checkpoints the WAL: the loop's connection never does.
        assert hops.hops == writes // LOOP_WRITES_PER_CHECKPOINT
        assert await database.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()) == (
            writes,
        )
        # Each write adds two pages or more: without checkpoints the WAL would hold 4,000
        # frames; with them it restarts once past SQLite's 1,000.
        assert await anyio.to_thread.run_sync(_wal_frames, database.path) < 1500
    finally:
        await database.close()


async def test_a_small_write_meeting_another_writer_waits_for_it_in_a_thread(
    tmp_path: Path, hops: _CountingPool
) -> None:
    database = SqliteDatabase(tmp_path / "t.sqlite", _ROWS_SCHEMA)
    await database.open()
    other = sqlite3.connect(database.path, isolation_level=None, check_same_thread=False)
    try:
        # Another process holds SQLite's write lock: the loop must not wait for it, nor fail.
        await anyio.to_thread.run_sync(other.execute, "BEGIN IMMEDIATE")
        hops.hops = 0
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(database.write_on_loop, _insert(1, b"mine"))
            await anyio.sleep(0.2)
            assert hops.hops == 1, "the write went to a worker thread"
            await anyio.to_thread.run_sync(other.execute, "COMMIT")
        assert await database.lookup(lambda c: c.execute("SELECT v FROM t").fetchall()) == [
            (b"mine",)
        ]
    finally:
        other.close()
        await database.close()


async def test_a_failed_small_write_rolls_back_and_the_next_one_commits(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "t.sqlite", _ROWS_SCHEMA)
    await database.open()
    try:
        await database.write_on_loop(_insert(1, b"first"))

        def insert_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t VALUES (2, 'never seen')")
            conn.execute("INSERT INTO t VALUES (1, 'a duplicate key')")

        with pytest.raises(BackendUnavailable, match="UNIQUE constraint"):
            await database.write_on_loop(insert_then_fail)
        await database.write_on_loop(_insert(3, b"third"))
        keys = await database.read(lambda c: c.execute("SELECT k FROM t ORDER BY k").fetchall())
        assert keys == [(1,), (3,)]
    finally:
        await database.close()


@pytest.mark.parametrize(("fsync", "on_loop"), [(True, False), (False, True)])
async def test_small_writes_that_fsync_stay_off_the_loop(
    tmp_path: Path, hops: _CountingPool, fsync: bool, on_loop: bool
) -> None:
    database = SqliteDatabase(
        tmp_path / "t.sqlite", _ROWS_SCHEMA, fsync=fsync, durable_commits=True
    )
    await database.open()
    try:
        hops.hops = 0
        await database.write_on_loop(_insert(1, b"x"))
        assert hops.hops == (0 if on_loop else 1)
        # The loop's connection commits as durably as the others.
        synchronous = await database.lookup(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert synchronous == (2 if fsync else 0)  # FULL, OFF
    finally:
        await database.close()


async def test_action_results_are_written_and_touched_on_the_loop(
    tmp_path: Path, hops: _CountingPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    action_cache = SqliteActionCache(tmp_path / "ac.sqlite", touch_interval=3600)
    await action_cache.start()
    database = action_cache._db
    writes: list[Callable[[sqlite3.Connection], object]] = []
    write_on_loop = database.write_on_loop

    async def counted(func: Callable[[sqlite3.Connection], object]) -> object:
        writes.append(func)
        return await write_on_loop(func)

    monkeypatch.setattr(database, "write_on_loop", counted)

    async def accessed_at() -> float:
        row = await database.read(lambda c: c.execute("SELECT accessed_at FROM action_results"))
        return float(row.fetchone()[0])

    try:
        action = blob(10, 1)[0]
        await clear_of_window_edge(3600)
        hops.hops = 0
        await action_cache.put("", action, b"result")
        written_at = await accessed_at()
        assert await action_cache.get("", action) == b"result"
        # Written with the present time: the hit right after needs no touch.
        assert len(writes) == 1
        assert await accessed_at() == written_at
        # A later window's first hit raises the entry's recency, on the loop too.
        action_cache.touch_interval = 1e-3
        await anyio.sleep(0.01)
        hops.hops = 0
        assert await action_cache.get("", action) == b"result"
        assert (len(writes), hops.hops) == (2, 0)
        assert await accessed_at() > written_at
    finally:
        await action_cache.stop()
