"""BuildGrid's RedisIndex, rebuilt on redis.asyncio: existence, size and recency of blobs in Redis,
in front of any storage.

Layout: digests fall into ``buckets`` by hash. Each bucket holds its digests twice, each as
``Digest.member`` (the digest as requests carry it, with a prefix naming the function for
BLAKE3, whose hashes are as long as SHA256's): in a set, which a check asks, and in
a sorted set scored by last use (unix time), which eviction reads in LRU order. Beside them
are a byte counter, an eviction generation and an "eviction in progress" flag, all under one
hash tag ``{prefix:N}`` so a bucket lives on one Redis Cluster slot and one Lua script
updates it atomically. A single server needs one bucket; a cluster gets 16 by default, to
spread them over its masters.

Checking N digests (FindMissingBlobs) costs one round trip and at most two native commands
per bucket: SMISMEMBER for presence, ``ZADD XX GT`` for recency. Never one command per
digest; and on a single server the commands are written in a few joins of the request's own
bytes (``FindMissingBlobsWire``) rather than by redis-py's per-argument encoder, which would
dominate. Holding members twice costs Redis memory, and halves the CPU a check costs it:
ZMSCORE's replies are scores, which Redis formats as text one by one, where SMISMEMBER's
are shared integers, which hiredis also reads without making an object each.

Eviction never leaves a blob indexed but missing, without locks on the write path: a
writer reads the bucket generation before publishing its file, and its ADD script
refuses when an eviction began since (generation moved) or is running (flag set). The
writer then publishes again (``BlobWriter.publish`` is idempotent) and retries.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import datetime
from itertools import chain
from typing import Any, Final, NamedTuple

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable
from asynccas.index.base import StorageIndex
from asynccas.index.recency import TouchedThisInterval, recency_window
from asynccas.redis_provider import Client, ConnectionTurns, EncodedLane, RedisProvider
from asynccas.storage.base import BlobWriter, Storage, publish_staged
from asynccas.storage.context import RequestContext

logger = logging.getLogger(__name__)

# Scripts stay per bucket: every key they touch shares the bucket's hash tag.
_ADD: Final = """
if redis.call('EXISTS', KEYS[5]) == 1 or (redis.call('GET', KEYS[4]) or '0') ~= ARGV[1] then
  return -1
end
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[2], ARGV[i])
    added = added + tonumber(ARGV[i + 1])
  end
end
if added > 0 then redis.call('INCRBY', KEYS[3], added) end
return added
"""
_BEGIN_EVICTION: Final = """
redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[2])
local removed, freed = {}, 0
for i = 3, #ARGV, 3 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('SREM', KEYS[2], ARGV[i])
    freed = freed + tonumber(ARGV[i + 2])
    removed[#removed + 1] = ARGV[i]
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
return removed
"""
_END_EVICTION: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
_FORGET: Final = """
local freed = 0
for i = 2, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) < tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('SREM', KEYS[2], ARGV[i])
    freed = freed + tonumber(ARGV[i + 1])
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
return freed
"""
_RELEASE_LOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EVICTION_BATCH: Final = 256
_EVICTION_FLAG_TTL_MS: Final = 60_000
_PUBLISH_ATTEMPTS: Final = 40


_MEMBER_FORM: Final = "delimited-digests+presence-set"
"""What the buckets hold, recorded with their count; older asynccas wrote text members."""


class _BucketKeys(NamedTuple):
    """One bucket's keys, in the order the scripts take them (KEYS[1], KEYS[2], ...)."""

    lru: str
    """Sorted set: each entry's member and last use (the score), for eviction's LRU order."""
    present: str
    """Set of the same members: what a check asks (SMISMEMBER replies in integers, which cost
    Redis half of what ZMSCORE's scores do to write, and the client nothing to read)."""
    bytes: str
    """The sum of the entries' sizes."""
    generation: str
    """Incremented when an eviction begins."""
    evicting: str
    """Set while an eviction runs."""


