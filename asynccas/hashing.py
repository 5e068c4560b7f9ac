"""A hasher that digests large chunks in a worker thread, overlapping with the caller's I/O.

hashlib releases the GIL for large inputs, so while one chunk is hashed in a thread the event
loop can receive the next: for a 256 MiB ByteStream read that is the difference between
hashing and receiving taking turns on one core and running side by side on two. Chunks are
hashed strictly in order: each ``update`` first waits for the one before.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from asynccas.threads import in_thread

if TYPE_CHECKING:
    from hashlib import _Hash

# Below this, a thread hop costs more than hashing in place.
THREAD_THRESHOLD: Final = 256 * 1024


async def hash_parts(hasher: _Hash, parts: list[bytes]) -> None:
    """Feed ``parts`` to ``hasher``, in a worker thread when they are large enough to pay
    for the hop."""
    if sum(map(len, parts)) >= THREAD_THRESHOLD:
        await in_thread(_update_all, hasher, parts)
    else:
        _update_all(hasher, parts)


def _update_all(hasher: _Hash, parts: list[bytes]) -> None:
    for part in parts:
        hasher.update(part)


class OverlappedHasher:
    def __init__(self, hasher: _Hash) -> None:
        self._hasher = hasher
        self._pending: asyncio.Future[None] | None = None

    async def update(self, data: bytes) -> None:
        """Start hashing ``data``; returns once the previous chunk is hashed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        if len(data) < THREAD_THRESHOLD:
            self._hasher.update(data)
        else:
            self._pending = asyncio.get_running_loop().run_in_executor(
                None, self._hasher.update, data
            )

    async def hexdigest(self) -> str:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        return self._hasher.hexdigest()
