"""Storage graphs from a TOML file: ``asynccas serve --config FILE``.

A file names its storages and says how they compose; the CAS is the one named by ``cas``::

    cas = "indexed"
    max_size = "200G"                 # evicted least recently used first (the cas is an index)

    [storage.indexed]
    type = "sqlite-index"             # or "redis-index", with url = "redis://..."
    path = "index.sqlite"
    storage = "tiers"

    [storage.tiers]
    type = "size-differentiated"
    limit = "64K"
    small = "rows"
    large = "files"

    [storage.rows]
    type = "sqlite-rows"
    path = "small-blobs.sqlite"
    max_blob_size = "64K"

    [storage.files]
    type = "disk"
    path = "."

    [action_cache]
    type = "sqlite"                   # or "memory"
    path = "action-cache.sqlite"

Relative paths are relative to the file's directory. Sizes are bytes or text such as
``"64K"`` or ``"1.5G"`` (powers of 1024). Every storage is used exactly once. Anything
unknown, missing or of the wrong type is one ``ConfigurationError`` naming the key. The
``serve`` flags (``--storage``, ``--index``, ``--data-dir``, ...) are shorthands: they build
the same graph through ``build`` (see ``asynccas.cli``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from asynccas.errors import ConfigurationError
from asynccas.eviction import EvictionPolicy
from asynccas.index.base import StorageIndex
from asynccas.index.redis import RedisIndex
from asynccas.index.sqlite import SqliteIndex
from asynccas.redis_provider import RedisProvider
from asynccas.storage.action_cache import (
    ActionCacheStore,
    MemoryActionCache,
    RedisActionCache,
    SqliteActionCache,
)
from asynccas.storage.base import Storage
from asynccas.storage.blob_info import (
    BlobInfoCache,
    MemoryBlobInfo,
    RedisBlobInfo,
    SqliteBlobInfo,
)
from asynccas.storage.compressed_disk import CompressedDiskStorage
from asynccas.storage.disk import DEFAULT_DIRECT_IO_ABOVE, DiskStorage
from asynccas.storage.existence_cache import ExistenceCacheStorage
from asynccas.storage.forwarding import innermost
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.mirrored import MirroredStorage
from asynccas.storage.per_instance import PerInstanceStorage
from asynccas.storage.read_cache import ReadCacheStorage
from asynccas.storage.remote import RemoteStorage
from asynccas.storage.remote_action_cache import RemoteActionCache
from asynccas.storage.s3 import S3Storage
from asynccas.storage.sharded import ShardedStorage
from asynccas.storage.size_differentiated import SizeDifferentiatedStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from asynccas.storage.with_cache import WithCacheStorage
from asynccas.transport import ClientTls

_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1048576``, ``512M``, ``1.5G``, ``2GiB`` -> bytes (suffixes are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size like 500M, 1.5G or 10G")
    number, unit = float(match.group(1)), match.group(2).lower()
    exponent = "kmgt".index(unit) + 1 if unit else 0
    return int(number * 1024**exponent)


def human_size(n: int) -> str:
    """``65536`` -> ``64.0 KiB``: sizes in log lines and descriptions."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass
class Deployment:
    """What a server is built from: the CAS storage graph, the action cache, and the eviction
    policy that keeps them under a byte budget (None: no budget)."""

    cas: Storage
    action_cache: ActionCacheStore
    eviction: EvictionPolicy | None
    description: str
    disk_roots: list[Path]
    """Where the graph's disk storages keep their files (reindex checks them first)."""
    index: StorageIndex | None
    """The index at the top of the graph, under any read cache: what eviction, metrics and
    reindex work through."""
    inner_budgets: list[tuple[EvictionPolicy, StorageIndex]] = field(default_factory=list)
    """Budgets of indexes deeper in the graph (their own ``max_size``): a frontend's local
    cache keeps the top-level budget while the shared store below keeps the cluster's."""