class _ArgumentHeads:
    """The RESP text before each argument: the previous argument's CRLF, then ``$<length>``.

    Members of one request have a handful of lengths, so each head is a cached string and a
    command is one join of heads and the request's own members.
    """

    def __init__(self) -> None:
        self._heads: dict[int, bytes] = {}

    def before(self, arguments: list[bytes]) -> list[bytes]:
        try:
            return list(map(self._heads.__getitem__, map(len, arguments)))
        except KeyError:  # a length not seen yet (a raising look-up beats testing `None in`)
            for length in set(map(len, arguments)) - self._heads.keys():
                self._heads[length] = b"\r\n$%d\r\n" % length
            return list(map(self._heads.__getitem__, map(len, arguments)))


def _interleave(command: bytes, *columns: list[bytes]) -> list[bytes]:
    """``command`` then the columns' items, a row at a time: slice assignments, in C."""
    pieces = [command] * (len(columns) * len(columns[0]) + 1)
    for offset, column in enumerate(columns, start=1):
        pieces[offset :: len(columns)] = column
    return pieces


def _resp_arguments(*words: bytes) -> bytes:
    """Arguments in RESP, each after the CRLF that ends the one before it: a command is its
    ``*<count>``, its arguments so written, then one last CRLF."""
    return b"".join(b"\r\n$%d\r\n%s" % (len(word), word) for word in words)


_SMISMEMBER: Final = _resp_arguments(b"SMISMEMBER")
_ABSENT: Final = bytes.maketrans(b"\x00\x01", b"\x01\x00")
_ZADD: Final = _resp_arguments(b"ZADD")
_XX_GT: Final = _resp_arguments(b"XX", b"GT")


