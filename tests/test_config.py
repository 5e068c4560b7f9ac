"""Storage graphs from TOML files (``asynccas serve --config``): the README's examples, the
flags as shorthands for the same graphs, and one clear error per mistake."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from asynccas.cli import build_parser, shorthand_config
from asynccas.config import build, load
from asynccas.errors import ConfigurationError
from asynccas.index.redis import RedisIndex
from asynccas.index.sqlite import SqliteIndex
from asynccas.storage.action_cache import MemoryActionCache, SqliteActionCache
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.disk import DiskStorage
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.read_cache import ReadCacheStorage
from asynccas.storage.size_differentiated import SizeDifferentiatedStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from asynccas.testing import blob, check_index, check_storage
from tests.support.redis_servers import RedisServer
from tests.test_cli import start, stop, upload_batch

pytestmark = pytest.mark.anyio

README = Path(__file__).parent.parent / "README.md"


def readme_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Storage graphs") :]
    section = section[: section.index("\n### ", 1)]
    return re.findall(r"```toml\n(.*?)```", section, re.DOTALL)


EXAMPLES = readme_examples()


def test_the_readme_shows_three_examples() -> None:
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("number", range(3))
async def test_every_readme_example_builds_a_working_cas(
    number: int, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Each example, with its absolute paths and Redis address moved to this test's, builds
    the graph it describes, which passes the conformance kit."""
    example = EXAMPLES[number]
    example = example.replace("/mnt/nvme/asynccas", str(tmp_path / "nvme"))
    example = example.replace(
        "redis://redis.internal:6379/0", f"redis://127.0.0.1:{redis_server.port}/3"
    )
    path = tmp_path / "cache.toml"
    await anyio.Path(path).write_text(example)
    deployment = await anyio.to_thread.run_sync(load, path)
    cas = deployment.cas
    await deployment.action_cache.start()
    async with cas:
        if cas is not deployment.index:
            await check_storage(cas)
        if deployment.index is not None:
            await check_index(deployment.index)
    await deployment.action_cache.stop()
    if number == 0:  # the default layout, relative to the file
        assert isinstance(cas, ReadCacheStorage)
        assert cas.max_bytes == 64 * 1024**2
        index = cas.inner
        assert isinstance(index, SqliteIndex)
        assert index is deployment.index
        assert index.path == tmp_path / "index.sqlite"
        assert isinstance(index.storage, SizeDifferentiatedStorage)
        assert isinstance(index.storage.small, SqliteBlobStorage)
        assert index.storage.small.path == tmp_path / "small-blobs.sqlite"
        assert isinstance(index.storage.large, DiskStorage)
        assert index.storage.large.root == tmp_path
        assert deployment.eviction is not None
        assert deployment.eviction.max_bytes == 200 * 1024**3
        assert isinstance(deployment.action_cache, SqliteActionCache)
    elif number == 1:
        assert isinstance(cas, RedisIndex)
        assert isinstance(cas.storage, DiskStorage)
        assert cas.storage.direct_io_above == 4 * 1024**2
        assert deployment.eviction is not None
    else:
        assert isinstance(cas, MemoryStorage)
        assert cas.max_bytes == 8 * 1024**3
        assert isinstance(deployment.action_cache, MemoryActionCache)
        assert deployment.eviction is None


def serve_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *flags])


async def test_the_flags_build_what_the_readme_spells_out(tmp_path: Path) -> None:
    """``--data-dir D --max-size 200G`` and the README's first example, placed in D, are the
    same graph: same description (every path, size and type), same budget."""
    data_dir = tmp_path / "d"
    await anyio.Path(data_dir).mkdir()
    flags = await anyio.to_thread.run_sync(
        serve_args, "--data-dir", str(data_dir), "--max-size", "200G"
    )  # argparse looks for translations on disk
    from_flags = build(await shorthand_config(flags), Path.cwd())
    await anyio.Path(data_dir / "cache.toml").write_text(EXAMPLES[0])
    from_file = await anyio.to_thread.run_sync(load, data_dir / "cache.toml")
    assert from_file.description == from_flags.description
    assert "those up to 64.0 KiB in" in from_file.description
    assert from_file.eviction is not None
    assert from_flags.eviction is not None
    assert from_file.eviction.max_bytes == from_flags.eviction.max_bytes


