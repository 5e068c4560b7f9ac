"""The ``asynccas`` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import grpc

from asynccas import config, metrics
from asynccas.allocator import keep_freed_memory
from asynccas.auth import AccessPolicy, JwtVerifier, TokenFile, new_token
from asynccas.bench.cli import add_bench_commands, run_bench, run_report
from asynccas.client.commands import add_cas_commands, run_cas_command
from asynccas.config import human_size
from asynccas.errors import CasError, ConfigurationError
from asynccas.server.app import DEFAULT_MAX_BATCH_BYTES, CasServer
from asynccas.storage.base import Listable, require
from asynccas.storage.blob_info import MemoryBlobInfo
from asynccas.storage.disk import DEFAULT_DIRECT_IO_ABOVE
from asynccas.storage.forwarding import innermost
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.per_instance import PerInstanceStorage
from asynccas.storage.sqlite_rows import recorded_max_blob_size
from asynccas.threads import in_thread
from asynccas.transport import ServerTls

logger = logging.getLogger("asynccas")

_MEMORY_DEFAULT_BYTES = 1 << 30
SMALL_BLOBS_FILE = "small-blobs.sqlite"
# Per process; in the bazel-traffic loads it made 8 KiB reads ~20% and downloading builds
# actions ~15% faster (a hit costs no thread hop).
DEFAULT_READ_CACHE = 64 << 20
# Bazel's blobs are mostly 1-64 KiB; up to here, one SQLite row beats one file each.
DEFAULT_SMALL_BLOB_LIMIT = 64 * 1024


def parse_size(text: str) -> int:
    """``1048576``, ``512M``, ``1.5G``, ``2GiB`` -> bytes (suffixes are powers of 1024)."""
    try:
        return config.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_data_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "asynccas"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asynccas", description=__doc__)
    parser.add_argument("--version", action="version", version=f"asynccas {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the REAPI cache (CAS, ByteStream, ActionCache, Capabilities)",
        description="Serve a REAPI remote cache. With no flags: disk storage and a SQLite index"
        " under $XDG_CACHE_HOME/asynccas, listening on 127.0.0.1:50051.",
    )
    serve.add_argument(
        "--address",
        type=_address,
        default="127.0.0.1:50051",
        help="HOST:PORT to listen on; port 0 picks a free one (default 127.0.0.1:50051)",
    )
    serve.add_argument(
        "--data-dir", type=Path, default=None, help="where disk blobs and SQLite files live"
    )
    serve.add_argument("--storage", choices=("disk", "memory"), default="disk")
    _add_index_argument(serve)
    _add_config_argument(serve)
    serve.add_argument(
        "--max-size",
        type=parse_size,
        default=None,
        help="byte budget (e.g. 20G); least recently used blobs are evicted beyond it"
        f" (memory storage default: {human_size(_MEMORY_DEFAULT_BYTES)}; disk: unbounded)",
    )
    serve.add_argument(
        "--compress-at-rest",
        action="store_true",
        help="keep disk blobs (those above the small-blob limit) zstd-compressed: build outputs"
        " take about a third of the disk, compressed reads cost no compression work; blobs"
        " stored before stay where they are, uncompressed and unseen, so choose it for a new"
        " data directory",
    )
    serve.add_argument(
        "--isolation",
        choices=("shared", "per-instance"),
        default="shared",
        help="'shared' (default): every instance sees every blob; 'per-instance': a blob"
        " uploaded under one instance is missing in the others until they upload it too"
        " (costing them a hash, not a second copy); who holds what is kept in Redis with a"
        " Redis --index, else in DATA_DIR/blob-info.sqlite (in memory with --storage memory)",
    )
    serve.add_argument(
        "--upstream",
        default=None,
        metavar="grpc://HOST:PORT",
        help="be a caching proxy of this REAPI server: blobs are kept in the local storage"
        " (as the other flags describe) in front of it, existence checks it answered are"
        " remembered for 5 minutes, and action results are its own (more in the README)",
    )
    serve.add_argument(
        "--read-cache",
        type=parse_size,
        default=DEFAULT_READ_CACHE,
        metavar="BYTES",
        help="keep recently read disk blobs of up to 64 KiB in memory, up to this many bytes"
        f" per process; 0 turns it off (default {human_size(DEFAULT_READ_CACHE)})",
    )
    serve.add_argument(
        "--max-blob-size",
        type=parse_size,
        default=0,
        metavar="BYTES",
        help="refuse uploads of larger blobs (INVALID_ARGUMENT, advertised to clients as"
        " max_cas_blob_size_bytes); default: no limit beyond the byte budget, since a blob"
        " larger than the whole budget could never be kept",
    )
    serve.add_argument(
        "--max-batch-size",
        type=parse_size,
        default=DEFAULT_MAX_BATCH_BYTES,
        help="max_batch_total_size_bytes advertised to clients (default 4M)",
    )
    serve.add_argument(
        "--small-blob-limit",
        type=parse_size,
        default=None,
        help=f"keep disk blobs up to this size inline in DATA_DIR/{SMALL_BLOBS_FILE} instead of"
        " one file each, which is much faster for small blobs; 0 for one file per blob."
        " Set once, when a data directory is new: later starts read it from the directory"
        f" (default: {human_size(DEFAULT_SMALL_BLOB_LIMIT)} for a new data directory; an existing"
        " one keeps its layout)",
    )
    serve.add_argument(
        "--direct-io-above",
        type=parse_size,
        default=DEFAULT_DIRECT_IO_ABOVE,
        help="write disk blobs larger than this around the page cache with O_DIRECT, so that"
        " streaming them neither evicts hot small blobs nor pays for fresh cache pages;"
        " 0 turns it off (default 16M)",
    )
    serve.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync of blobs and SQLite databases (faster; a power loss may lose recent"
        " blobs, and `asynccas reindex` may be needed)",
    )
    serve.add_argument(
        "--no-ac-check",
        action="store_true",
        help="serve action results even if their output blobs are gone from the CAS",
    )
    serve.add_argument(
        "--max-uploads",
        type=_positive,
        default=1000,
        help="ByteStream uploads streaming at once per process; more get RESOURCE_EXHAUSTED"
        " and are retried by clients (default 1000)",
    )
    serve.add_argument(
        "--upload-stall-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="abandon an upload stream that sends nothing for this long (default 120)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="server processes sharing the address (SO_REUSEPORT) and the store; one per core",
    )
    # Set on the extra worker processes that --workers starts; only the first evicts. The
    # parent's pid lets a worker notice that its parent is gone and exit with it.
    serve.add_argument("--extra-worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    security = serve.add_argument_group(
        "TLS and authentication",
        "Without these, anyone who reaches the address may read and write. See the README.",
    )
    security.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate chain"
    )
    security.add_argument(
        "--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert"
    )
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    security.add_argument(
        "--auth-tokens",
        type=Path,
        metavar="TOML",
        help="require bearer tokens listed (by SHA-256) in this file, each with the instances it"
        " may read and write; re-read when it changes. `asynccas token` makes entries",
    )
    security.add_argument(
        "--auth-jwks",
        type=Path,
        metavar="JSON",
        help="accept JWTs signed by a key of this JWKS file; rights in their 'asynccas' claim",
    )
    security.add_argument("--auth-jwt-issuer", metavar="ISS", help="the 'iss' JWTs must carry")
    security.add_argument("--auth-jwt-audience", metavar="AUD", help="the 'aud' JWTs must carry")
    security.add_argument(
        "--anonymous-reads",
        action="store_true",
        help="with --auth-tokens/--auth-jwks: callers without a token may read, not write",
    )
    operations = serve.add_argument_group("monitoring")
    operations.add_argument(
        "--metrics-address",
        type=_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (all --workers summed)",
    )
    operations.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per RPC: peer, caller, instance, method, status, bytes, duration",
    )
    _add_log_level_argument(serve)
    reindex = commands.add_parser(
        "reindex",
        help="rebuild the index of a disk store from the blobs it holds",
        description="Index every blob of DATA_DIR (files under cas/ and rows of"
        f" {SMALL_BLOBS_FILE}) and drop index entries whose blobs are gone. Safe to run while"
        " servers use the same store.",
    )
    reindex.add_argument("--data-dir", type=Path, default=None)
    _add_index_argument(reindex)
    _add_config_argument(reindex)
    reindex.add_argument(
        "--small-blob-limit",
        type=parse_size,
        default=None,
        help="only for a data directory made before asynccas recorded it: the"
        f" --small-blob-limit its servers use (their small blobs live in {SMALL_BLOBS_FILE})",
    )
    _add_log_level_argument(reindex)
    token = commands.add_parser(
        "token",
        help="make a bearer token and its --auth-tokens entry",
        description="Print a tokens-file entry (append it to the --auth-tokens file) on standard"
        " output and the new token, to give to the client, on standard error. The file holds"
        " only the token's SHA-256.",
    )
    token.add_argument("name", help="who the token is for: shown in logs and errors")
    token.add_argument("--read", action="append", default=[], metavar="INSTANCE",
                       help="an instance name it may read; `team/*` for a prefix, `*` for all;"
                            " repeatable")  # fmt: skip
    token.add_argument("--write", action="append", default=[], metavar="INSTANCE",
                       help="an instance it may write (and read); repeatable")  # fmt: skip
    add_cas_commands(commands)
    add_bench_commands(commands, parse_size)
    return parser


def _add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="DEBUG, INFO, WARNING or ERROR, in any case (default INFO)",
    )


def _address(text: str) -> str:
    """HOST:PORT with a port grpc can bind (it took 99999 as 34463 and an empty port as 443)."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT with a port from 0 to 65535 (0 picks a free one)"
        )
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("asynccas")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="a TOML file naming the storages and how they compose, instead of --data-dir,"
        " --storage, --index, --max-size, --small-blob-limit, --no-fsync, --direct-io-above and"
        " --read-cache"
        " (examples in the README)",
    )


