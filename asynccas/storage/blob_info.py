"""What a per-instance CAS knows about blobs besides their bytes: Docker distribution's Redis
layer-info cache, brought to REAPI instances.

Two independent caches, as there: **membership**, one set per instance of the digests that
instance uploaded (asked before anything else, as an access check), and **metadata**, one
record per digest (size, where it is stored, when), shared by all instances. Code copes with a
digest in one, both or neither: neither cache ever grants what the store cannot back, because
the per-instance storage (``storage/per_instance.py``) checks membership *and* the store.

``RedisBlobInfo`` keeps them in Redis (plain, TLS, Sentinel, Cluster): a set per instance (one
key, so a check of any number of digests is one SMISMEMBER, one round trip, on one Cluster
slot) and a hash per digest holding its metadata and, as ``i:<instance>`` fields, the instances
that hold it, which is what lets ``forget`` (eviction) remove a digest from every instance's
set. Batches are pipelines: one round trip (per Cluster node, in parallel). ``SqliteBlobInfo``
keeps both in a SQLite file (one machine, kept across restarts: the embedded default's), and
``MemoryBlobInfo`` in a bounded map for a single process.
"""

from __future__ import annotations

import abc
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from asynccas.digest import Digest
from asynccas.redis_provider import RedisClientOwner, RedisProvider
from asynccas.sqlite_database import SqliteDatabase


@dataclass(frozen=True, slots=True)
class BlobMeta:
    size: int
    location: str
    """Which store holds the blob (its description, e.g. ``s3://bucket/prefix``)."""
    stored_at: float
    """Unix time the blob was stored."""


class BlobInfoCache(abc.ABC):
    async def start(self) -> None:
        """Acquire resources (connections)."""

    async def stop(self) -> None:
        """Release what ``start`` acquired."""

    @abc.abstractmethod
    async def contains(self, instance: str, digests: Sequence[Digest]) -> list[bool]:
        """For each digest, whether ``instance`` holds it (uploaded it, and it was not
        forgotten since)."""

    @abc.abstractmethod
    async def add(self, instance: str, digests: Sequence[Digest]) -> None:
        """Record that ``instance`` holds these digests."""

    @abc.abstractmethod
    async def meta(self, digests: Sequence[Digest]) -> list[BlobMeta | None]:
        """Each digest's metadata, or None where none is known."""

    @abc.abstractmethod
    async def set_meta(self, entries: Sequence[tuple[Digest, BlobMeta]]) -> None: ...

    @abc.abstractmethod
    async def forget(self, digests: Sequence[Digest]) -> None:
        """Remove the digests from every instance and drop their metadata (eviction)."""


class MemoryBlobInfo(BlobInfoCache):
    """Both caches in one process's memory, the least recently used digests dropped beyond
    ``max_entries``. Forgetting only ever costs an upload again: a digest no instance is
    known to hold is missing to all of them."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, not {max_entries}")
        self.max_entries = max_entries
        self._holders: OrderedDict[Digest, set[str]] = OrderedDict()
        self._meta: OrderedDict[Digest, BlobMeta] = OrderedDict()

    async def contains(self, instance: str, digests: Sequence[Digest]) -> list[bool]:
        holders = self._holders
        return [instance in holders.get(digest, ()) for digest in digests]

    async def add(self, instance: str, digests: Sequence[Digest]) -> None:
        holders = self._holders
        for digest in digests:
            held = holders.get(digest)
            if held is None:
                holders[digest] = {instance}
            else:
                held.add(instance)
                holders.move_to_end(digest)
        while len(holders) > self.max_entries:
            holders.popitem(last=False)

    async def meta(self, digests: Sequence[Digest]) -> list[BlobMeta | None]:
        return [self._meta.get(digest) for digest in digests]

    async def set_meta(self, entries: Sequence[tuple[Digest, BlobMeta]]) -> None:
        for digest, meta in entries:
            self._meta[digest] = meta
            self._meta.move_to_end(digest)
        while len(self._meta) > self.max_entries:
            self._meta.popitem(last=False)

    async def forget(self, digests: Sequence[Digest]) -> None:
        for digest in digests:
            self._holders.pop(digest, None)
            self._meta.pop(digest, None)


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS members (
    instance_name TEXT NOT NULL,
    blob_key TEXT NOT NULL,            -- Digest.key
    PRIMARY KEY (blob_key, instance_name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blob_meta (
    blob_key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    location TEXT NOT NULL,
    stored_at REAL NOT NULL
) WITHOUT ROWID;
"""
_SQLITE_BATCH: Final = 500  # bound parameters per statement stay well under SQLite's limit


