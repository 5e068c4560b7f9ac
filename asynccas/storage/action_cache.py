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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from asynccas.digest import Digest
from asynccas.index.recency import TouchedThisInterval, recency_window
from asynccas.redis_provider import RedisClientOwner, RedisProvider
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


_LOOP_WRITE_LIMIT: Final = 64 * 1024
"""Action results up to this size are written on the event loop (``write_on_loop``); most
name a few outputs in a few hundred bytes."""
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
        # One row by key: looked up on the event loop (see ``SqliteDatabase.lookup``).
        row = await self._db.lookup(
            lambda conn: conn.execute(
                "SELECT result FROM action_results WHERE instance_name = ? AND action_key = ?",
                args,
            ).fetchone()
        )
        if row is None:
            return None
        # Recency to the touch window, as for blobs: a hot entry is not rewritten on every hit.
        window = recency_window(time.time(), self.touch_interval)
        name = _name(instance_name, action)
        if self._touched.untouched(window, [name]) != []:
            await self._db.write_on_loop(
                lambda conn: conn.execute(
                    "UPDATE action_results SET accessed_at = ?"
                    " WHERE instance_name = ? AND action_key = ? AND accessed_at < ?",
                    (window, *args, window),
                )
            )
            self._touched.add(window, [name])
        return bytes(row[0])

    async def put(self, instance_name: str, action: Digest, result: bytes) -> None:
        now = time.time()
        row = (instance_name, action.key, result, now)
        write = self._db.write_on_loop if len(result) <= _LOOP_WRITE_LIMIT else self._db.write
        await write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO action_results VALUES (?, ?, ?, ?)", row
            )
        )
        # Written with the present time: its first hits in this window need not touch it.
        self._touched.add(recency_window(now, self.touch_interval), [_name(instance_name, action)])
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


def _name(instance_name: str, action: Digest) -> str:
    """An entry's name in ``TouchedThisInterval``."""
    return f"{instance_name}\n{action.key}"


def _drop_least_recent(conn: sqlite3.Connection, entries: int) -> None:
    conn.execute(
        "DELETE FROM action_results WHERE (instance_name, action_key) IN"
        " (SELECT instance_name, action_key FROM action_results ORDER BY accessed_at LIMIT ?)",
        (entries,),
    )


# Each script touches one bucket's keys only, which share its hash tag (one Cluster slot).
# KEYS: the entry, the bucket's LRU zset, its sizes hash, its byte counter.
_AC_PUT: Final = """
local old = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
local size = string.len(ARGV[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
redis.call('INCRBY', KEYS[4], size - old)
return size
"""
_AC_GET: Final = """
local value
if tonumber(ARGV[2]) > 0 then
  value = redis.call('GETEX', KEYS[1], 'EX', ARGV[2])
else
  value = redis.call('GET', KEYS[1])
end
if value then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[1], KEYS[1])
  return value
end
local old = redis.call('HGET', KEYS[3], KEYS[1])
if old then
  redis.call('HDEL', KEYS[3], KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('DECRBY', KEYS[4], old)
end
return false
"""
_AC_DELETE: Final = """
local old = redis.call('HGET', KEYS[3], KEYS[1])
redis.call('DEL', KEYS[1])
if old then
  redis.call('HDEL', KEYS[3], KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('DECRBY', KEYS[4], old)
end
return 0
"""
# KEYS: the bucket's LRU zset, sizes hash, byte counter. Entries unused since ARGV[1] whose
# key expired are taken off the count (at most ARGV[2] per call); returns the count.
_AC_MEASURE: Final = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, entry in ipairs(stale) do
  if redis.call('EXISTS', entry) == 0 then
    local old = redis.call('HGET', KEYS[2], entry)
    redis.call('HDEL', KEYS[2], entry)
    redis.call('ZREM', KEYS[1], entry)
    if old then redis.call('DECRBY', KEYS[3], old) end
  end
