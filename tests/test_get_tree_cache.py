"""GetTree answers a tree it already walked without reading its Directory blobs again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.digest import Digest
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.context import NO_CONTEXT, RequestContext
from asynccas.storage.memory import MemoryStorage

pytestmark = pytest.mark.anyio


class CountingStorage(MemoryStorage):
    """The real memory storage, counting the blobs it is asked to read."""

    reads = 0

    async def bulk_read(
        self, ctx: RequestContext, digests: Sequence[Digest]
    ) -> dict[Digest, bytes]:
        self.reads += len(digests)
        return await super().bulk_read(ctx, digests)


def build_tree(width: int, depth: int) -> tuple[Digest, dict[Digest, bytes]]:
    blobs: dict[Digest, bytes] = {}

    def level(n: int, label: str) -> Digest:
        message = re_pb2.Directory()
        message.files.add(name=f"{label}.txt", digest=Digest.of(label.encode()).to_proto())
        if n < depth:
            for i in range(width):
                message.directories.add(
                    name=f"d{i}", digest=level(n + 1, f"{label}-{i}").to_proto()
                )
        data = message.SerializeToString()
        blobs[Digest.of(data)] = data
        return Digest.of(data)

    return level(0, "root"), blobs


async def get_tree(channel: grpc.aio.Channel, root: Digest) -> list[bytes]:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    request = re_pb2.GetTreeRequest(root_digest=root.to_proto(), page_size=7)
    return [d.SerializeToString() async for page in cas.GetTree(request) for d in page.directories]


async def serve(storage: CountingStorage) -> AsyncIterator[grpc.aio.Channel]:
    async with (
        CasServer(storage, MemoryActionCache(), address="127.0.0.1:0") as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        yield channel


async def test_repeated_get_tree_reads_no_directories() -> None:
    storage = CountingStorage()
    root, blobs = build_tree(width=3, depth=3)  # 40 directories
    await storage.bulk_update(NO_CONTEXT, list(blobs.items()))
    async for channel in serve(storage):
        first = await get_tree(channel, root)
        assert sorted(first) == sorted(blobs.values())
        assert storage.reads >= len(blobs)
        storage.reads = 0
        again = await get_tree(channel, root)
        assert again == first, "same directories, same order, same pages"
        assert storage.reads == 0


async def test_a_directory_gone_from_the_cas_is_not_served_from_the_cache() -> None:
    storage = CountingStorage()
    root, blobs = build_tree(width=2, depth=2)
    await storage.bulk_update(NO_CONTEXT, list(blobs.items()))
    async for channel in serve(storage):
        first = await get_tree(channel, root)
        victim = next(d for d, data in blobs.items() if d != root and data in first)
        await storage.delete([victim])
        again = await get_tree(channel, root)
        assert blobs[victim] not in again
        assert len(again) < len(first)
