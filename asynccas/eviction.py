"""Keeps an index under a byte budget: past the high watermark, evict down to the low one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from asynccas.index.base import StorageIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvictionPolicy:
    max_bytes: int
    low_watermark: float = 0.9  # fraction of max_bytes to evict down to
    interval: float = 5.0

    async def enforce_once(self, index: StorageIndex) -> int:
        total = await index.get_total_size()
        if total <= self.max_bytes:
            return 0
        target = int(self.max_bytes * self.low_watermark)
        freed = await index.delete_n_bytes(total - target)
        logger.info("evicted %d bytes (index held %d, budget %d)", freed, total, self.max_bytes)
        return freed

    async def run(self, index: StorageIndex) -> None:
        while True:
            try:
                await self.enforce_once(index)
            except Exception:
                logger.exception("eviction pass failed; retrying in %.0fs", self.interval)
            await anyio.sleep(self.interval)