# The flags a --config file replaces, with their defaults.
_STORAGE_FLAGS = {
    "data_dir": None,
    "storage": "disk",
    "index": "sqlite",
    "max_size": None,
    "small_blob_limit": None,
    "no_fsync": False,
    "direct_io_above": DEFAULT_DIRECT_IO_ABOVE,
    "read_cache": DEFAULT_READ_CACHE,
    "upstream": None,
    "compress_at_rest": False,
    "isolation": "shared",
}


def _check_config_alone(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.config is None:
        return
    for dest, default in _STORAGE_FLAGS.items():
        if getattr(args, dest, default) != default:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} and --config do not go together: the file describes the storage")


def _add_index_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index",
        default="sqlite",
        metavar="sqlite|REDIS_URL",
        help="where disk blob metadata lives: 'sqlite' (DATA_DIR/index.sqlite, default) or"
        " redis://HOST:PORT/DB, rediss://..., redis+cluster://HOST:PORT[,HOST:PORT],"
        " redis+sentinel://HOST:PORT/SERVICE",
    )


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or default_data_dir()).expanduser().resolve()


def _index_table(args: argparse.Namespace, data_dir: Path, storage: str) -> dict[str, Any]:
    if args.index == "sqlite":
        fsync = not getattr(args, "no_fsync", False)  # reindex has no such option
        path = str(data_dir / "index.sqlite")
        return {"type": "sqlite-index", "path": path, "fsync": fsync, "storage": storage}
    if args.index.startswith(config.REDIS_SCHEMES):
        return {"type": "redis-index", "url": args.index, "storage": storage}
    raise CasError(f"--index {args.index!r} is neither 'sqlite' nor a redis URL")