end
return tonumber(redis.call('GET', KEYS[3]) or '0')
"""
# KEYS: the bucket's LRU zset, sizes hash. Its ARGV[1] least recently used entries, as
# (entry, score, size) triples in one flat list.
_AC_OLDEST: Final = """
local oldest = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local found = {}
for i = 1, #oldest, 2 do
  found[#found + 1] = oldest[i]
  found[#found + 1] = oldest[i + 1]
  found[#found + 1] = redis.call('HGET', KEYS[2], oldest[i]) or '0'
end
return found
"""
# KEYS: the bucket's LRU zset, sizes hash, byte counter, then the entries to drop. An entry
# used since it was chosen (its score now above ARGV[1]) stays; returns the bytes freed.
_AC_DROP: Final = """
local freed = 0
for i = 4, #KEYS do
  local score = redis.call('ZSCORE', KEYS[1], KEYS[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    local old = tonumber(redis.call('HGET', KEYS[2], KEYS[i]) or '0')
    redis.call('DEL', KEYS[i])
    redis.call('HDEL', KEYS[2], KEYS[i])
    redis.call('ZREM', KEYS[1], KEYS[i])
    freed = freed + old
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
return freed
"""
_DROP_BATCH: Final = 256
_MEASURE_BATCH: Final = 1000


class RedisActionCache(RedisClientOwner, ActionCacheStore):
    """Action results in Redis (plain, TLS, Sentinel or Cluster, as the index), so that every
    frontend sharing it serves every other's results.

    Bounded two ways, as the user sets: each result expires ``ttl`` seconds after its last
    use (None: never), and the results count toward the server's ``--max-size`` like the
    SQLite cache's (the eviction policy drops the least recently used ones beyond their
    share). For that, results fall into buckets, each under one hash tag (one Cluster slot):
    an LRU sorted set, a hash of sizes and a byte counter beside the entries, all updated by
    one script per call: a read or a write is one round trip, as a bare GET or SET would be.
    Expired entries leave the count when the eviction policy measures it.
    """

    def __init__(
        self,
        provider: RedisProvider,
        *,
        prefix: str = "asynccas",
        ttl: float | None = 7 * 86400,
        buckets: int | None = None,
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be positive (or None: no expiry), not {ttl}")
        super().__init__(provider)
        self.prefix = prefix
        self.ttl = int(max(1, ttl)) if ttl is not None else 0
        # One bucket on one server; a cluster's are spread over its masters.
        self.buckets = buckets or (16 if provider.is_cluster else 1)

    def _tag(self, bucket: int) -> str:
        return f"{{{self.prefix}:ac:{bucket}}}"

    def _bucket_keys(self, bucket: int) -> list[str | bytes]:
        tag = self._tag(bucket)
        return [f"{tag}:lru", f"{tag}:sizes", f"{tag}:bytes"]

    def key(self, instance_name: str, action: Digest) -> str:
        bucket = int(action.hash[:8], 16) % self.buckets
        # The instance's length first: no instance name can make another's key.
        return f"{self._tag(bucket)}:r:{len(instance_name)}:{instance_name}:{action.key}"

    def _keys(self, instance_name: str, action: Digest) -> list[str | bytes]:
        bucket = int(action.hash[:8], 16) % self.buckets
        return [self.key(instance_name, action), *self._bucket_keys(bucket)]

    async def _run(self, action: str, script: str, keys: Sequence[str | bytes], *args: Any) -> Any:
        client = self._connected()
        async with self._turns.take(action):
            return await client.eval(script, len(keys), *keys, *args)

    async def get(self, instance_name: str, action: Digest) -> bytes | None:
        data = await self._run(
            "read an action result", _AC_GET, self._keys(instance_name, action),
            time.time(), self.ttl,
        )  # fmt: skip
        assert data is None or isinstance(data, bytes)  # the provider does not decode replies
        return data

    async def put(self, instance_name: str, action: Digest, result: bytes) -> None:
        await self._run(
            "store an action result", _AC_PUT, self._keys(instance_name, action),
            result, time.time(), self.ttl,
        )  # fmt: skip

    async def delete(self, instance_name: str, action: Digest) -> None:
        await self._run("delete an action result", _AC_DELETE, self._keys(instance_name, action))

    async def stored_bytes(self) -> int:
        # Entries unused for a ttl have expired (or will have by the time this ends).
        unused_since = time.time() - self.ttl if self.ttl else "-inf"
        total = 0
        for bucket in range(self.buckets):
            keys = self._bucket_keys(bucket)
            args = (unused_since, _MEASURE_BATCH)
            total += int(await self._run("measure the action results", _AC_MEASURE, keys, *args))
        return total

    async def shrink_to(self, target_bytes: int) -> None:
        """Drop the least recently used results, across every bucket, until ``target_bytes``
        remain: each round reads every bucket's ``_DROP_BATCH`` oldest entries and drops, in
        one call per bucket, the globally oldest of them that are known to be older than any
        entry not read (at or before the earliest last score of a full batch)."""
        excess = await self.stored_bytes() - target_bytes
        while excess > 0:
            oldest: list[tuple[float, int, bytes, int]] = []  # score, bucket, entry, size
            horizon = math.inf  # a bucket read to its batch's end may hold more past it
            for bucket in range(self.buckets):
                lru_and_sizes = self._bucket_keys(bucket)[:2]
                finding = "find the least recent action results"
                found = await self._run(finding, _AC_OLDEST, lru_and_sizes, _DROP_BATCH)
                triples = [found[i : i + 3] for i in range(0, len(found), 3)]
                oldest += [
                    (float(score), bucket, entry, int(size)) for entry, score, size in triples
                ]
                if len(triples) == _DROP_BATCH:
                    horizon = min(horizon, float(triples[-1][1]))
            if not oldest:
                return
            oldest.sort()
            chosen: dict[int, list[bytes]] = {}
            cutoff, planned = -math.inf, 0
            for score, bucket, entry, size in oldest:
                if score > horizon or planned >= excess:
                    break
                chosen.setdefault(bucket, []).append(entry)
                cutoff, planned = score, planned + size
            freed = 0
            for bucket, entries in chosen.items():
                keys = [*self._bucket_keys(bucket), *entries]
                dropping = "drop least recent action results"
                freed += int(await self._run(dropping, _AC_DROP, keys, cutoff))
            if freed <= 0:
                return
            excess -= freed
