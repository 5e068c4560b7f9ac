"""Thread hops for blocking work (files, SQLite, hashing) off the event loop.

A server handles thousands of small requests a second, each paying one or more hops, so the
hop itself must be cheap: a submit to a thread pool and a wrapped future cost about 60 us of
CPU here, against about 90 us through ``anyio.to_thread.run_sync`` (capacity limiter, cancel
scope and context lookups on every call). Like anyio's, a hop is not abandoned when its
caller is cancelled: the cancellation waits until the function has returned, so cleanup that
follows never races the thread (a temp file unlinked while it is still being written).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, ParamSpec, TypeVar

import anyio

P = ParamSpec("P")
T = TypeVar("T")

MAX_THREADS: Final = 32
"""Blocking calls in flight at once; more wait their turn (anyio's default is 40)."""
_POOL: Final = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="asynccas-io")


async def in_thread(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``func(*args, **kwargs)`` in a worker thread and return its result."""
    call = functools.partial(func, *args, **kwargs) if kwargs else func
    done = _POOL.submit(call, *args) if not kwargs else _POOL.submit(call)
    try:
        return await asyncio.wrap_future(done)
    except asyncio.CancelledError:
        if not done.cancel():  # already running: let it finish before unwinding
            with anyio.CancelScope(shield=True):
                await asyncio.wait([asyncio.wrap_future(done)])
        raise