def _disk_tables(args: argparse.Namespace, data_dir: Path, small_blob_limit: int) -> dict[str, Any]:
    """The storages of a data directory: files, plus the small-blob tier if it has one; the
    one named "blobs" holds them all."""
    fsync = not getattr(args, "no_fsync", False)  # reindex has no such option
    files: dict[str, Any] = {"type": "disk", "path": str(data_dir), "fsync": fsync}
    if getattr(args, "compress_at_rest", False):
        files["compress"] = True
    else:
        files["direct_io_above"] = getattr(args, "direct_io_above", DEFAULT_DIRECT_IO_ABOVE)
    if not small_blob_limit:
        return {"blobs": files}
    return {
        "blobs": {
            "type": "size-differentiated",
            "limit": small_blob_limit,
            "small": "rows",
            "large": "files",
        },
        "rows": {
            "type": "sqlite-rows",
            "path": str(data_dir / SMALL_BLOBS_FILE),
            "max_blob_size": small_blob_limit,
            "fsync": fsync,
        },
        "files": files,
    }


async def shorthand_config(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration that the serve flags stand for (what ``--config`` would say)."""
    if args.storage == "memory":
        if args.index != "sqlite":
            raise CasError("--index applies to disk storage; memory storage needs no index")
        budget = args.max_size or _MEMORY_DEFAULT_BYTES
        local: dict[str, Any] = {
            "cas": "blobs",
            "storage": {"blobs": {"type": "memory", "max_size": budget}},
            "action_cache": {"type": "memory"},
        }
    else:
        data_dir = await in_thread(_data_dir, args)
        small_blob_limit = await _small_blob_limit(args, data_dir)
        local = {
            "cas": "index",
            "max_size": args.max_size or 0,
            "storage": {
                "index": _index_table(args, data_dir, "blobs"),
                **_disk_tables(args, data_dir, small_blob_limit),
            },
            "action_cache": {"type": "sqlite", "path": str(data_dir / "action-cache.sqlite")},
        }
    upstream = getattr(args, "upstream", None)  # reindex has no such option
    if upstream:
        _in_front_of(local, upstream)
    read_cache = getattr(args, "read_cache", 0)
    if read_cache and args.storage != "memory":
        top = local["cas"]
        local["storage"]["cache"] = {"type": "read-cache", "max_size": read_cache, "storage": top}
        local["cas"] = "cache"
    if getattr(args, "isolation", "shared") == "per-instance":
        local["isolation"] = "per-instance"
        if args.index.startswith(config.REDIS_SCHEMES):  # shared by the frontends the index is
            local["blob_info"] = {"type": "redis", "url": args.index}
        elif args.storage != "memory":  # kept with the data, across restarts
            path = str(await in_thread(_data_dir, args) / "blob-info.sqlite")
            local["blob_info"] = {"type": "sqlite", "path": path, "fsync": not args.no_fsync}
    return local


def _in_front_of(local: dict[str, Any], upstream: str) -> None:
    """Make the ``local`` configuration a caching proxy of ``upstream`` (``--upstream``)."""
    # Six retries back off for about 6 s in all: an upstream that restarts is waited for.
    remote = {"type": "remote", "url": upstream, "retries": 6, "request_timeout": 60}
    local["storage"].update(
        {
            "upstream": remote,
            "known": {"type": "existence-cache", "storage": "upstream", "ttl": 300},
            "proxy": {"type": "with-cache", "fast": local["cas"], "slow": "known"},
        }
    )
    local["cas"] = "proxy"
    # Hits answered locally for a minute: a warm build asks for every action's result.
    local["action_cache"] = {**remote, "hit_ttl": 60}


async def _deployment(args: argparse.Namespace) -> config.Deployment:
    evict = not getattr(args, "extra_worker", False)  # the first process evicts for all
    if args.config is not None:
        return await in_thread(config.load, args.config, evict=evict)
    return config.build(await shorthand_config(args), Path.cwd(), evict=evict)


def _max_blob_size(asked: int, deployment: config.Deployment) -> int:
    """``--max-blob-size``, and never more than the byte budget (0: no limit at all)."""
    budgets = [asked] if asked else []
    if deployment.eviction is not None:
        budgets.append(deployment.eviction.max_bytes)
    memory = innermost(deployment.cas, MemoryStorage)
    if isinstance(memory, MemoryStorage):
        budgets.append(memory.max_bytes)
    return min(budgets, default=0)


def _access_policy(args: argparse.Namespace) -> AccessPolicy | None:
    if args.auth_tokens is None and args.auth_jwks is None:
        return None
    jwt = None
    if args.auth_jwks is not None:
        jwt = JwtVerifier(
            args.auth_jwks, issuer=args.auth_jwt_issuer, audience=args.auth_jwt_audience
        )
    tokens = TokenFile(args.auth_tokens) if args.auth_tokens is not None else None
    return AccessPolicy(tokens=tokens, jwt=jwt, anonymous_reads=args.anonymous_reads)


async def serve(args: argparse.Namespace) -> None:
    first = not args.extra_worker
    if first and args.workers > 1:
        await in_thread(_check_port_is_free, args.address)
    deployment = await _deployment(args)
    storage, action_cache = deployment.cas, deployment.action_cache
    if (
        isinstance(storage, PerInstanceStorage)
        and isinstance(storage.info, MemoryBlobInfo)
        and args.workers > 1
    ):
        raise ConfigurationError(
            "a memory blob_info cannot be shared by --workers: each process would know only"
            ' the blobs uploaded through it (use type = "sqlite" or "redis")'
        )
    if isinstance(storage, MemoryStorage) and args.workers > 1:
        raise ConfigurationError(
            "a memory storage cannot be shared by --workers: each process would keep a store"
            " of its own and answer for it alone"
        )
    eviction, where = deployment.eviction, deployment.description
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    server = CasServer(
        storage,
        action_cache,
        address=args.address,
        max_batch_total_size_bytes=args.max_batch_size,
        check_action_results=not args.no_ac_check,
        stream_idle_timeout=args.upload_stall_timeout,
        max_active_uploads=args.max_uploads,
        tls=tls,
        access=_access_policy(args),
        count_metrics=args.metrics_address is not None,
        access_log=args.access_log,
        reuse_port=args.workers > 1,
        max_blob_size=_max_blob_size(args.max_blob_size, deployment),
    )
    metrics_server = None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with server, anyio.create_task_group() as tasks:
            if eviction is not None and deployment.index is not None:
                tasks.start_soon(eviction.run, deployment.index, action_cache)
            for inner_eviction, inner_index in deployment.inner_budgets:
                tasks.start_soon(inner_eviction.run, inner_index)
            if args.parent_pid is not None:
                tasks.start_soon(_exit_with_parent, args.parent_pid)
            if first:
                if args.metrics_address is not None:
                    host, port = args.metrics_address.rsplit(":", 1)
                    metrics_server, port = await in_thread(_serve_metrics, host, int(port))
                    where += f"; metrics on http://{host}:{port}/metrics"
                    if deployment.index is not None:
                        tasks.start_soon(metrics.sample_store_size, deployment.index.get_total_size)
                workers = f" with {args.workers} workers" if args.workers > 1 else ""
                scheme = "grpcs" if tls is not None else "grpc"
                logger.info(
                    "asynccas listening on %s%s; %s",
                    f"{scheme}://{server.target}" if tls else server.target, workers, where,
                )  # fmt: skip
                if args.workers > 1:
                    tasks.start_soon(_supervise_workers, args, server.target)
            try:
                async for signum in signals:
                    logger.info("received %s; shutting down", signal.Signals(signum).name)
                    tasks.cancel_scope.cancel()
                    break
            finally:
                if metrics_server is not None:
                    metrics_server.shutdown()
                    metrics_server.server_close()


def _check_port_is_free(address: str) -> None:
    """Fail unless ``address`` is free: the workers of one server share their port
    (SO_REUSEPORT), which would otherwise let a second server join the first one's port."""
    host, port = address.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise OSError(f"could not listen on {address}: {exc.strerror or exc}") from None


def _serve_metrics(host: str, port: int) -> tuple[Any, int]:
    try:
        return metrics.start_http_server(host, port)
    except OSError as exc:
        raise OSError(f"could not serve metrics on {host}:{port}: {exc.strerror or exc}") from None


async def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose parent died (even by SIGKILL) stops serving: orphans would keep the
    port, answering for a server that is gone."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - no event tells of a parent's death
        await anyio.sleep(1.0)
    logger.error("the asynccas parent process %d is gone; this worker stops", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


WORKER_RESTART_DELAY_MAX = 30.0


async def _supervise_workers(args: argparse.Namespace, target: str) -> None:
    """Start the extra workers on the port the first one listens on; restart any that die."""
    command = [
        sys.executable, "-m", "asynccas.cli", *args.own_argv,
        "--address", target, "--extra-worker", "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    workers: list[subprocess.Popen[bytes]] = []
    delays = [0.0] * (args.workers - 1)
    try:
        for _ in range(args.workers - 1):
            workers.append(await in_thread(subprocess.Popen, command))
        while True:
            await anyio.sleep(0.5)
            for number, worker in enumerate(workers):
                code = worker.poll()
                if code is None:
                    continue
                metrics.worker_exited(worker.pid)
                delays[number] = min(max(1.0, 2 * delays[number]), WORKER_RESTART_DELAY_MAX)
                logger.error(
                    "worker %d (pid %d) exited with status %d; restarting it in %.0f s",
                    number + 2, worker.pid, code, delays[number],
                )  # fmt: skip
                await anyio.sleep(delays[number])
                workers[number] = await in_thread(subprocess.Popen, command)
    finally:
        with anyio.CancelScope(shield=True):
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
            for worker in workers:
                await in_thread(worker.wait)


async def reindex(args: argparse.Namespace) -> None:
    if args.config is None:
        args.storage = "disk"
        args.max_size = None
    deployment = await _deployment(args)
    index = deployment.index
    if index is None:
        raise ConfigurationError(
            "reindex rebuilds an index: the cas is not a sqlite or redis index"
        )
    require(index, Listable, "reindex (it lists what storage holds)")
    for root in deployment.disk_roots:
        if not await in_thread(_is_data_dir, root):
            # Reindexing drops every index entry whose blob the directory lacks: a mistyped
            # path would empty a shared Redis index.
            raise CasError(
                f"{root} is not an asynccas data directory (it has no cas/ and no"
                f" {SMALL_BLOBS_FILE}); check --data-dir: reindexing it would drop every"
                " entry of the index"
            )
    async with index:
        listed, dropped = await index.reindex(index.list_blobs())
    logger.info("reindexed %s: %d blobs indexed, %d stale entries dropped",
                deployment.description, listed, dropped)  # fmt: skip


async def _small_blob_limit(args: argparse.Namespace, data_dir: Path) -> int:
    """The small-blob tier's limit in ``data_dir`` (0: one file per blob), as recorded there.

    A blob's tier follows from its size and this limit, so the limit is fixed for the life of
    a data directory: another one would hide blobs already stored.
    """
    asked: int | None = args.small_blob_limit
    tier = data_dir / SMALL_BLOBS_FILE
    if await anyio.Path(tier).exists():
        recorded = await anyio.to_thread.run_sync(recorded_max_blob_size, tier)
        if recorded is None:  # made before the limit was recorded: the caller must say
            if not asked:
                raise CasError(
                    f"{tier} holds blobs of the small-blob tier: pass the --small-blob-limit"
                    " that the servers use (once; it is recorded from then on)"
                )
            return asked
        if asked is not None and asked != recorded:
            raise CasError(
                f"{data_dir} keeps blobs of up to {human_size(recorded)} in {SMALL_BLOBS_FILE};"
                f" --small-blob-limit {human_size(asked)} would hide some of them: leave it out"
            )
        return recorded
    holds_files = await anyio.to_thread.run_sync(_holds_blob_files, data_dir)
    if asked is None:  # new directories get the tier; existing ones keep one file per blob
        return 0 if holds_files else DEFAULT_SMALL_BLOB_LIMIT
    if asked and holds_files:
        raise CasError(
            f"{data_dir} already keeps its blobs one file each; the small-blob tier can only be"
            " chosen for a new data directory (the files of small blobs would be hidden)"
        )
    return asked


def _is_data_dir(data_dir: Path) -> bool:
    return (data_dir / "cas").is_dir() or (data_dir / SMALL_BLOBS_FILE).is_file()


def _holds_blob_files(data_dir: Path) -> bool:
    """Whether the disk store in ``data_dir`` has stored any blob (CAS/<function>/<xx>/...)."""
    try:
        with os.scandir(data_dir / "cas") as entries:
            functions = [entry.path for entry in entries if entry.is_dir()]
    except FileNotFoundError:
        return False
    for function in functions:
        with os.scandir(function) as prefixes:
            if next(prefixes, None) is not None:
                return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:2] == ["bench", "report"]:  # its own parser, so that its --help is its own
        return run_report(given[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("serve", "reindex"):
        _check_config_alone(parser, args)
    if args.command == "serve":
        _check_serve_arguments(parser, args)
    if args.command == "token":
        if not args.read and not args.write:
            parser.error("give the token some right: --read INSTANCE or --write INSTANCE")
        secret, entry = new_token(args.name, args.read, args.write)
        print(entry, end="")
        print(f"token for {args.name}: {secret}", file=sys.stderr)
        return 0
    keep_freed_memory()  # every command streams blobs
    if args.command == "cas":
        return _run_cas(args)
    if args.command == "bench":
        return run_bench(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = serve if args.command == "serve" else reindex
    args.own_argv = list(sys.argv[1:] if argv is None else argv)
    metrics_dir = None
    serving_metrics = args.command == "serve" and args.metrics_address
    # With workers, each process counts into files the first one sums; the workers inherit
    # the directory through the environment.
    if serving_metrics and args.workers > 1 and not args.extra_worker:
        metrics_dir = Path(tempfile.mkdtemp(prefix="asynccas-metrics-"))
        metrics.prepare_multiprocess(metrics_dir)
    try:
        anyio.run(command, args, backend_options={"use_uvloop": True})
    except (OSError, CasError, ValueError) as exc:
        logger.error("cannot %s: %s", args.command, exc)
        return 1
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _check_serve_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.storage == "memory" and args.workers > 1:
        parser.error(
            "--storage memory cannot be shared by --workers: each process would keep a store"
            " of its own and answer for it alone"
        )
    if args.upstream is not None and not args.upstream.startswith(("grpc://", "grpcs://")):
        parser.error(
            f"--upstream takes grpc://HOST:PORT or grpcs://HOST:PORT, not {args.upstream!r}"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if args.anonymous_reads and args.auth_tokens is None and args.auth_jwks is None:
        parser.error("--anonymous-reads only means something with --auth-tokens or --auth-jwks")
    if (args.auth_jwt_issuer or args.auth_jwt_audience) and args.auth_jwks is None:
        parser.error("--auth-jwt-issuer and --auth-jwt-audience need --auth-jwks")


def _run_cas(args: argparse.Namespace) -> int:
    try:
        return int(anyio.run(run_cas_command, args, backend_options={"use_uvloop": True}))
    except CasError as exc:
        print(f"asynccas cas {args.verb}: {exc}", file=sys.stderr)
    except grpc.aio.AioRpcError as exc:
        print(
            f"asynccas cas {args.verb}: {args.endpoint} answered {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
    except OSError as exc:
        print(f"asynccas cas {args.verb}: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
