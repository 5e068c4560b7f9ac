"""The byte budget (--max-size): enforced between the periodic passes too, with the action
cache counted, on a real SQLite index over a disk store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from asynccas.digest import Digest
from asynccas.eviction import EvictionPolicy
from asynccas.index.sqlite import SqliteIndex
from asynccas.storage.action_cache import SqliteActionCache
from asynccas.storage.disk import DiskStorage
from asynccas.testing import blob

pytestmark = pytest.mark.anyio

BLOB = 100_000


async def store(index: SqliteIndex, digest: Digest, data: bytes) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    await index.commit_write(digest, chunks())


def open_index(root: Path) -> SqliteIndex:
    return SqliteIndex(DiskStorage(root / "data", fsync=False), root / "index.sqlite")


async def test_uploads_past_the_budget_start_eviction_at_once(tmp_path: Path) -> None:
    """Checked only every 5 s, usage overshot without bound: here the periodic pass never
    comes (an hour), and 40 uploads of 100 KB against a 1 MB budget must still not pile up."""
    policy = EvictionPolicy(1_000_000, interval=3600)
    async with open_index(tmp_path) as index, anyio.create_task_group() as tasks:
        tasks.start_soon(policy.run, index)
        await anyio.sleep(0.1)  # the first pass measures the room
        peak = 0
        for seed in range(40):
            await store(index, *blob(BLOB, seed))
            peak = max(peak, await index.get_total_size())
        tasks.cancel_scope.cancel()
    # The budget, its slack (5%) and the upload that crossed it, never 4 MB.
    assert peak <= 1_000_000 + 50_000 + BLOB, peak


async def test_action_results_count_toward_the_budget(tmp_path: Path) -> None:
    policy = EvictionPolicy(1_000_000, interval=3600)
    action_cache = SqliteActionCache(tmp_path / "ac.sqlite")
    await action_cache.start()
    async with open_index(tmp_path) as index:
        for seed in range(8):
            await store(index, *blob(BLOB, seed))
        assert await policy.enforce_once(index, action_cache) == 0  # 800 KB fit
        for number in range(100):  # a few hundred KB of action results
            await action_cache.put("", Digest.of(b"%d" % number), bytes(2000))
        results = await action_cache.stored_bytes()
        assert 200_000 <= results < 1_000_000
        freed = await policy.enforce_once(index, action_cache)
        assert freed > 0
        assert await index.get_total_size() + results <= 1_000_000
    await action_cache.stop()


async def test_action_results_never_crowd_out_every_blob(tmp_path: Path) -> None:
    """Counted but not evicted, action results beyond the budget would have every blob
    evicted on every pass: past half the budget their least recently used entries go."""
    policy = EvictionPolicy(1_000_000, interval=3600)
    action_cache = SqliteActionCache(tmp_path / "ac.sqlite")
    await action_cache.start()
    try:
        async with open_index(tmp_path) as index:
            for seed in range(4):
                await store(index, *blob(BLOB, seed))
            for number in range(600):  # well over the whole budget
                await action_cache.put("", Digest.of(b"%d" % number), bytes(2000))
            assert await action_cache.stored_bytes() > 1_000_000
            await policy.enforce_once(index, action_cache)
            assert await action_cache.stored_bytes() <= 500_000
            assert await index.get_total_size() == 4 * BLOB, "blobs were evicted for results"
            newest = Digest.of(b"599")
            assert await action_cache.get("", newest) is not None, "the newest result went"
    finally:
        await action_cache.stop()


async def test_a_worker_that_does_not_evict_holds_its_uploads_until_the_evicting_one_made_room(
    tmp_path: Path,
) -> None:
    """With --workers only the first process evicts. The others' uploads used not to charge the
    budget at all, so they could fill the disk between the first one's passes. Now they measure
    the shared index, and far over the budget their uploads wait for the room to come back."""
    evicting = EvictionPolicy(1_000_000, interval=3600)
    measuring = EvictionPolicy(1_000_000, interval=0.05, evicts=False)
    async with (
        open_index(tmp_path) as first,
        open_index(tmp_path) as second,  # a second process on the same store
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(measuring.run, second)
        await anyio.sleep(0.1)  # the first measurement
        for seed in range(11):  # 1.1 MB through the worker that does not evict
            await store(second, *blob(BLOB, seed))
        assert await second.get_total_size() == 11 * BLOB, "a measuring pass evicted"
        await anyio.sleep(0.2)  # measured: 100 KB over, past the slack (50 KB)
        held = anyio.Event()

        async def upload_one_more() -> None:
            await store(second, *blob(BLOB, 99))
            held.set()

        tasks.start_soon(upload_one_more)
        with anyio.move_on_after(0.5):
            await held.wait()
        assert not held.is_set(), "an upload far over the budget did not wait"
        assert await evicting.enforce_once(first) > 0  # the evicting process makes room
        with anyio.fail_after(5):
            await held.wait()
        tasks.cancel_scope.cancel()
