"""Keeping timing-dependent tests off the edges of recency windows."""

from __future__ import annotations

import time

import anyio


async def clear_of_window_edge(interval: float = 3600.0, margin: float = 15.0) -> None:
    """Return at once, unless the current window of ``interval`` seconds (the indexes'
    touch_interval; whole hours in tests) ends within ``margin`` seconds: then wait for the
    next one. A test that checks "refreshed once per window" and straddles an edge sees its
    window end under it (one did, in CI at 07:00 UTC)."""
    into = time.time() % interval
    if into > interval - margin:
        await anyio.sleep(interval - into + 0.1)
