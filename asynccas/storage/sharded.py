"""Blobs spread over several storages by rendezvous hashing (bb-storage's ShardingBlobAccess):
the layout of a frontend over storage nodes.

Each digest goes to the shard with the highest score ``weight / -ln(u)``, ``u`` a uniform hash
of the digest and the shard's name. Adding a shard moves only the keys it now wins (about
1/N of them), removing one moves only its own, and a shard's share follows its weight; weight
0 drains a shard (it is given no blob; what it held is found missing and uploaded again
elsewhere). A shard's name is its identity: renaming one moves its blobs.

A shard that is down fails only what touches it: a blob read or written there is
UNAVAILABLE, the blobs of a batch upload that go there fail one by one, while requests for
blobs on other shards go on. A FindMissingBlobs or BatchReadBlobs that names a blob on the
dead shard fails as a whole (REAPI has no "unknown" answer for one digest).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Final

import anyio

from asynccas.digest import Digest, DigestBatch
from asynccas.errors import CasError
from asynccas.storage.base import Storage
from asynccas.storage.context import RequestContext
from asynccas.storage.routing import RoutingStorage

_MASK: Final = (1 << 64) - 1


def _mix(value: int) -> int:
    """SplitMix64's finalizer: a well-spread 64-bit hash of a 64-bit value."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK
    return value ^ (value >> 31)


class ShardedStorage(RoutingStorage):
    def __init__(
        self,
        shards: Sequence[Storage],
        names: Sequence[str],
        weights: Sequence[float] | None = None,
    ) -> None:
        weights = list(weights) if weights is not None else [1.0] * len(shards)
        if not len(shards) == len(names) == len(weights):
            raise ValueError("a sharded storage needs one name and one weight per shard")
        if len(set(names)) != len(names):
            raise ValueError("shard names must differ: they decide where blobs go")
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError("shard weights cannot be negative, and one must be above 0")
        super().__init__(shards)
        self.names = list(names)
        self.weights = weights
        self._seeds = [
            (int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest()), w, position)
            for position, (n, w) in enumerate(zip(names, weights, strict=True))
            if w > 0
        ]

    def route(self, digest: Digest) -> int:
        key = int(digest.hash[:16], 16) ^ digest.size_bytes
        best, best_score = 0, -1.0
        for seed, weight, position in self._seeds:
            uniform = (_mix(key ^ seed) + 0.5) / 2**64  # in (0, 1)
            score = weight / -math.log(uniform)
            if score > best_score:
                best, best_score = position, score
        return best

    async def find_missing(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        digests = batch.digests
        by_route = self._positions(digests)
        if len(by_route) == 1:
            return await super().find_missing(ctx, batch)
        mask = bytearray(len(digests))

        async def ask(route: int, positions: list[int]) -> None:
            part = DigestBatch.of(batch.function, [digests[p] for p in positions])
            answer = await self.routes[route].find_missing(ctx, part)
            for position, missing in zip(positions, answer, strict=True):
                mask[position] = missing

        async with anyio.create_task_group() as tasks:  # the shards answer side by side
            for route, positions in by_route.items():
                tasks.start_soon(ask, route, positions)
        return bytes(mask)

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {}

        async def read(route: int, positions: list[int]) -> None:
            part = [digests[p] for p in positions]
            found.update(await self.routes[route].bulk_read(ctx, part))

        async with anyio.create_task_group() as tasks:
            for route, positions in self._positions(digests).items():
                tasks.start_soon(read, route, positions)
        return found

    async def bulk_update(
        self, ctx: RequestContext, blobs: Sequence[tuple[Digest, bytes]]
    ) -> list[CasError | None]:
        results: list[CasError | None] = [None] * len(blobs)

        async def update(route: int, positions: list[int]) -> None:
            part = [blobs[p] for p in positions]
            try:
                answers = await self.routes[route].bulk_update(ctx, part)
            except CasError as exc:  # this shard's blobs fail; the others' go on
                answers = [exc] * len(part)
            for position, answer in zip(positions, answers, strict=True):
                results[position] = answer

        async with anyio.create_task_group() as tasks:
            for route, positions in self._positions([d for d, _ in blobs]).items():
                tasks.start_soon(update, route, positions)
        return results
