"""Shared fixtures: every async test runs on asyncio (in debug mode) and on uvloop, with
blocking calls on the event loop turned into failures; servers listen on 127.0.0.1:0."""

from __future__ import annotations

import gc
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from anyio._backends import _asyncio as anyio_asyncio
from blockbuster import BlockBuster, blockbuster_ctx
from hypothesis import settings

from asynccas.index.sqlite import SqliteIndex
from asynccas.server.action_cache import ActionCacheService
from asynccas.server.app import CasServer
from asynccas.server.bytestream import ByteStreamService
from asynccas.server.capabilities import CapabilitiesService
from asynccas.server.cas import ContentAddressableStorageService
from asynccas.storage.action_cache import MemoryActionCache, SqliteActionCache
from asynccas.storage.base import Storage
from asynccas.storage.compressed_disk import CompressedDiskStorage
from asynccas.storage.disk import DiskStorage
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.read_cache import ReadCacheStorage
from asynccas.storage.size_differentiated import SizeDifferentiatedStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from tests.support.redis_servers import RedisCluster, RedisServer
from tests.support.seaweedfs import SeaweedFS

# Speed is measured by benchmarks, never by unit tests: no per-example deadline, which
# otherwise fails tests at random on a busy shared machine.
settings.register_profile("asynccas", deadline=None)
settings.load_profile("asynccas")


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        # Not in debug mode: uvloop's debug mode records a traceback for every callback, also
        # those a worker thread schedules (call_soon_threadsafe), and that capture crashed
        # the test process with a segmentation fault under CPython 3.11 (once in CI; uvloop
        # issues #611, #715 and PR #756). asyncio's debug checks run on the other half.
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


def _is_stale_grpc_event(context: dict[str, Any]) -> bool:
    """grpc.aio's poller delivering an event of a call made on an event loop that has closed
    since: the test suite runs a loop per test, while grpc.aio lives for the whole process
    (its servers from earlier tests are never collected), so a late event of an earlier test's
    call reaches grpc's handler in the next test's loop, which raises "Event loop is closed".
    A server process runs one loop for its life and never meets this."""
    exception = context.get("exception")
    if not isinstance(exception, RuntimeError) or str(exception) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(exception.__traceback__)
    return "PollerCompletionQueue" in repr(context.get("handle")) or any(
        "completion_queue" in frame.filename for frame in frames
    )


_collect_loop_exception = anyio_asyncio.TestRunner._exception_handler


def _exception_handler(self: Any, loop: Any, context: dict[str, Any]) -> None:
    if not _is_stale_grpc_event(context):
        _collect_loop_exception(self, loop, context)


anyio_asyncio.TestRunner._exception_handler = _exception_handler  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def collect_garbage_after() -> Iterator[None]:
    """Objects a test left in reference cycles (a grpc call held by an exception's traceback)
    are collected when the test ends, outside any event loop. Collected later, at a random
    point of another test, the last grpc.aio call object going away shuts grpc.aio down and
    joins its poller thread inside that test's event loop, which blockbuster reports as a
    blocking call. (Set up before ``blockbuster``, so torn down after it.)"""
    yield
    gc.collect(1)  # the young generations: what the test made, at a fraction of a full pass


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test whose code makes a blocking call on the event loop thread."""
    with blockbuster_ctx(["asynccas"]) as detector:
        for function in detector.functions.values():
            # It runs in a worker thread, on a throw-away event loop of that thread's own (see
            # its docstring), which blockbuster cannot tell from the server's.
            function.can_block_in("asynccas/storage/s3.py", "_prepared_client")
            # By design: a lookup of a few keys, or a write of a small row, runs on the loop,
            # where a thread hop costs more than the work (``SqliteDatabase.lookup``).
            function.can_block_in("asynccas/sqlite_database.py", "lookup")
            function.can_block_in("asynccas/sqlite_database.py", "write_on_loop")
        yield detector


def make_storage(kind: str, root: Path) -> Storage:
    if kind == "memory":
        return MemoryStorage(64 * 1024 * 1024)
    if kind == "disk":
        return DiskStorage(root / "data", fsync=False)
    if kind == "disk-direct":  # every streamed blob written with O_DIRECT, and fsynced
        return DiskStorage(root / "data", fsync=True, direct_io_above=1)
    if kind == "sqlite-disk":
        return SqliteIndex(DiskStorage(root / "data", fsync=False), root / "index.sqlite")
    if kind == "sqlite-memory":
        return SqliteIndex(MemoryStorage(64 * 1024 * 1024), root / "index.sqlite")
    if kind == "sqlite-blobs":
        return SqliteBlobStorage(root / "small.sqlite", max_blob_size=8 * 1024 * 1024)
    if kind == "tiered":
        return SizeDifferentiatedStorage(
            SqliteBlobStorage(root / "small.sqlite"), DiskStorage(root / "data", fsync=False)
        )
    if kind == "sqlite-tiered":
        return SqliteIndex(make_storage("tiered", root), root / "index.sqlite")
    if kind == "read-cache":  # a small cache, so that blobs come and go through it
        return ReadCacheStorage(make_storage("sqlite-tiered", root), max_bytes=256 * 1024)
    if kind == "disk-zstd":
        return CompressedDiskStorage(root / "data", fsync=False)
    if kind == "sqlite-disk-zstd":
        return SqliteIndex(make_storage("disk-zstd", root), root / "index.sqlite")
    raise ValueError(kind)


STORAGE_KINDS = [
    "memory", "disk", "disk-direct", "sqlite-disk", "sqlite-memory", "sqlite-blobs", "tiered", "sqlite-tiered",
    "read-cache", "disk-zstd", "sqlite-disk-zstd",
]  # fmt: skip


@pytest.fixture(params=["sqlite-disk", "memory", "sqlite-tiered"])
def server_storage_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def server(server_storage_kind: str, tmp_path: Path) -> AsyncIterator[CasServer]:
    storage = make_storage(server_storage_kind, tmp_path)
    action_cache = (
        SqliteActionCache(tmp_path / "ac.sqlite")
        if server_storage_kind.startswith("sqlite")
        else MemoryActionCache()
    )
    async with CasServer(
        storage, action_cache, address="127.0.0.1:0", max_batch_total_size_bytes=1 << 20
    ) as running:
        yield running


@pytest.fixture
async def channel(server: CasServer) -> AsyncIterator[grpc.aio.Channel]:
    limit = 8 << 20
    async with grpc.aio.insecure_channel(
        server.target,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    ) as opened:
        yield opened


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real SeaweedFS serving S3, shared by the session (each test uses its own bucket)."""
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    store.start()
    yield store
    store.stop()


@asynccontextmanager
async def serve_with_bytestream(
    storage: Storage, bytestream: ByteStreamService
) -> AsyncIterator[int]:
    """Capabilities, CAS, an in-memory ActionCache and a given (fault-injecting or recording)
    ByteStream on a loopback port, yielded."""
    server = grpc.aio.server()
    CapabilitiesService(
        max_batch_total_size_bytes=1 << 20, allow_action_cache_updates=True
    ).add_to_server(server)
    ContentAddressableStorageService(storage, max_batch_total_size_bytes=1 << 20).add_to_server(
        server
    )
    bytestream.add_to_server(server)
    ActionCacheService(MemoryActionCache(), storage, allow_updates=True).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)