class _Table:
    """One table of the file, read key by key: each getter checks the value's type, and
    ``done`` refuses keys nobody asked for (a misspelt option must not be ignored)."""

    def __init__(self, where: str, values: Mapping[str, Any], base: Path) -> None:
        self.where = where
        self.values = values
        self.base = base
        self._read: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigurationError:
        return ConfigurationError(f"{self.where}.{key}: {problem}")

    def raw(self, key: str, default: Any) -> Any:
        self._read.add(key)
        if key not in self.values:
            if default is _REQUIRED:
                raise ConfigurationError(f"{self.where}: {key!r} is missing")
            return default
        return self.values[key]

    def text(self, key: str, default: Any = None) -> Any:
        value = self.raw(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, not {value!r}")
        return value

    def path(self, key: str, default: str | None = None) -> Path:
        return self.base / Path(self.text(key, default)).expanduser()

    def size(self, key: str, default: int | None = None) -> int:
        value = self.raw(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(key, f'expected a size like 65536 or "64K", not {value!r}')
        try:
            size = value if isinstance(value, int) else parse_size(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if size < 0:
            raise self.error(key, f"a size cannot be negative ({value!r})")
        return size

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, not {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(key, f"expected a positive number, not {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None) -> int | None:
        value = self.raw(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(key, f"expected a whole number, not {value!r}")
        return value

    def table(self, key: str, default: Mapping[str, Any]) -> _Table:
        """A nested table (``[action_cache]``), read key by key like this one."""
        values = self.raw(key, default)
        if not isinstance(values, Mapping):
            raise self.error(key, f"expected a table, not {values!r}")
        return _Table(key, values, self.base)

    def done(self) -> None:
        unknown = sorted(set(self.values) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self.error(unknown[0], f"unknown key (this table takes: {known})")


_REQUIRED: Final = object()


class _Graph:
    """Builds storages by name, each once, refusing cycles and unknown names."""

    def __init__(self, storages: Mapping[str, Any], base: Path, *, evict: bool = True) -> None:
        self.storages = storages
        self.base = base
        self.evict = evict
        self.budgets: list[tuple[EvictionPolicy, StorageIndex]] = []
        self.building: list[str] = []
        self.used_by: dict[str, str] = {}
        self.descriptions: dict[str, str] = {}
        self.disk_roots: list[Path] = []

    def own_budget(self, table: _Table, index: StorageIndex) -> str:
        """An index table's own ``max_size``, if it has one; a description's words for it."""
        budget = table.size("max_size", 0)
        if not budget:
            return ""
        self.budgets.append((EvictionPolicy(budget, evicts=self.evict), index))
        return f" (its own budget {human_size(budget)})"

    def storage(self, table: _Table, key: str) -> Storage:
        """The storage that ``table``'s ``key`` names, built (with what it wraps)."""
        return self._named(table, key, table.text(key))

    def storage_list(self, table: _Table, key: str) -> tuple[list[str], list[Storage]]:
        """The storages that ``table``'s ``key`` names (a list of names), built."""
        names = table.raw(key, _REQUIRED)
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise table.error(key, f"expected a list of storage names, not {names!r}")
        return names, [self._named(table, key, name) for name in names]

    def _named(self, table: _Table, key: str, name: str) -> Storage:
        if name not in self.storages:
            defined = ", ".join(sorted(self.storages)) or "none"
            raise table.error(key, f"no storage named {name!r} (defined: {defined})")
        if name in self.building:
            raise table.error(key, f"storage {name!r} would contain itself")
        if name in self.used_by:
            raise table.error(
                key,
                f"storage {name!r} is already used by {self.used_by[name]}; each storage has"
                " one place in the graph",
            )
        self.used_by[name] = table.where
        return self.build(name)

    def build(self, name: str) -> Storage:
        values = self.storages[name]
        where = f"storage.{name}"
        if not isinstance(values, Mapping):
            raise ConfigurationError(f"{where}: expected a table, not {values!r}")
        table = _Table(where, values, self.base)
        kind = table.text("type")
        builder = _BUILDERS.get(kind)
        if builder is None:
            kinds = ", ".join(sorted(_BUILDERS))
            raise table.error("type", f"unknown storage type {kind!r} (known: {kinds})")
        self.building.append(name)
        storage, description = builder(table, self)
        self.building.pop()
        table.done()
        self.descriptions[name] = description
        return storage

    def describe(self, table: _Table, key: str) -> str:
        return self.descriptions[table.values[key]]

    def describe_list(self, table: _Table, key: str) -> str:
        return ", ".join(self.descriptions[name] for name in table.values[key])


def _disk(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    root = table.path("path")
    graph.disk_roots.append(root)
    fsync = table.flag("fsync", True)
    if table.flag("compress", False):
        if "direct_io_above" in table.values:
            raise table.error("direct_io_above", "compressed files are not written with O_DIRECT")
        return CompressedDiskStorage(root, fsync=fsync), f"zstd files in {root / 'cas-zstd'}"
    storage = DiskStorage(
        root,
        fsync=fsync,
        direct_io_above=table.size("direct_io_above", DEFAULT_DIRECT_IO_ABOVE),
    )
    return storage, f"files in {root / 'cas'}"


def _memory(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    budget = table.size("max_size", 1 << 30)
    return MemoryStorage(budget), f"memory (up to {human_size(budget)})"


def _sqlite_rows(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    path = table.path("path")
    max_blob_size = table.size("max_blob_size", 1024 * 1024)
    storage = SqliteBlobStorage(path, max_blob_size=max_blob_size, fsync=table.flag("fsync", True))
    return storage, str(path)


def _size_differentiated(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    limit = table.size("limit")
    small = graph.storage(table, "small")
    large = graph.storage(table, "large")
    if isinstance(small, SqliteBlobStorage) and small.max_blob_size < limit:
        raise table.error(
            "limit",
            f"{limit} is above the small storage's max_blob_size ({small.max_blob_size})",
        )
    description = (
        f"those up to {human_size(limit)} in {graph.describe(table, 'small')},"
        f" the rest in {graph.describe(table, 'large')}"
    )
    return SizeDifferentiatedStorage(small, large, limit=limit), description


def _read_cache(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    max_bytes = table.size("max_size", 64 << 20)
    max_blob_size = table.size("max_blob_size", 64 << 10)
    inner = graph.storage(table, "storage")
    cache = ReadCacheStorage(inner, max_bytes=max_bytes, max_blob_size=max_blob_size)
    description = (
        f"{graph.describe(table, 'storage')}; reads of blobs up to"
        f" {human_size(cache.max_blob_size)} cached in memory (up to {human_size(max_bytes)})"
    )
    return cache, description


def _sqlite_index(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    path = table.path("path")
    inner = graph.storage(table, "storage")
    index = SqliteIndex(
        inner,
        path,
        fsync=table.flag("fsync", True),
        touch_interval=table.number("touch_interval", 60.0),
    )
    limit = graph.own_budget(table, index)
    return index, f"{graph.describe(table, 'storage')}; index {path}{limit}"


REDIS_SCHEMES: Final = ("redis://", "rediss://", "redis+cluster://", "redis+sentinel://")


def _redis_provider(table: _Table) -> RedisProvider:
    url = table.text("url")
    if not url.startswith(REDIS_SCHEMES):
        raise table.error("url", f"expected a URL starting with {', '.join(REDIS_SCHEMES)}")
    try:
        return RedisProvider(url)
    except ValueError as exc:
        raise table.error("url", str(exc)) from None


def _redis_index(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    provider = _redis_provider(table)
    inner = graph.storage(table, "storage")
    try:
        index = RedisIndex(
            inner,
            provider,
            prefix=table.text("prefix", "asynccas"),
            buckets=table.integer("buckets", None),
            touch_interval=table.number("touch_interval", 60.0),
        )
    except ValueError as exc:
        raise ConfigurationError(f"{table.where}: {exc}") from None
    limit = graph.own_budget(table, index)
    return index, f"{graph.describe(table, 'storage')}; index {provider.display_url}{limit}"


def _remote(table: _Table) -> RemoteStorage:
    """A RemoteStorage from a ``type = "remote"`` table (a storage, or the action cache)."""
    url = table.text("url")
    if not url.startswith(("grpc://", "grpcs://")):
        raise table.error("url", f"expected grpc://HOST:PORT or grpcs://HOST:PORT, not {url!r}")
    instance = table.raw("instance_name", None)
    if instance is not None and not isinstance(instance, str):
        raise table.error("instance_name", f"expected a string, not {instance!r}")
    ca, cert, key = (
        table.path(name) if name in table.values else table.raw(name, None)
        for name in ("tls_ca", "tls_cert", "tls_key")
    )
    try:
        tls = ClientTls(ca, cert, key) if url.startswith("grpcs://") or ca or cert else None
    except ValueError as exc:
        raise table.error("tls_cert", str(exc)) from None
    token = None
    if "token_file" in table.values:
        token_path = table.path("token_file")
        try:
            token = token_path.read_text().strip()
        except OSError as exc:
            raise table.error("token_file", f"cannot read {token_path}: {exc.strerror}") from None
    options = table.raw("channel_options", {})
    if not isinstance(options, Mapping):
        raise table.error("channel_options", f"expected a table, not {options!r}")
    timeout = table.raw("request_timeout", None)
    if timeout is not None:
        timeout = table.number("request_timeout", 1.0)
    try:
        return RemoteStorage(
            url,
            instance_name=instance,
            channel_options=list(options.items()),
            credentials=tls,
            retries=table.integer("retries", 3) or 0,
            max_backoff=table.number("max_backoff", 64.0),
            request_timeout=timeout,
            token=token,
        )
    except ValueError as exc:
        raise ConfigurationError(f"{table.where}: {exc}") from None


_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _s3(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    bucket = table.raw("bucket", _REQUIRED)
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        raise table.error(
            "bucket", f"expected an S3 bucket name (3-63 of a-z 0-9 . -), not {bucket!r}"
        )
    optional = {}
    for key, option in (
        ("endpoint", "endpoint_url"), ("region", "region"),
        ("access_key_id", "access_key_id"), ("secret_access_key", "secret_access_key"),
    ):  # fmt: skip
        if key in table.values:
            optional[option] = table.text(key)
    prefix = table.raw("prefix", "")
    if not isinstance(prefix, str):
        raise table.error("prefix", f"expected a string, not {prefix!r}")
    storage = S3Storage(
        bucket,
        prefix=prefix,
        create_bucket=table.flag("create_bucket", False),
        max_requests=table.integer("max_requests", 32) or 32,
        part_size=table.size("part_size", 8 * 1024 * 1024),
        buffer_bytes=table.size("buffer_size", 512 * 1024 * 1024),
        request_timeout=table.number("request_timeout", 60.0),
        attempts=table.integer("attempts", 3) or 3,
        **optional,
    )
    return storage, f"objects in {storage.where}"


def _remote_storage(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    remote = _remote(table)
    return remote, f"the remote CAS {remote.remote}"


def _with_cache(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    fast = graph.storage(table, "fast")
    slow = graph.storage(table, "slow")
    write_behind = table.flag("write_behind", False)
    queue_size = table.integer("queue_size", 10_000) or 10_000
    storage = WithCacheStorage(fast, slow, write_behind=write_behind, queue_size=queue_size)
    writes = "queued to it" if write_behind else "written through"
    description = (
        f"{graph.describe(table, 'fast')}, in front of {graph.describe(table, 'slow')}"
        f" (uploads {writes})"
    )
    return storage, description


def _existence_cache(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    inner = graph.storage(table, "storage")
    ttl = table.number("ttl", 300.0)
    entries = table.integer("max_entries", 1_000_000) or 1_000_000
    storage = ExistenceCacheStorage(inner, ttl=ttl, max_entries=entries)
    description = f"{graph.describe(table, 'storage')}; blobs found there trusted for {ttl:g} s"
    return storage, description


def _sharded(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    names, shards = graph.storage_list(table, "shards")
    weights = table.raw("weights", [1] * len(names))
    if (
        not isinstance(weights, list)
        or len(weights) != len(names)
        or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)
    ):
        raise table.error("weights", f"expected {len(names)} numbers, one per shard")
    try:
        storage = ShardedStorage(shards, names, [float(w) for w in weights])
    except ValueError as exc:
        raise table.error("weights", str(exc)) from None
    return storage, f"sharded over {graph.describe_list(table, 'shards')}"


def _mirrored(table: _Table, graph: _Graph) -> tuple[Storage, str]:
    _, sides = graph.storage_list(table, "sides")
    if len(sides) != 2:
        raise table.error("sides", f"a mirror has two sides, not {len(sides)}")
    return MirroredStorage(*sides), f"mirrored in {graph.describe_list(table, 'sides')}"


_BUILDERS: Final[Mapping[str, Callable[[_Table, _Graph], tuple[Storage, str]]]] = {
    "disk": _disk,
    "memory": _memory,
    "sqlite-rows": _sqlite_rows,
    "size-differentiated": _size_differentiated,
    "sqlite-index": _sqlite_index,
    "read-cache": _read_cache,
    "redis-index": _redis_index,
    "remote": _remote_storage,
    "s3": _s3,
    "with-cache": _with_cache,
    "existence-cache": _existence_cache,
    "sharded": _sharded,
    "mirrored": _mirrored,
}


def build(config: Mapping[str, Any], base: Path, *, evict: bool = True) -> Deployment:
    """The deployment a parsed configuration describes (nothing is started or opened yet).

    ``evict=False`` makes the eviction policy only measure (a server's extra workers: the
    first process evicts for all of them)."""
    top = _Table("config", config, base)
    storages = top.raw("storage", {})
    if not isinstance(storages, Mapping) or not storages:
        raise ConfigurationError("config: define at least one [storage.NAME] table")
    graph = _Graph(storages, base, evict=evict)
    cas = graph.storage(top, "cas") if "cas" in config else _only_storage(graph, storages)
    unused = sorted(set(storages) - set(graph.used_by))
    if unused:
        raise ConfigurationError(
            f"storage.{unused[0]}: defined but not part of the cas graph (remove it)"
        )
    action_cache, results = _action_cache(top, base)
    name = top.values.get("cas") or next(iter(storages))
    cas, isolation = _isolation(top, base, cas, graph.descriptions[name])
    budget = top.size("max_size", 0) or None
    top.done()
    eviction = None
    index = innermost(cas, StorageIndex)
    assert index is None or isinstance(index, StorageIndex)
    if budget is not None:
        if index is None:
            raise top.error(
                "max_size",
                "eviction works through an index: make the cas a sqlite-index or redis-index"
                " (a memory storage takes its own max_size)",
            )
        if any(inner is index for _, inner in graph.budgets):
            raise top.error(
                "max_size", "the index it applies to has a max_size of its own: keep one of them"
            )
        eviction = EvictionPolicy(budget, evicts=evict)
    limit = f" (budget {human_size(budget)})" if budget else ""
    description = f"blobs: {graph.descriptions[name]}{limit}{isolation}; action cache: {results}"
    return Deployment(
        cas, action_cache, eviction, description, graph.disk_roots, index, graph.budgets
    )


def _isolation(top: _Table, base: Path, cas: Storage, where: str) -> tuple[Storage, str]:
    """The cas as the ``isolation`` key says: shared by every instance (as it is), or kept
    per instance over one copy of each blob, with a ``[blob_info]`` cache of who holds what."""
    isolation = top.raw("isolation", "shared")
    if isolation == "shared":
        if "blob_info" in top.values:
            raise top.error(
                "blob_info", 'only per-instance isolation uses it: isolation = "per-instance"'
            )
        return cas, ""
    if isolation != "per-instance":
        raise top.error("isolation", f'expected "shared" or "per-instance", not {isolation!r}')
    table = top.table("blob_info", {"type": "memory"})
    kind = table.text("type")
    info: BlobInfoCache
    if kind == "memory":
        info = MemoryBlobInfo(table.integer("max_entries", 1_000_000) or 1_000_000)
        held = "in memory"
    elif kind == "sqlite":
        path = table.path("path")
        info = SqliteBlobInfo(path, fsync=table.flag("fsync", True))
        held = f"in {path}"
    elif kind == "redis":
        provider = _redis_provider(table)
        info = RedisBlobInfo(provider, prefix=table.text("prefix", "asynccas"))
        held = f"in Redis at {provider.display_url}"
    else:
        raise table.error("type", f"unknown blob_info type {kind!r} (known: memory, sqlite, redis)")
    table.done()
    return PerInstanceStorage(cas, info, location=where), f"; kept per instance ({held})"


def _only_storage(graph: _Graph, storages: Mapping[str, Any]) -> Storage:
    if len(storages) != 1:
        raise ConfigurationError(
            "config: 'cas' is missing: name the storage the CAS is (one of "
            f"{', '.join(sorted(storages))})"
        )
    (name,) = storages
    graph.used_by[name] = "cas"
    return graph.build(name)


def _action_cache(top: _Table, base: Path) -> tuple[ActionCacheStore, str]:
    table = top.table("action_cache", {"type": "memory"})
    kind = table.text("type")
    store: ActionCacheStore
    if kind == "memory":
        entries = table.integer("max_entries", 100_000) or 100_000
        store, description = MemoryActionCache(entries), "memory"
    elif kind == "sqlite":
        path = table.path("path")
        entries = table.integer("max_entries", 1_000_000) or 1_000_000
        store, description = SqliteActionCache(path, entries), str(path)
    elif kind == "remote":
        remote = _remote(table)
        hit_ttl = table.raw("hit_ttl", 0)
        if isinstance(hit_ttl, bool) or not isinstance(hit_ttl, int | float) or hit_ttl < 0:
            raise table.error("hit_ttl", f"expected seconds (0: ask every time), not {hit_ttl!r}")
        store = RemoteActionCache(remote, hit_ttl=float(hit_ttl))
        kept = f"; hits kept {hit_ttl:g} s" if hit_ttl else ""
        description = f"the remote {remote.remote}{kept}"
    elif kind == "redis":
        provider = _redis_provider(table)
        ttl = table.raw("ttl", 7 * 86400)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
            raise table.error("ttl", f"expected seconds (0: results never expire), not {ttl!r}")
        store = RedisActionCache(
            provider,
            prefix=table.text("prefix", "asynccas"),
            ttl=ttl or None,
            buckets=table.integer("buckets", None),
        )
        description = f"Redis at {provider.display_url}"
    else:
        raise table.error(
            "type", f"unknown action cache type {kind!r} (known: memory, sqlite, remote, redis)"
        )
    table.done()
    return store, description


def load(path: Path, *, evict: bool = True) -> Deployment:
    """Read and build a configuration file (blocking: a small file, read once at start)."""
    try:
        with path.open("rb") as file:
            config = tomllib.load(file)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    try:
        return build(config, path.resolve().parent, evict=evict)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
