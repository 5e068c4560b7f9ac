"""A small async wrapper around SQLite, shared by the SQLite index, stores and action cache.

Each call is one thread hop, but for the smallest (``lookup``, ``write_on_loop``), which run
on the event loop's thread, where a hop would cost more than the work. Writes (and ``run``)
go through one connection, one caller at a time; reads (``read``) each take one of a few more
connections and run side by side, as WAL mode allows, so a burst of lookups neither queues
behind a write nor behind each other.
WAL mode and a busy timeout let several server processes share a database file;
``BEGIN IMMEDIATE`` transactions serialize writers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import anyio

from asynccas.errors import BackendUnavailable, StorageFull
from asynccas.outages import outages
from asynccas.threads import in_thread

T = TypeVar("T")

LOOKUP_LIMIT: Final = 32
"""Keys a caller looks up at most on the event loop (``SqliteDatabase.lookup``)."""
LOOP_WRITES_PER_CHECKPOINT: Final = 100
"""Writes on the event loop (``SqliteDatabase.write_on_loop``) between two that are done in a
worker thread, whose commit checkpoints the WAL if it has grown past SQLite's 1,000 pages."""
_BUSY_CODES: Final = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


@contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """Translate sqlite3 errors into asynccas errors once, at the backend boundary."""
    try:
        yield
    except sqlite3.Error as exc:
        message = str(exc)
        if "full" in message:
            raise StorageFull(f"SQLite database {path} is full: {message}") from exc
        if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
            # The file or its disk failed (an I/O error, corruption, a lock held too long). A
            # refused statement (a constraint) says nothing about the database being there.
            outages("SQLite", str(path)).failed(exc)
        raise BackendUnavailable(f"SQLite database {path} failed: {message}") from exc
    outages("SQLite", str(path)).succeeded()


