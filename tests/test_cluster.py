"""asynccas as a cluster of storage nodes: sharded by rendezvous hashing and mirrored pairs,
in process over memory stores and over gRPC between real `asynccas serve` processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import anyio
import pytest

from asynccas.config import load
from asynccas.digest import Digest
from asynccas.errors import BackendUnavailable
from asynccas.storage.base import contains, missing_digests, put_chunks, read_all
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.mirrored import MirroredStorage
from asynccas.storage.remote import RemoteStorage
from asynccas.storage.remote_action_cache import RemoteActionCache
from asynccas.storage.sharded import ShardedStorage
from asynccas.storage.with_cache import WithCacheStorage
from asynccas.testing import blob, check_storage
from tests.servers import memory_server
from tests.support.redis_servers import free_port
from tests.test_cli import start
from tests.test_remote_storage import chunks_of

pytestmark = pytest.mark.anyio

DIGESTS = [blob(16, seed)[0] for seed in range(12_000)]


def shares(storage: ShardedStorage) -> Counter[int]:
    return Counter(storage.route(d) for d in DIGESTS)


async def test_a_sharded_storage_passes_the_conformance_kit() -> None:
    shards = [MemoryStorage() for _ in range(3)]
    async with ShardedStorage(shards, ["a", "b", "c"]) as sharded:
        await check_storage(sharded)
        blobs = [blob(100, seed) for seed in range(30)]
        assert await sharded.bulk_update(NO_CONTEXT, blobs) == [None] * 30
        for position, shard in enumerate(shards):
            held = [d for d, _ in blobs if await contains(shard, NO_CONTEXT, d)]
            assert held, "a shard was never used"
            assert all(sharded.route(d) == position for d in held)


def test_rendezvous_hashing_moves_only_the_new_shards_share_and_follows_weights() -> None:
    three = ShardedStorage([MemoryStorage() for _ in range(3)], ["a", "b", "c"])
    four = ShardedStorage([MemoryStorage() for _ in range(4)], ["a", "b", "c", "d"])
    n = len(DIGESTS)
    assert all(abs(count / n - 1 / 3) < 0.03 for count in shares(three).values())
    moved = [d for d in DIGESTS if three.route(d) != four.route(d)]
    assert abs(len(moved) / n - 1 / 4) < 0.03, "adding a fourth shard should move about 1/4"
    assert all(four.route(d) == 3 for d in moved), "a blob moved between old shards"
    # Weights: twice the weight, about twice the share; weight 0 drains a shard.
    weighted = ShardedStorage([MemoryStorage() for _ in range(3)], ["a", "b", "c"], [2, 1, 1])
    assert abs(shares(weighted)[0] / n - 0.5) < 0.03
    drained = ShardedStorage([MemoryStorage() for _ in range(3)], ["a", "b", "c"], [1, 1, 0])
    assert shares(drained)[2] == 0
    assert all(drained.route(d) == three.route(d) for d in DIGESTS if three.route(d) != 2), (
        "draining a shard moved blobs that were not on it"
    )
    with pytest.raises(ValueError, match="one must be above 0"):
        ShardedStorage([MemoryStorage()], ["a"], [0])


async def test_a_mirrored_pair_passes_the_conformance_kit() -> None:
    sides = (MemoryStorage(), MemoryStorage())
    async with MirroredStorage(*sides) as mirrored:
        await check_storage(mirrored)


@contextmanager
def nodes(count: int, tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    """``count`` `asynccas serve` storage nodes (memory stores) on fixed free ports."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    started = []
    try:
        for _ in range(count):
            process, target, _ = start(
                ["--storage", "memory", "--address", f"127.0.0.1:{free_port()}"], env
            )
            started.append((process, target))
        yield started
    finally:
        for process, _ in started:
            process.kill()
            process.communicate()