class RedisIndex(StorageIndex):
    def __init__(
        self,
        storage: Storage,
        redis: RedisProvider | str,
        *,
        prefix: str = "asynccas",
        buckets: int | None = None,
        touch_interval: float = 60.0,
    ) -> None:
        super().__init__(storage)
        self.provider = RedisProvider(redis) if isinstance(redis, str) else redis
        self._turns = ConnectionTurns(self.provider)
        if buckets is None:
            # Buckets spread a cluster's keys over its masters; a single server gains nothing
            # from them (an eviction batch spans every bucket anyway) and pays per digest.
            buckets = 16 if self.provider.is_cluster else 1
        if not 1 <= buckets <= 256:
            raise ValueError(f"buckets must be between 1 and 256, not {buckets}")
        if not prefix.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"Redis key prefix {prefix!r} must be alphanumeric, - or _")
        self.prefix = prefix
        self.buckets = buckets
        # Refreshing recency on every hit would rewrite hot blobs constantly; LRU order
        # only needs it to within this many seconds.
        self.touch_interval = touch_interval
        # Named by hash when refreshed after reads, which have Digests at hand, and by
        # delimited digest when refreshed by a check, which has those: one digest may then be
        # refreshed twice in an interval, which changes nothing.
        self._touched = TouchedThisInterval()
        self._heads = _ArgumentHeads()
        self._client: Client | None = None
        self._lane: EncodedLane | None = None
        # Bucket by the first byte of the hash; a table look-up beats parsing hex per digest.
        self._bucket_of_prefix = {f"{b:02x}": b % buckets for b in range(256)}

    # -- plumbing ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.storage.start()
        self._client = self.provider.client()
        # Every process sharing this index must bucket digests the same way and store the
        # same form of member: the first to start records its layout, and a process
        # configured otherwise refuses to run.
        layout_key, before = f"{{{self.prefix}}}:layout", f"{{{self.prefix}}}:buckets"
        layout = f"{_MEMBER_FORM} {self.buckets}"
        async with self._turns.take("connect"):
            older = await self._client.exists(before)
            await self._client.set(layout_key, layout, nx=True)
            recorded = _decode(await self._client.get(layout_key))
        form, _, buckets = recorded.partition(" ")
        problem = None
        if older:
            problem = (
                "was written by an older asynccas, which stored digests as text; delete its"
                " keys and run `asynccas reindex`"
            )
        elif form != _MEMBER_FORM:
            problem = f"stores members as {form!r}, not {_MEMBER_FORM!r}"
        elif buckets != str(self.buckets):
            problem = f"has {buckets} buckets; this process was configured with {self.buckets}"
        if problem is not None:
            await self.stop()
            raise ValueError(f"the index {self.prefix!r} at {self.provider.display_url} {problem}")

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            lane, self._lane = self._lane, None
            with anyio.CancelScope(shield=True):
                if lane is not None:
                    await lane.aclose()
                await self.provider.close(client)
        await self.storage.stop()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise BackendUnavailable("RedisIndex is not started")
        return self._client

    @property
    def lane(self) -> EncodedLane:
        """The hot path's connections (a single server only: see ``_check_encoded``)."""
        if self._lane is None:
            self._lane = self.provider.encoded_lane(self.client)
        return self._lane

    def bucket_of(self, digest: Digest) -> int:
        # From the hash itself, so every process and machine agrees on it.
        return self._bucket_of_prefix[digest[0][:2]]

    def _keys(self, bucket: int) -> _BucketKeys:
        tag = f"{{{self.prefix}:{bucket}}}"
        return _BucketKeys(
            f"{tag}:lru", f"{tag}:present", f"{tag}:bytes", f"{tag}:generation", f"{tag}:evicting"
        )

    def _group(self, digests: Iterable[Digest]) -> dict[int, list[Digest]]:
        groups: dict[int, list[Digest]] = defaultdict(list)
        bucket_of_prefix = self._bucket_of_prefix
        for digest in digests:
            groups[bucket_of_prefix[digest[0][:2]]].append(digest)  # bucket_of, inlined
        return groups

    async def _pipeline(
        self, action: str, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run (script, keys, args) calls in one round trip, without MULTI/EXEC."""
        if not calls:
            return []
        async with self._turns.take(action):
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.eval(script, len(keys), *keys, *args)
            return list(await pipe.execute())

    # -- existence ---------------------------------------------------------------------------

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        """Per bucket, SMISMEMBER for presence and ``ZADD XX GT`` for recency, in one round trip.

        The recency score is the current time rounded down to ``touch_interval``: with GT, a
        hit rewrites an entry at most once per interval. Digests this process has already
        touched in the current interval are left out of the ZADD, which in a steady stream of
        builds is usually all of them: then Redis only runs the SMISMEMBER.
        """
        unique = batch.unique()
        if unique is not None:  # repeated digests: answer once, at the first position
            distinct, first_positions = unique
            mask = bytearray(len(batch))
            for position, flag in zip(
                first_positions, await self.find_missing(ctx, distinct), strict=True
            ):
                mask[position] = flag
            return bytes(mask)
        if not len(batch):
            return b""
        members = batch.members
        window = recency_window(time.time(), self.touch_interval)
        groups: list[tuple[int, list[bytes]]]
        positions: list[list[int]] | None = None
        if self.buckets == 1:
            groups = [(0, members)]
        else:
            by_bucket: dict[int, list[int]] = defaultdict(list)
            bucket_of_prefix = self._bucket_of_prefix
            for position, hash_ in enumerate(batch.hashes):
                by_bucket[bucket_of_prefix[hash_[:2]]].append(position)
            groups = [(b, [members[i] for i in where]) for b, where in by_bucket.items()]
            positions = list(by_bucket.values())
        if self.provider.is_cluster:
            replies = await self._check_through_pipeline(groups, window)
        else:
            replies = await self._check_encoded(groups, window)
        if positions is None:
            return bytes(replies[0]).translate(_ABSENT)  # SMISMEMBER answers 1 for present
        mask = bytearray(len(batch))
        for where, flags in zip(positions, replies, strict=True):
            for position, flag in zip(where, flags, strict=True):
                mask[position] = not flag
        return bytes(mask)

    async def _check_encoded(
        self, groups: list[tuple[int, list[bytes]]], window: float
    ) -> list[list[Any]]:
        """The commands as RESP written in joins: this is the hot path of FindMissingBlobs."""
        score = _resp_arguments(repr(window).encode())
        commands: list[bytes] = []
        touching: list[bytes] = []
        presence_replies: list[int] = []  # where each SMISMEMBER's reply will be
        replies = 0
        for bucket, members in groups:
            keys = self._keys(bucket)
            present, lru = (
                _resp_arguments(keys.present.encode()),
                _resp_arguments(keys.lru.encode()),
            )
            heads = self._heads.before(members)
            commands += _interleave(
                b"*%d%s%s" % (len(members) + 2, _SMISMEMBER, present), heads, members
            )
            presence_replies.append(replies)
            replies += 1
            untouched = self._touched.untouched(window, members)
            if untouched is None:
                stale = members
            else:
                stale = [members[i] for i in untouched]
                heads = [heads[i] for i in untouched]
            if stale:
                touching += stale
                replies += 1
                commands += _interleave(
                    b"\r\n*%d%s%s%s" % (2 * len(stale) + 4, _ZADD, lru, _XX_GT),
                    [score] * len(stale), heads, stale,
                )  # fmt: skip
            commands.append(b"\r\n")
        with self.provider.errors("check blobs"):  # the lane waits for its own turns
            answers = await self.lane.send(b"".join(commands), replies)
        self._touched.add(window, touching)
        return [answers[i] for i in presence_replies]  # ZADD's count of changes is not needed

    async def _check_through_pipeline(
        self, groups: list[tuple[int, list[bytes]]], window: float
    ) -> list[list[Any]]:
        """The same commands through redis-py's cluster pipeline, which routes them by slot."""
        recency = repr(window)
        calls: list[tuple[Any, ...]] = []
        touching: list[bytes] = []
        presence_replies: list[int] = []
        for bucket, members in groups:
            keys = self._keys(bucket)
            presence_replies.append(len(calls))
            calls.append(("SMISMEMBER", keys.present, *members))
            untouched = self._touched.untouched(window, members)
            stale = members if untouched is None else [members[i] for i in untouched]
            if stale:
                touching += stale
                calls.append(
                    (
                        "ZADD",
                        keys.lru,
                        "XX",
                        "GT",
                        *chain.from_iterable((recency, m) for m in stale),
                    )
                )
        async with self._turns.take("check blobs"):
            pipe = self.client.pipeline(transaction=False)
            for call in calls:
                pipe.execute_command(*call)
            replies = list(await pipe.execute())
        self._touched.add(window, touching)
        return [replies[i] for i in presence_replies]

    async def _touch(self, digests: Iterable[Digest]) -> None:
        """Refresh recency after a read: only ``ZADD XX GT``, since the read showed the blobs
        exist, and only for entries this process has not refreshed in this interval. For hot
        blobs that is none, and then a read costs Redis nothing."""
        unique = list(dict.fromkeys(digests))
        window = recency_window(time.time(), self.touch_interval)
        # Keyed by member, as checks key it: a blob read is then not refreshed again by a check.
        members = [d.member for d in unique]
        untouched = self._touched.untouched(window, members)
        stale = unique if untouched is None else [unique[i] for i in untouched]
        if not stale:
            return
        recency = repr(window)
        async with self._turns.take("refresh recency"):
            pipe = self.client.pipeline(transaction=False)
            for bucket, group in self._group(stale).items():
                scored: Iterable[Any] = chain.from_iterable((recency, d.member) for d in group)
                pipe.execute_command("ZADD", self._keys(bucket).lru, "XX", "GT", *scored)
            await pipe.execute()
        self._touched.add(window, members if untouched is None else [members[i] for i in untouched])

    async def _forget(self, digests: Iterable[Digest], used_before: float) -> None:
        """Self-healing: de-index blobs the storage no longer has.

        Entries used since ``used_before`` belong to a concurrent upload and stay.
        """
        calls = [
            (_FORGET, self._keys(b)[:3], [used_before, *_with_sizes(members)])
            for b, members in self._group(digests).items()
        ]
        await self._pipeline("de-index lost blobs", calls)

    # -- writes ------------------------------------------------------------------------------

    async def publish_staged(self, writers: Sequence[BlobWriter]) -> None:
        pending = list(writers)
        with anyio.CancelScope(shield=True):  # a published blob must get its entry
            for attempt in range(_PUBLISH_ATTEMPTS):
                groups: dict[int, list[BlobWriter]] = defaultdict(list)
                for writer in pending:
                    groups[self.bucket_of(writer.digest)].append(writer)
                buckets = list(groups)
                generations = await self._generations(buckets)
                await publish_staged(self.storage, pending)
                now = time.time()
                calls = []
                for bucket, generation in zip(buckets, generations, strict=True):
                    args: list[Any] = [_decode(generation) or "0", now]
                    for writer in groups[bucket]:
                        args += [writer.digest.member, writer.digest.size_bytes]
                    calls.append((_ADD, self._keys(bucket), args))
                results = await self._pipeline("index new blobs", calls)
                pending = [
                    w for b, r in zip(buckets, results, strict=True) if r == -1 for w in groups[b]
                ]
                if not pending:
                    return
                # An eviction ran over these buckets meanwhile: wait for it, publish again.
                await anyio.sleep(min(0.005 * 2**attempt, 0.25))
        raise BackendUnavailable(
            f"could not index {len(pending)} blob(s) while eviction kept running; retry"
        )

    async def _generations(self, buckets: Sequence[int]) -> list[Any]:
        # GETs in a pipeline rather than one MGET: the keys live on different cluster slots.
        async with self._turns.take("read eviction generations"):
            pipe = self.client.pipeline(transaction=False)
            for bucket in buckets:
                pipe.get(self._keys(bucket).generation)
            return list(await pipe.execute())

    # -- deletion and clean-up ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> list[Digest]:
        unique = list(dict.fromkeys(digests))
        removed = await self._evict([(math.inf, d) for d in unique])
        # Blobs the index did not know are deleted from storage too.
        unindexed = [d for d in unique if d not in removed]
        gone = await self._delete_from_storage(unindexed) if unindexed else []
        return [d for d in unique if d in removed or d in gone]

    async def _evict(self, candidates: Sequence[tuple[float, Digest]]) -> set[Digest]:
        """De-index candidates not used since their given score, delete their files."""
        token = uuid.uuid4().hex
        groups: dict[int, list[tuple[float, Digest]]] = defaultdict(list)
        for score, digest in candidates:
            groups[self.bucket_of(digest)].append((score, digest))
        removed: set[Digest] = set()
        with anyio.CancelScope(shield=True):
            calls = []
            for bucket, members in groups.items():
                args: list[Any] = [token, _EVICTION_FLAG_TTL_MS]
                for score, digest in members:
                    used = "inf" if math.isinf(score) else repr(score)
                    args += [digest.member, used, digest.size_bytes]
                calls.append((_BEGIN_EVICTION, self._keys(bucket), args))
            try:
                for result in await self._pipeline("begin eviction", calls):
                    removed.update(map(Digest.from_member, result))
                if removed:
                    await self._delete_from_storage(list(removed))
            finally:
                await self._pipeline(
                    "end eviction",
                    [(_END_EVICTION, [self._keys(b).evicting], [token]) for b in groups],
                )
        return removed

    async def get_total_size(self) -> int:
        async with self._turns.take("read the total size"):
            pipe = self.client.pipeline(transaction=False)
            for bucket in range(self.buckets):
                pipe.get(self._keys(bucket).bytes)
            return sum(int(v or 0) for v in await pipe.execute())

    async def least_recent_digests(self) -> AsyncIterator[tuple[Digest, int]]:
        async for _, digest in self._in_lru_order(math.inf):
            yield digest, digest.size_bytes

    async def _in_lru_order(self, used_before: float) -> AsyncIterator[tuple[float, Digest]]:
        """Every entry last used before ``used_before``, oldest first, merged across buckets."""
        pages = [_BucketPages(self, b, used_before) for b in range(self.buckets)]
        heap: list[tuple[float, bytes, int]] = []
        for bucket, page in enumerate(pages):
            entry = await page.next()
            if entry is not None:
                heap.append((entry[0], entry[1], bucket))
        heapq.heapify(heap)
        while heap:
            score, member, bucket = heapq.heappop(heap)
            yield score, Digest.from_member(member)
            entry = await pages[bucket].next()
            if entry is not None:
                heapq.heappush(heap, (entry[0], entry[1], bucket))

    async def delete_n_bytes(
        self,
        n_bytes: int,
        dry_run: bool = False,
        protect_blobs_after: datetime | None = None,
        large_blob_threshold: int | None = None,
        large_blob_lifetime: datetime | None = None,
    ) -> int:
        protect = protect_blobs_after.timestamp() if protect_blobs_after else math.inf
        passes: list[tuple[float, int]] = []  # (used before, larger than)
        if large_blob_threshold is not None and large_blob_lifetime is not None:
            passes.append((min(protect, large_blob_lifetime.timestamp()), large_blob_threshold))
        passes.append((protect, -1))
        lock_key, token = f"{{{self.prefix}}}:eviction-lock", uuid.uuid4().hex
        if not dry_run:
            async with self._turns.take("take the eviction lock"):
                if not await self.client.set(lock_key, token, nx=True, px=300_000):
                    logger.info("another process is evicting; skipping this pass")
                    return 0
        freed = 0
        try:
            for used_before, larger_than in passes:
                batch: list[tuple[float, Digest]] = []
                batch_bytes = 0
                async for score, digest in self._in_lru_order(used_before):
                    if freed + batch_bytes >= n_bytes:
                        break
                    if digest.size_bytes <= larger_than:
                        continue
                    batch.append((score, digest))
                    batch_bytes += digest.size_bytes
                    if len(batch) >= _EVICTION_BATCH:
                        freed += batch_bytes if dry_run else _size(await self._evict(batch))
                        batch, batch_bytes = [], 0
                if batch:
                    freed += batch_bytes if dry_run else _size(await self._evict(batch))
                if freed >= n_bytes:
                    break
        finally:
            if not dry_run:
                await self._pipeline(
                    "release the eviction lock", [(_RELEASE_LOCK, [lock_key], [token])]
                )
        return freed

    # -- rebuilding --------------------------------------------------------------------------

    async def index_existing(self, blobs: Sequence[tuple[Digest, float]]) -> None:
        """Add entries for blobs already in storage (used by ``asynccas reindex``)."""
        generations = await self._generations(list(range(self.buckets)))
        calls = []
        for digest, used in blobs:  # one entry per call: each keeps its own last-use time
            bucket = self.bucket_of(digest)
            args = [_decode(generations[bucket]) or "0", used, digest.member, digest.size_bytes]
            calls.append((_ADD, self._keys(bucket), args))
        for start in range(0, len(calls), 1000):
            await self._pipeline("index existing blobs", calls[start : start + 1000])

    async def forget(self, digests: Iterable[Digest]) -> None:
        await self._forget(digests, math.inf)


class _BucketPages:
    """Reads one bucket's sorted set in score order, a page at a time."""

    def __init__(self, index: RedisIndex, bucket: int, used_before: float) -> None:
        self._index = index
        self._key = index._keys(bucket).lru
        self._max = f"({used_before!r}" if math.isfinite(used_before) else "+inf"
        self._min = "-inf"
        self._skip = 0  # entries already seen at exactly the current minimum score
        self._page: list[tuple[float, bytes]] = []
        self._done = False

    async def next(self) -> tuple[float, bytes] | None:
        if not self._page and not self._done:
            async with self._index._turns.take("list least recently used blobs"):
                rows: list[Any] = await self._index.client.zrange(
                    self._key, self._min, self._max, byscore=True,
                    offset=self._skip, num=_EVICTION_BATCH, withscores=True,
                )  # fmt: skip
            self._page = [(float(score), member) for member, score in rows]
            self._done = len(rows) < _EVICTION_BATCH
            if self._page:
                last = self._page[-1][0]
                same = sum(1 for score, _ in self._page if score == last)
                self._skip = same + (self._skip if repr(last) == self._min else 0)
                self._min = repr(last)
        return self._page.pop(0) if self._page else None


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def _with_sizes(digests: Iterable[Digest]) -> Iterator[Any]:
    """Each digest's member, then its size (which the scripts count freed bytes by)."""
    for digest in digests:
        yield digest.member
        yield digest.size_bytes


def _size(digests: Iterable[Digest]) -> int:
    return sum(d.size_bytes for d in digests)
