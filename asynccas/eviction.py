"""Keeps an index under a byte budget: past the high watermark, evict down to the low one.

A pass every ``interval`` seconds alone let usage overshoot without bound between passes (a
fast client can upload gigabytes in 5 s). So uploads also charge their size to a
``ByteBudget`` when they open: once the charges use up the room the last pass left, the next
pass starts at once, and once they exceed it by ``slack`` bytes, new uploads wait for that
pass (up to ``max_wait`` seconds, so that a pass that cannot free anything does not stop the
server). The action cache's bytes count toward the budget too.

With ``--workers``, one process evicts; the others run the policy with ``evicts=False``: their
passes only measure what the shared index holds, so their uploads charge the budget too and,
far over it, wait for a measurement showing that the evicting process made room.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

import anyio

from asynccas import metrics
from asynccas.index.base import StorageIndex
from asynccas.storage.action_cache import ActionCacheStore
from asynccas.storage.context import NO_CONTEXT, RequestContext

logger = logging.getLogger(__name__)


class ByteBudget:
    """What uploads know of the budget between eviction passes (see the module's help)."""

    def __init__(self, slack: int, max_wait: float = 30.0, *, waits_for_room: bool = False) -> None:
        """``waits_for_room``: far over the budget, wait for a pass that shows room again
        rather than for the next pass only (a process that does not evict: its passes only
        measure, and the next one may come before the evicting process's)."""
        self.slack = slack
        self.max_wait = max_wait
        self.waits_for_room = waits_for_room
        self.room: float = math.inf  # unknown until the first pass
        self._wanted = asyncio.Event()
        self._passed = asyncio.Event()

    async def charge(self, size: int, ctx: RequestContext = NO_CONTEXT) -> None:
        """Count an upload of ``size`` bytes; wait for eviction if far over budget (no longer
        than the caller's deadline allows)."""
        self.room -= size
        if self.room >= 0:
            return
        self._wanted.set()
        if self.room < -self.slack:
            # One pass, whatever it freed: if it could not make room, waiting longer would
            # only stall every upload.
            with anyio.move_on_after(ctx.bounded(self.max_wait)):
                await self._passed.wait()
                while self.waits_for_room and self.room < -self.slack:
                    await self._passed.wait()

    def pass_done(self, room: int) -> None:
        """An eviction pass left ``room`` bytes below the budget: wake the uploads waiting."""
        self.room = room
        self._wanted.clear()
        self._passed.set()
        self._passed = asyncio.Event()

    async def wanted(self) -> None:
        """Return when uploads have used up the room left by the last pass."""
        await self._wanted.wait()


@dataclass
class EvictionPolicy:
    max_bytes: int
    low_watermark: float = 0.9  # fraction of max_bytes to evict down to
    interval: float = 5.0
    # Uploads past the budget by more than this share of it wait for the eviction pass.
    slack_share: float = 0.05
    # Action results may take at most this share of the budget; beyond it their least recently
    # used entries go, so that they can never crowd every blob out.
    action_results_share: float = 0.5
    # False for a server's extra workers: the first process evicts for all of them, these
    # only measure (see the module's help).
    evicts: bool = True
    budget: ByteBudget = field(init=False)

    def __post_init__(self) -> None:
        slack = max(1, int(self.max_bytes * self.slack_share))
        self.budget = ByteBudget(slack, waits_for_room=not self.evicts)

    async def enforce_once(
        self, index: StorageIndex, action_cache: ActionCacheStore | None = None
    ) -> int:
        blobs = await index.get_total_size()
        results = 0
        if action_cache is not None:
            results = await action_cache.stored_bytes()
            allowed = int(self.max_bytes * self.action_results_share)
            if results > allowed and self.evicts:
                await action_cache.shrink_to(int(allowed * self.low_watermark))
                results = await action_cache.stored_bytes()
        total = blobs + results
        counting = metrics.active() if self.evicts else None  # the evicting process reports
        if counting is not None:
            counting.stored_bytes.set(total)
        if total <= self.max_bytes or not self.evicts:
            self.budget.pass_done(self.max_bytes - total)
            return 0
        target = int(self.max_bytes * self.low_watermark)
        freed = await index.delete_n_bytes(total - target)
        if counting is not None:
            counting.evictions.inc()
            counting.evicted_bytes.inc(freed)
            counting.stored_bytes.set(total - freed)
        logger.info(
            "evicted %d bytes (blobs %d and action results %d bytes, budget %d)",
            freed, blobs, results, self.max_bytes,
        )  # fmt: skip
        self.budget.pass_done(self.max_bytes - (total - freed))
        return freed

    async def run(self, index: StorageIndex, action_cache: ActionCacheStore | None = None) -> None:
        """Enforce the budget every ``interval`` seconds, and at once when uploads use up the
        room left; uploads charge ``index``'s budget while this runs."""
        index.budget = self.budget
        try:
            while True:
                try:
                    await self.enforce_once(index, action_cache)
                except Exception:
                    logger.exception("eviction pass failed; retrying in %.0fs", self.interval)
                    self.budget.pass_done(0)  # release the uploads waiting for it
                    await anyio.sleep(self.interval)
                    continue
                if not self.evicts:
                    # Nothing to start early: the evicting process frees the room, and a
                    # measurement each interval tells the uploads waiting here.
                    await anyio.sleep(self.interval)
                    continue
                with anyio.move_on_after(self.interval):
                    await self.budget.wanted()
        finally:
            index.budget = None