class SqliteBlobInfo(BlobInfoCache):
    """Both caches in one SQLite file: membership keyed by digest first, so that ``forget``
    finds every instance holding a blob in one range. A check of N digests is one read
    statement per 500, in one thread hop."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self._db = SqliteDatabase(path, _SCHEMA, fsync=fsync)

    async def start(self) -> None:
        await self._db.open()

    async def stop(self) -> None:
        await self._db.close()

    async def contains(self, instance: str, digests: Sequence[Digest]) -> list[bool]:
        keys = [d.key for d in digests]

        def held(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(keys), _SQLITE_BATCH):
                part = keys[start : start + _SQLITE_BATCH]
                marks = ",".join("?" * len(part))
                rows = conn.execute(
                    "SELECT blob_key FROM members WHERE instance_name = ?"
                    f" AND blob_key IN ({marks})",
                    (instance, *part),
                )
                found.update(key for (key,) in rows)
            return found

        found = await self._db.read(held) if keys else set()
        return [key in found for key in keys]

    async def add(self, instance: str, digests: Sequence[Digest]) -> None:
        rows = [(instance, d.key) for d in digests]
        if rows:
            await self._db.write(
                lambda conn: conn.executemany("INSERT OR IGNORE INTO members VALUES (?, ?)", rows)
            )

    async def meta(self, digests: Sequence[Digest]) -> list[BlobMeta | None]:
        keys = [d.key for d in digests]

        def known(conn: sqlite3.Connection) -> dict[str, BlobMeta]:
            found: dict[str, BlobMeta] = {}
            for start in range(0, len(keys), _SQLITE_BATCH):
                part = keys[start : start + _SQLITE_BATCH]
                marks = ",".join("?" * len(part))
                rows = conn.execute(
                    f"SELECT blob_key, size, location, stored_at FROM blob_meta"
                    f" WHERE blob_key IN ({marks})",
                    part,
                )
                found.update(
                    (key, BlobMeta(size, location, at)) for key, size, location, at in rows
                )
            return found

        found = await self._db.read(known) if keys else {}
        return [found.get(key) for key in keys]

    async def set_meta(self, entries: Sequence[tuple[Digest, BlobMeta]]) -> None:
        rows = [(d.key, m.size, m.location, m.stored_at) for d, m in entries]
        if rows:
            await self._db.write(
                lambda conn: conn.executemany(
                    "INSERT OR REPLACE INTO blob_meta VALUES (?, ?, ?, ?)", rows
                )
            )

    async def forget(self, digests: Sequence[Digest]) -> None:
        rows = [(d.key,) for d in digests]

        def drop(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM members WHERE blob_key = ?", rows)
            conn.executemany("DELETE FROM blob_meta WHERE blob_key = ?", rows)

        if rows:
            await self._db.write(drop)


class RedisBlobInfo(RedisClientOwner, BlobInfoCache):
    """Both caches in Redis; see the module's docstring for the layout."""

    def __init__(self, provider: RedisProvider, *, prefix: str = "asynccas") -> None:
        super().__init__(provider)
        self.prefix = prefix

    def members_key(self, instance: str) -> str:
        # The instance's length first: no instance name can make another's key.
        return f"{self.prefix}:members:{len(instance)}:{instance}"

    def info_key(self, digest: Digest) -> bytes:
        return self.prefix.encode() + b":blob:" + digest.member

    async def contains(self, instance: str, digests: Sequence[Digest]) -> list[bool]:
        if not digests:
            return []
        client = self._connected()
        async with self._turns.take("check instance membership"):
            found = await client.smismember(self.members_key(instance), [d.member for d in digests])
        return [bool(f) for f in found]

    async def add(self, instance: str, digests: Sequence[Digest]) -> None:
        if not digests:
            return
        field = f"i:{instance}"
        async with self._turns.take("record instance membership"):
            pipe = self._connected().pipeline(transaction=False)
            # The digest's record names the instance first: a failure between the two leaves
            # at worst a name that forget() removes for nothing, never a member it misses.
            for digest in digests:
                pipe.hset(self.info_key(digest), field, 1)
            pipe.sadd(self.members_key(instance), *[d.member for d in digests])
            await pipe.execute()

    async def meta(self, digests: Sequence[Digest]) -> list[BlobMeta | None]:
        if not digests:
            return []
        async with self._turns.take("read blob metadata"):
            pipe = self._connected().pipeline(transaction=False)
            for digest in digests:
                pipe.hmget(self.info_key(digest), ["size", "location", "stored_at"])
            replies = await pipe.execute()
        return [_meta(reply) for reply in replies]

    async def set_meta(self, entries: Sequence[tuple[Digest, BlobMeta]]) -> None:
        if not entries:
            return
        async with self._turns.take("record blob metadata"):
            pipe = self._connected().pipeline(transaction=False)
            for digest, meta in entries:
                mapping = {
                    "size": meta.size,
                    "location": meta.location,
                    "stored_at": meta.stored_at,
                }
                pipe.hset(self.info_key(digest), mapping=mapping)  # type: ignore[arg-type]
            await pipe.execute()

    async def forget(self, digests: Sequence[Digest]) -> None:
        if not digests:
            return
        async with self._turns.take("forget evicted blobs"):
            pipe = self._connected().pipeline(transaction=False)
            for digest in digests:
                pipe.hkeys(self.info_key(digest))
            fields = await pipe.execute()
            pipe = self._connected().pipeline(transaction=False)
            for digest, names in zip(digests, fields, strict=True):
                for name in names:
                    if name.startswith(b"i:"):
                        instance = name[2:].decode()  # instance names are UTF-8 (REAPI)
                        pipe.srem(self.members_key(instance), digest.member)
                pipe.delete(self.info_key(digest))
            await pipe.execute()


def _meta(reply: list[Any]) -> BlobMeta | None:
    size, location, stored_at = reply
    if size is None or location is None or stored_at is None:
        return None
    return BlobMeta(int(size), location.decode(), float(stored_at))
