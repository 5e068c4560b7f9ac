"""Where ActionResults live: keyed by instance name and action digest, stored as encoded bytes.

The service layer decides what a usable entry is (see ``server/action_cache.py``);
these stores only keep bytes, bounded by an entry count, least recently used out first.
"""

from __future__ import annotations

import abc
import math
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path
from typing import Final

import anyio

from asynccas.digest import Digest
from asynccas.index.recency import TouchedThisInterval, recency_window
from asynccas.redis_provider import Client, ConnectionTurns, RedisProvider
from asynccas.sqlite_database import SqliteDatabase


class ActionCacheStore(abc.ABC):
    async def start(self) -> None:
        """Acquire resources."""

    async def stop(self) -> None:
        """Release resources."""

    @abc.abstractmethod
    async def get(self, instance_name: str, action: Digest) -> bytes | None: ...

    @abc.abstractmethod
    async def put(self, instance_name: str, action: Digest, result: bytes) -> None: ...

    @abc.abstractmethod
    async def delete(self, instance_name: str, action: Digest) -> None: ...

    async def stored_bytes(self) -> int:
        """About how many bytes the stored results take: they count toward ``--max-size``."""
        return 0

    async def shrink_to(self, target_bytes: int) -> None:
        """Drop least recently used results until ``stored_bytes`` is about ``target_bytes``."""


class MemoryActionCache(ActionCacheStore):
    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, Digest], bytes] = OrderedDict()

    async def get(self, instance_name: str, action: Digest) -> bytes | None:
        key = (instance_name, action)
        result = self._entries.get(key)
        if result is not None:
            self._entries.move_to_end(key)
        return result

    async def put(self, instance_name: str, action: Digest, result: bytes) -> None:
        self._entries[(instance_name, action)] = result
        self._entries.move_to_end((instance_name, action))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, instance_name: str, action: Digest) -> None:
        self._entries.pop((instance_name, action), None)


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS action_results (
    instance_name TEXT NOT NULL,
    action_key TEXT NOT NULL,          -- Digest.key of the Action
    result BLOB NOT NULL,              -- encoded ActionResult
    accessed_at REAL NOT NULL,
    PRIMARY KEY (instance_name, action_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS action_results_by_access ON action_results (accessed_at);
"""


class SqliteActionCache(ActionCacheStore):
    """Persistent, shareable by several processes (WAL), trimmed to ``max_entries`` on write."""

    def __init__(
        self, path: str | Path, max_entries: int = 1_000_000, *, touch_interval: float = 60.0
    ) -> None:
        self.max_entries = max_entries
        self.touch_interval = touch_interval
        self._db = SqliteDatabase(path, _SCHEMA)
        self._writes_since_trim = 0
        self._touched = TouchedThisInterval()

    async def start(self) -> None:
        await self._db.open()

    async def stop(self) -> None:
        await self._db.close()

    async def get(self, instance_name: str, action: Digest) -> bytes | None:
        args = (instance_name, action.key)
        # A read connection: lookups run beside each other and beside writes.
        row = await self._db.read(
            lambda conn: conn.execute(
                "SELECT result FROM action_results WHERE instance_name = ? AND action_key = ?",
                args,
            ).fetchone()
        )
        if row is None:
            return None
        # Recency to the touch window, as for blobs: a hot entry is not rewritten on every hit.
        window = recency_window(time.time(), self.touch_interval)
        name = f"{instance_name}\n{action.key}"
        if self._touched.untouched(window, [name]) != []:
            await self._db.run(
                lambda conn: conn.execute(
                    "UPDATE action_results SET accessed_at = ?"
                    " WHERE instance_name = ? AND action_key = ? AND accessed_at < ?",
                    (window, *args, window),
                )
            )
            self._touched.add(window, [name])
        return bytes(row[0])

    async def put(self, instance_name: str, action: Digest, result: bytes) -> None:
        row = (instance_name, action.key, result, time.time())
        await self._db.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO action_results VALUES (?, ?, ?, ?)", row
            )
        )
        self._writes_since_trim += 1
        if self._writes_since_trim >= 1000:
            self._writes_since_trim = 0
            await self._db.write(self._trim_sync)

    def _trim_sync(self, conn: sqlite3.Connection) -> None:
        (count,) = conn.execute("SELECT count(*) FROM action_results").fetchone()
        if count > self.max_entries:
            _drop_least_recent(conn, count - self.max_entries)

    async def stored_bytes(self) -> int:
        """The pages in use: a constant-time answer, unlike summing every result."""

        def pages_in_use(conn: sqlite3.Connection) -> int:
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            (free,) = conn.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            return int((pages - free) * page_size)

        return await self._db.read(pages_in_use)

    async def shrink_to(self, target_bytes: int) -> None:
        def shrink(conn: sqlite3.Connection) -> None:
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            (free,) = conn.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            in_use = (pages - free) * page_size
            if in_use <= target_bytes:
                return
            (count,) = conn.execute("SELECT count(*) FROM action_results").fetchone()
            # Results are of similar size: drop the oldest share that brings the pages down.
            _drop_least_recent(conn, math.ceil(count * (1 - target_bytes / in_use)))

        await self._db.write(shrink)

    async def delete(self, instance_name: str, action: Digest) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "DELETE FROM action_results WHERE instance_name = ? AND action_key = ?",
                (instance_name, action.key),
            )
        )


def _drop_least_recent(conn: sqlite3.Connection, entries: int) -> None:
    conn.execute(
        "DELETE FROM action_results WHERE (instance_name, action_key) IN"
        " (SELECT instance_name, action_key FROM action_results ORDER BY accessed_at LIMIT ?)",
        (entries,),
    )


class RedisActionCache(ActionCacheStore):
    """Action results in Redis (plain, TLS, Sentinel or Cluster, as the index), so that every
    frontend sharing it serves every other's results.

    One string per (instance, action), written with an expiry and given it again when read:
    a result unused for ``ttl`` seconds goes, one in use stays; Redis's own ``maxmemory``
    policy can bound it further. Each call is one command, one round trip. Results are not
    counted toward ``--max-size``, which bounds the blobs a storage holds: their bound is
    ``ttl`` (and Redis's memory limit)."""

    def __init__(
        self, provider: RedisProvider, *, prefix: str = "asynccas", ttl: float = 7 * 86400
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl}")
        self.provider = provider
        self.prefix = prefix
        self.ttl = int(max(1, ttl))
        self._client: Client | None = None
        self._turns = ConnectionTurns(provider)

    def key(self, instance_name: str, action: Digest) -> str:
        # The instance's length first: no instance name can make another's key.
        return f"{self.prefix}:ac:{len(instance_name)}:{instance_name}:{action.key}"

    async def start(self) -> None:
        self._client = self.provider.client()

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await self.provider.close(client)

    def _connected(self) -> Client:
        assert self._client is not None, "start() the action cache first"
        return self._client

    async def get(self, instance_name: str, action: Digest) -> bytes | None:
        client = self._connected()
        async with self._turns.take("read an action result"):
            data = await client.getex(self.key(instance_name, action), ex=self.ttl)
        assert data is None or isinstance(data, bytes)  # the provider does not decode replies
        return data

    async def put(self, instance_name: str, action: Digest, result: bytes) -> None:
        client = self._connected()
        async with self._turns.take("store an action result"):
            await client.set(self.key(instance_name, action), result, ex=self.ttl)

    async def delete(self, instance_name: str, action: Digest) -> None:
        client = self._connected()
        async with self._turns.take("delete an action result"):
            await client.delete(self.key(instance_name, action))