def restart(node: tuple[subprocess.Popen[str], str], tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    process, _, _ = start(["--storage", "memory", "--address", node[1]], env)
    return process


async def test_a_three_node_cluster_over_grpc(tmp_path: Path) -> None:
    """Three storage processes and a frontend process sharding over them (from a --config
    file): the conformance kit passes through the frontend; with one node killed only the
    blobs on it are UNAVAILABLE, and the frontend serves them again once the node is back."""
    with nodes(3, tmp_path) as storage_nodes:
        names = ["node0", "node1", "node2"]
        config = tmp_path / "frontend.toml"
        tables = "".join(
            f'[storage.{name}]\ntype = "remote"\nurl = "grpc://{target}"\nretries = 0\n'
            f"request_timeout = 5\n\n"
            for name, (_, target) in zip(names, storage_nodes, strict=True)
        )
        await anyio.Path(config).write_text(
            f'cas = "cluster"\n\n[storage.cluster]\ntype = "sharded"\nshards = {names}\n\n{tables}'
        )
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        frontend, target, description = await anyio.to_thread.run_sync(
            start, ["--config", str(config), "--address", "127.0.0.1:0"], env
        )
        try:
            assert "sharded over the remote CAS" in description
            async with RemoteStorage(f"grpc://{target}", request_timeout=10) as cluster:
                await check_storage(cluster)

                layout = ShardedStorage([MemoryStorage() for _ in names], names)
                blobs = [blob(3000, seed) for seed in range(30)]
                assert await cluster.bulk_update(NO_CONTEXT, blobs) == [None] * 30
                storage_nodes[1][0].kill()
                storage_nodes[1][0].communicate()
                for digest, data in blobs:
                    if layout.route(digest) == 1:
                        with pytest.raises(BackendUnavailable):
                            await read_all(cluster, NO_CONTEXT, digest)
                    else:
                        assert await read_all(cluster, NO_CONTEXT, digest) == data
                elsewhere = [(d, b) for d, b in blobs if layout.route(d) != 1]
                digests = [d for d, _ in elsewhere]
                assert await missing_digests(cluster, NO_CONTEXT, digests) == []
                fresh = [blob(4000, seed) for seed in range(100, 130)]
                results = await cluster.bulk_update(NO_CONTEXT, fresh)
                for (digest, _), result in zip(fresh, results, strict=True):
                    assert (result is None) == (layout.route(digest) != 1), result

                back = await anyio.to_thread.run_sync(restart, storage_nodes[1], tmp_path)
                storage_nodes[1] = (back, storage_nodes[1][1])
                on_node1 = next((d, b) for d, b in fresh if layout.route(d) == 1)
                with anyio.fail_after(20):
                    while True:  # the frontend reconnects by itself
                        try:
                            await put_chunks(cluster, NO_CONTEXT, on_node1[0],
                                             chunks_of(on_node1[1]))  # fmt: skip
                            break
                        except BackendUnavailable:
                            await anyio.sleep(0.2)
                assert await read_all(cluster, NO_CONTEXT, on_node1[0]) == on_node1[1]
        finally:
            frontend.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(frontend.communicate)


async def lacks_any(storage: RemoteStorage, digests: list[Digest]) -> bool:
    try:
        return bool(await missing_digests(storage, NO_CONTEXT, digests))
    except BackendUnavailable:  # not reconnected yet
        return True


async def test_a_mirrored_pair_survives_losing_either_side(tmp_path: Path) -> None:
    """A mirror over two storage processes: with one side killed, every read, check and
    write still succeeds; the side that comes back empty gets blobs copied to it by use."""
    with nodes(2, tmp_path) as sides:
        remotes = [RemoteStorage(f"grpc://{t}", request_timeout=5) for _, t in sides]
        blobs = [blob(2000 + i, i) for i in range(20)]
        async with MirroredStorage(*remotes) as mirror:
            assert await mirror.bulk_update(NO_CONTEXT, blobs) == [None] * 20
            for lost in (0, 1):
                sides[lost][0].kill()
                sides[lost][0].communicate()
                for digest, data in blobs:
                    assert await read_all(mirror, NO_CONTEXT, digest) == data
                assert await missing_digests(mirror, NO_CONTEXT, [d for d, _ in blobs]) == []
                assert await mirror.bulk_read(NO_CONTEXT, [d for d, _ in blobs]) == dict(blobs)
                digest, data = blob(50_000, 100 + lost)
                await put_chunks(mirror, NO_CONTEXT, digest, chunks_of(data))
                blobs.append((digest, data))
                back = await anyio.to_thread.run_sync(restart, sides[lost], tmp_path)
                sides[lost] = (back, sides[lost][1])
                # It came back empty: checks find blobs on one side only and copy them over.
                with anyio.fail_after(20):
                    while await lacks_any(remotes[lost], [d for d, _ in blobs]):
                        await missing_digests(mirror, NO_CONTEXT, [d for d, _ in blobs])
                        await anyio.sleep(0.2)
            assert mirror.copies >= len(blobs)


def readme_examples() -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("### Proxies and clusters") :]
    section = section[: section.index("\n### ", 1)]
    return re.findall(r"```toml\n(.*?)```", section, re.DOTALL)


EXAMPLES = readme_examples()


@pytest.mark.parametrize("number", range(3), ids=["proxy", "sharded", "mirrored"])
async def test_the_readme_examples_of_proxies_and_clusters_work(
    number: int, tmp_path: Path
) -> None:
    """Each example, its hosts replaced by real asynccas servers, builds a storage graph that
    passes the conformance kit and keeps its blobs where the example says."""
    assert len(EXAMPLES) == 3
    example = EXAMPLES[number]
    hosts = sorted(set(re.findall(r"grpc://([\w.-]+\.internal:50051)", example)))
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(memory_server()) for _ in hosts]
        for host, server in zip(hosts, servers, strict=True):
            example = example.replace(host, server.target)
        path = tmp_path / "cluster.toml"
        await anyio.Path(path).write_text(example)
        deployment = await anyio.to_thread.run_sync(load, path)
        async with deployment.cas:
            await deployment.action_cache.start()
            await check_storage(deployment.cas)
            digest, data = blob(70_000, 5)
            await put_chunks(deployment.cas, NO_CONTEXT, digest, chunks_of(data))
            await deployment.action_cache.stop()
        holders = [
            s for s in servers if s.storage and await contains(s.storage, NO_CONTEXT, digest)
        ]
        assert len(holders) == (1 if number < 2 else 2), "the blob is not where it should be"
    if number == 0:
        assert isinstance(deployment.cas, WithCacheStorage)
        assert deployment.index is not None, "eviction of the local copies needs the index"
        assert deployment.eviction is not None
        assert isinstance(deployment.action_cache, RemoteActionCache)
    elif number == 1:
        assert isinstance(deployment.cas, ShardedStorage)
        assert deployment.cas.names == ["node-a", "node-b", "node-c"]
    else:
        assert isinstance(deployment.cas, MirroredStorage)