class SqliteDatabase:
    def __init__(
        self,
        path: str | Path,
        schema: str,
        *,
        busy_timeout: float = 30.0,
        fsync: bool = True,
        readers: int = 4,
        durable_commits: bool = False,
    ) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._durable_commits = durable_commits
        self._schema = schema
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        # asyncio's own primitives: anyio's yield to the loop even when uncontended, and
        # every SQLite call passes through these.
        self._lock = asyncio.Lock()
        self._readers = asyncio.Semaphore(readers)
        self._reader_count = readers
        self._idle_readers: list[sqlite3.Connection] = []
        self._loop_conn: sqlite3.Connection | None = None
        self._loop_writes = 0

    async def open(self) -> None:
        with sqlite_errors(self.path):
            self._conn = await in_thread(self._connect)
            self._loop_conn = await in_thread(self._connect_for_loop)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: durable at checkpoints, and WAL keeps it consistent: a power loss may take
        # back the last commits, which suits records that can be lost (an index row whose
        # blob is re-uploaded or re-indexed, an action result). Data that others point at
        # (small blobs, which an index row committed after them names) asks for
        # ``durable_commits``: FULL, the WAL fsynced at every commit. Without fsync (asked for
        # speed, as for disk blobs), a power loss may cost recent writes; `reindex` rebuilds.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        try:
            # One transaction, so concurrent processes creating the schema do not collide.
            conn.executescript(f"BEGIN IMMEDIATE;\n{self._schema};\nCOMMIT;")
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def _synchronous(self) -> str:
        return ("FULL" if self._durable_commits else "NORMAL") if self._fsync else "OFF"

    def _connect_for_loop(self) -> sqlite3.Connection:
        """The connection ``lookup`` and ``write_on_loop`` use on the event loop's thread: it
        never waits for a lock (busy timeout 0), and its commits never checkpoint, which
        copies pages into the database and fsyncs it: those are left to the worker threads'
        connections (see ``write_on_loop``)."""
        conn = self._connect_reader(0.0)
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")  # a connection's own
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            loop_conn, self._loop_conn = self._loop_conn, None
            if loop_conn is not None:  # used on the loop only, so not in use now
                await in_thread(loop_conn.close)
            async with self._lock:
                await in_thread(conn.close)
            for _ in range(self._reader_count):  # wait for reads under way
                await self._readers.acquire()
            idle, self._idle_readers = self._idle_readers, []
            try:
                for reader in idle:
                    await in_thread(reader.close)
            finally:
                for _ in range(self._reader_count):
                    self._readers.release()

    @property
    def write_lock(self) -> asyncio.Lock:
        """Held by whoever uses the write connection; see ``write_connection``."""
        return self._lock

    def write_connection(self) -> sqlite3.Connection:
        """The write connection, for a caller that holds ``write_lock`` and works in a worker
        thread of its own (e.g. an index publishing into this database and its own in one
        hop). Statements run in autocommit unless the caller begins a transaction."""
        if self._conn is None:
            raise BackendUnavailable(f"SQLite database {self.path} is not open")
        return self._conn

    async def read(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``func`` in a worker thread on a connection of its own, beside
        other reads and the writer (WAL readers see the last committed state)."""
        async with self._readers:
            if self._conn is None:
                raise BackendUnavailable(f"SQLite database {self.path} is not open")
            with sqlite_errors(self.path):
                if self._idle_readers:
                    reader = self._idle_readers.pop()
                else:  # made on first use; at most ``readers`` of them
                    reader = await in_thread(self._connect_reader)
                try:
                    return await in_thread(func, reader)
                finally:
                    self._idle_readers.append(reader)

    async def lookup(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``func``, a read of a few rows by key, on the event loop's own thread.

        A probe of a few B-tree pages the OS has cached takes microseconds; a thread hop costs
        ~60 us of CPU and two context switches (Bazel's traffic made 8.4 hops per action; with
        these lookups and small uploads' hashing on the loop, 2.9, and the server's CPU per
        action fell by a fifth). The connection never waits for a lock: should SQLite be busy
        (another process recovering the WAL or truncating it), the read is done in a worker
        thread like ``read``'s. Callers keep to bounded reads (``LOOKUP_LIMIT``)."""
        reader = self._loop_conn
        if reader is None:
            raise BackendUnavailable(f"SQLite database {self.path} is not open")
        try:
            with sqlite_errors(self.path):
                try:
                    return func(reader)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode & 0xFF not in _BUSY_CODES:
                        raise
        finally:
            if reader.in_transaction:  # a failed read may leave its snapshot open
                reader.rollback()
        return await self.read(func)

    def _connect_reader(self, busy_timeout: float | None = None) -> sqlite3.Connection:
        timeout = self._busy_timeout if busy_timeout is None else busy_timeout
        return sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )

    async def run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``func`` with the connection in a worker thread, one caller at a time."""
        async with self._lock:
            return await self._call(func)

    async def _call(self, func: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise BackendUnavailable(f"SQLite database {self.path} is not open")
        with sqlite_errors(self.path):
            return await in_thread(func, conn)

    async def write(
        self,
        func: Callable[[sqlite3.Connection], T],
        *,
        before: Callable[[], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        also_holding: Sequence[asyncio.Lock] = (),
        lock_held: bool = False,
    ) -> T:
        """Run ``func`` inside one write transaction, begun and ended in one thread hop rather
        than three: a batch of small blobs pays for every hop. ``before`` runs first in the
        same thread, outside the transaction (if it raises, nothing else runs); if the
        transaction does not commit, ``on_failure`` runs after the rollback.

        ``also_holding``: further locks (other databases' ``write_lock``, whose connections
        ``func`` uses) taken after this database's, in the order given. ``lock_held``: the
        caller holds ``write_lock`` already (and decided what to write once it got it).
        """
        call = partial(_in_transaction, func, before, on_failure)
        if lock_held:
            assert self._lock.locked(), "lock_held, but the write lock is free"
            return await self._call_holding(call, also_holding)
        async with self._lock:
            return await self._call_holding(call, also_holding)

    async def write_on_loop(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Like ``write``, for a write of a few small rows (an action result), but on the event
        loop's thread: with WAL and ``synchronous=NORMAL`` a commit is a write of a few pages
        into the WAL file, tens of microseconds, where a thread hop costs more and hands the
        GIL back and forth (Bazel writes one action result per action).

        Not on the loop: commits that fsync (``durable_commits``), a write that meets
        another process's write lock (it is redone in a worker thread, which waits for the
        lock), and every ``LOOP_WRITES_PER_CHECKPOINT``-th write, whose commit in a worker
        thread checkpoints the WAL grown by the others (the loop's connection never does).
        """
        if self._fsync and self._durable_commits:
            return await self.write(func)
        async with self._lock:
            conn = self._loop_conn
            if conn is None:
                raise BackendUnavailable(f"SQLite database {self.path} is not open")
            self._loop_writes += 1
            if self._loop_writes < LOOP_WRITES_PER_CHECKPOINT:
                with sqlite_errors(self.path):
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                    except sqlite3.OperationalError as exc:
                        if exc.sqlite_errorcode & 0xFF not in _BUSY_CODES:
                            raise
                    else:
                        return _in_open_transaction(func, None, conn)
            self._loop_writes = 0
            return await self._call(partial(_in_transaction, func, None, None))

    async def _call_holding(
        self, call: Callable[[sqlite3.Connection], T], locks: Sequence[asyncio.Lock]
    ) -> T:
        if not locks:
            return await self._call(call)
        async with AsyncExitStack() as held:
            for lock in locks:
                await held.enter_async_context(lock)
            return await self._call(call)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[InTransaction]:
        """Hold the write lock across awaits; yields a function that runs SQL inside it.

        Used where work outside SQLite (publishing or deleting a file) must happen
        atomically with respect to other processes' index updates. Commits on
        success, rolls back on any exception; both are shielded from cancellation.
        """
        async with self._lock:
            await self._call(lambda c: c.execute("BEGIN IMMEDIATE"))
            transaction = InTransaction(self)
            try:
                yield transaction
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._call(_rollback)
                raise
            if not transaction.committed:
                with anyio.CancelScope(shield=True):
                    await self._call(_commit)


@contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on ``conn`` in the calling thread: committed if the block ends
    normally, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        _rollback(conn)
        raise
    _commit(conn)


def _in_transaction(
    func: Callable[[sqlite3.Connection], T],
    before: Callable[[], None] | None,
    on_failure: Callable[[], None] | None,
    conn: sqlite3.Connection,
) -> T:
    if before is not None:
        before()
    conn.execute("BEGIN IMMEDIATE")
    return _in_open_transaction(func, on_failure, conn)


def _in_open_transaction(
    func: Callable[[sqlite3.Connection], T],
    on_failure: Callable[[], None] | None,
    conn: sqlite3.Connection,
) -> T:
    try:
        return _then_commit(func, conn)
    except BaseException:
        try:
            _rollback(conn)
        finally:
            if on_failure is not None:
                on_failure()
        raise


def _then_commit(func: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    result = func(conn)
    _commit(conn)
    return result


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:  # not if a failed COMMIT already rolled it back
        conn.execute("ROLLBACK")


def _commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT leaves it open, and the next BEGIN would fail
            conn.execute("ROLLBACK")
        raise


def move_rows_off_without_rowid(
    conn: sqlite3.Connection, table: str, statements: Sequence[str], columns: str
) -> None:
    """Rebuild ``table`` with ``statements`` (the current CREATE TABLE and its indexes) if an
    earlier asynccas created it WITHOUT ROWID, keeping its rows; otherwise do nothing.

    WITHOUT ROWID suits small rows only: a row's payload may take about a quarter of a page
    before it spills into overflow pages, and random keys split pages full of blob data.
    For tables of blobs, reads were 8x and inserts 2.5x slower than in a rowid table.
    Call it inside a write transaction, so that the move is all or nothing.
    """
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if row is None or "WITHOUT ROWID" not in row[0].upper():
        return
    old = f"{table}_without_rowid"
    conn.execute(f"ALTER TABLE {table} RENAME TO {old}")
    # Its indexes moved with it; drop them so that the new table's can take their names.
    indexes = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
        (old,),
    ).fetchall()
    for (index,) in indexes:
        conn.execute(f"DROP INDEX {index}")
    for statement in statements:
        conn.execute(statement)
    conn.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {old}")
    conn.execute(f"DROP TABLE {old}")


class InTransaction:
    """Runs SQL inside an open ``SqliteDatabase.transaction()``."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database
        self.committed = False

    async def __call__(self, func: Callable[[sqlite3.Connection], T]) -> T:
        if self.committed:
            raise RuntimeError("the transaction has already been committed")
        return await self._database._call(func)

    async def commit_with(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``func`` and commit, in one thread hop: for the transaction's last statement."""
        if self.committed:
            raise RuntimeError("the transaction has already been committed")
        with anyio.CancelScope(shield=True):  # once the work is done, the commit must follow
            result = await self._database._call(partial(_then_commit, func))
        self.committed = True
        return result