def test_serve_with_a_config_file_stores_where_the_file_says(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "cache.toml"
    config.parent.mkdir()
    config.write_text(
        textwrap.dedent(
            """
            cas = "index"
            [storage.index]
            type = "sqlite-index"
            path = "meta/index.sqlite"
            storage = "tiers"
            [storage.tiers]
            type = "size-differentiated"
            limit = "4K"
            small = "rows"
            large = "files"
            [storage.rows]
            type = "sqlite-rows"
            path = "rows.sqlite"
            max_blob_size = 4096
            [storage.files]
            type = "disk"
            path = "../elsewhere"
            fsync = false
            """
        )
    )
    (tmp_path / "conf" / "meta").mkdir()
    process, target, where = start(
        ["--address", "127.0.0.1:0", "--config", str(config)], dict(os.environ)
    )
    (small, small_data), (large, large_data) = blob(1000, 1), blob(10_000, 2)
    try:
        assert str(tmp_path / "conf" / "meta" / "index.sqlite") in where
        upload_batch(target, [(small, small_data), (large, large_data)])
    finally:
        stop(process, signal.SIGTERM)
    files = tmp_path / "elsewhere" / "cas" / "sha256"
    assert (files / large.hash[:2] / large.hash).read_bytes() == large_data
    assert not (files / small.hash[:2] / small.hash).exists()
    with closing(sqlite3.connect(tmp_path / "conf" / "rows.sqlite")) as conn:
        rows = conn.execute("SELECT data FROM blobs WHERE key = ?", (small.key,)).fetchall()
    assert rows == [(small_data,)]

    # reindex takes the same file: it rebuilds the index from both tiers.
    (tmp_path / "conf" / "meta" / "index.sqlite").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "reindex", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 blobs indexed, 0 stale entries dropped" in result.stderr


def test_flags_and_a_config_file_do_not_mix(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "serve", "--config", str(tmp_path / "c.toml"),
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--data-dir and --config do not go together" in result.stderr


GOOD: dict[str, Any] = {
    "cas": "index",
    "storage": {
        "index": {"type": "sqlite-index", "path": "index.sqlite", "storage": "files"},
        "files": {"type": "disk", "path": "."},
    },
}


def with_changes(**changes: Any) -> dict[str, Any]:
    """GOOD with top-level keys or ``storage.NAME`` tables replaced (None removes)."""
    config: dict[str, Any] = {**GOOD, "storage": dict(GOOD["storage"])}
    for key, value in changes.items():
        target = config["storage"] if key in ("index", "files", "extra") else config
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (with_changes(index={**GOOD["storage"]["index"], "pth": "x"}),
         "storage.index.pth: unknown key (this table takes: fsync, max_size, path, storage, touch_interval, type)"),
        (with_changes(files={"type": "disk", "path": ".", "direct_io_above": "lots"}),
         "storage.files.direct_io_above: 'lots' is not a size like 500M"),
        (with_changes(files={"type": "disk", "path": ".", "fsync": "yes"}),
         "storage.files.fsync: expected true or false, not 'yes'"),
        (with_changes(files={"type": "floppy", "path": "."}),
         "storage.files.type: unknown storage type 'floppy' (known: disk, existence-cache, memory, mirrored, read-cache,"),
        (with_changes(index={**GOOD["storage"]["index"], "storage": "filez"}),
         "storage.index.storage: no storage named 'filez' (defined: files, index)"),
        (with_changes(index={**GOOD["storage"]["index"], "storage": "index"}),
         "storage.index.storage: storage 'index' would contain itself"),
        (with_changes(extra={"type": "memory"}),
         "storage.extra: defined but not part of the cas graph"),
        (with_changes(cas=None), "config: 'cas' is missing: name the storage the CAS is"),
        (with_changes(cas="files", index=None, max_size="1G"),
         "config.max_size: eviction works through an index"),
        (with_changes(index={"type": "sqlite-index", "storage": "files"}),
         "storage.index: 'path' is missing"),
        (with_changes(casx="index"), "config.casx: unknown key"),
        ({"cas": "a", "storage": {"a": {"type": "size-differentiated", "limit": 10,
                                        "small": "b", "large": "b"}, "b": {"type": "memory"}}},
         "storage.a.large: storage 'b' is already used by storage.a"),
        (with_changes(action_cache={"type": "disk"}),
         "action_cache.type: unknown action cache type 'disk' (known: memory, sqlite, remote, redis)"),
        ({"cas": "i", "storage": {"i": {"type": "redis-index", "url": "http://x", "storage": "f"},
                                  "f": {"type": "disk", "path": "."}}},
         "storage.i.url:"),
        (with_changes(files={"type": "remote", "url": "http://cas:1"}),
         "storage.files.url: expected grpc://HOST:PORT or grpcs://HOST:PORT, not 'http://cas:1'"),
        (with_changes(files={"type": "remote", "url": "grpc://cas:1"}),
         "SqliteIndex (it evicts) needs a storage that offers Deletable; a remote CAS"
         " (grpc://cas:1) does not: REAPI has no call to delete or list blobs"),
        (with_changes(files={"type": "remote", "url": "grpc://cas:1", "retries": -1}),
         "storage.files: retries cannot be negative (-1)"),
        ({"cas": "s", "storage": {"s": {"type": "sharded", "shards": ["a", "b"], "weights": [1]},
                                  "a": {"type": "memory"}, "b": {"type": "memory"}}},
         "storage.s.weights: expected 2 numbers, one per shard"),
        ({"cas": "s", "storage": {"s": {"type": "sharded", "shards": "a"},
                                  "a": {"type": "memory"}}},
         "storage.s.shards: expected a list of storage names, not 'a'"),
        ({"cas": "m", "storage": {"m": {"type": "mirrored", "sides": ["a"]},
                                  "a": {"type": "memory"}}},
         "storage.m.sides: a mirror has two sides, not 1"),
    ],
)  # fmt: skip
def test_every_mistake_is_one_error_naming_the_key(
    config: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build(config, tmp_path)
    assert message in str(caught.value)


def test_a_graph_that_cannot_work_is_refused_when_it_is_built(tmp_path: Path) -> None:
    """Reindexing lists what storage holds: an index over memory cannot be rebuilt."""
    config = tmp_path / "memory-index.toml"
    config.write_text(
        'cas = "index"\n[storage.index]\ntype = "sqlite-index"\npath = "i.sqlite"\n'
        'storage = "ram"\n[storage.ram]\ntype = "memory"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "reindex", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "reindex (it lists what storage holds) needs a storage that offers Listable" in (
        result.stderr
    )


def test_a_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("cas = \n")
    with pytest.raises(ConfigurationError, match=r"bad\.toml is not valid TOML"):
        load(path)
    with pytest.raises(ConfigurationError, match=r"cannot read .*missing\.toml"):
        load(tmp_path / "missing.toml")


def test_a_read_cache_sits_above_the_index_that_eviction_works_through(tmp_path: Path) -> None:
    config = {
        "cas": "cache",
        "max_size": "1G",
        "storage": {
            "cache": {"type": "read-cache", "max_size": "32M", "storage": "index"},
            "index": {"type": "sqlite-index", "path": "index.sqlite", "storage": "files"},
            "files": {"type": "disk", "path": "."},
        },
    }
    deployment = build(config, tmp_path)
    assert isinstance(deployment.cas, ReadCacheStorage)
    assert isinstance(deployment.index, SqliteIndex)
    assert deployment.cas.inner is deployment.index
    assert deployment.eviction is not None
    assert "cached in memory (up to 32.0 MiB)" in deployment.description
    config["storage"]["cache"]["storage"] = "files"  # type: ignore[index]
    del config["storage"]["index"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="eviction works through an index"):
        build(config, tmp_path)


async def test_read_cache_zero_leaves_the_index_at_the_top(tmp_path: Path) -> None:
    flags = await anyio.to_thread.run_sync(
        serve_args, "--data-dir", str(tmp_path), "--read-cache", "0"
    )
    deployment = build(await shorthand_config(flags), Path.cwd())
    assert isinstance(deployment.cas, SqliteIndex)
    assert "cached in memory" not in deployment.description


def test_extra_workers_measure_the_budget_but_do_not_evict(tmp_path: Path) -> None:
    config = dict(GOOD, max_size="1G")
    assert build(config, tmp_path).eviction is not None
    first, extra = build(config, tmp_path), build(config, tmp_path, evict=False)
    assert first.eviction is not None
    assert first.eviction.evicts
    assert extra.eviction is not None
    assert not extra.eviction.evicts
    assert extra.eviction.budget.waits_for_room


async def test_an_inner_index_keeps_a_budget_of_its_own(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A frontend's local disk cache (the top-level max_size) in front of a shared store
    whose index has a max_size of its own (the cluster's budget): each is held."""
    prefix = f"inner-{uuid.uuid4().hex[:8]}"
    config: dict[str, Any] = {
        "cas": "frontend",
        "max_size": "1M",
        "storage": {
            "frontend": {"type": "with-cache", "fast": "local", "slow": "shared"},
            "local": {"type": "sqlite-index", "path": "local.sqlite", "storage": "files"},
            "files": {"type": "disk", "path": "local", "fsync": False},
            "shared": {
                "type": "redis-index", "url": redis_server.url, "prefix": prefix,
                "storage": "objects", "max_size": "2M",
            },
            "objects": {"type": "memory"},
        },
    }  # fmt: skip
    deployment = build(config, tmp_path)
    assert "its own budget 2.0 MiB" in deployment.description
    assert deployment.eviction is not None
    assert deployment.eviction.max_bytes == 1 << 20
    ((shared_policy, shared),) = deployment.inner_budgets
    assert isinstance(shared, RedisIndex)
    assert shared_policy.max_bytes == 2 << 20
    assert deployment.index is not None
    async with deployment.cas as cas:
        blobs = [blob(256 * 1024, seed) for seed in range(12)]  # 3 MiB
        for digest, data in blobs:
            assert await cas.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        await deployment.eviction.enforce_once(deployment.index)
        await shared_policy.enforce_once(shared)
        assert await deployment.index.get_total_size() <= 1 << 20
        assert await shared.get_total_size() <= 2 << 20
    both = {**config, "storage": {**config["storage"], "local": {
        **config["storage"]["local"], "max_size": "1M"}}}  # fmt: skip
    with pytest.raises(ConfigurationError, match="has a max_size of its own"):
        build(both, tmp_path)
