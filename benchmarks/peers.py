"""The peers asynccas is measured against and tested with, run as real processes: BuildGrid
0.4.4 from PyPI, installed into a throw-away virtual environment (never one of asynccas's
dependencies), serving CAS, ByteStream and ActionCache on disk over a Redis index, or all in
memory."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.redis_servers import RedisServer, free_port

BUILDGRID_VERSION = "buildgrid[redis]==0.4.4"
BUILDGRID_VENV = Path(__file__).parent / ".venv-buildgrid"

BUILDGRID_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
thread-pool-size: 20
{stores}
instances:
  - name: [""]
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
"""
# BuildGrid 0.4.4's SQL index refuses SQLite (it wants PostgreSQL), so disk + Redis is its
# nearest match for asynccas's disk + SQLite index.
BUILDGRID_STORES = {
    "redis": """\
connections:
  - !redis-connection &redis
    host: "127.0.0.1"
    port: {redis_port}
    db: 0
storages:
  - !disk-storage &disk
    path: "{data}/cas"
  - !redis-index &cas
    storage: *disk
    redis: *redis
    prefix: "B"
caches:
  - !redis-action-cache &ac
    storage: *cas
    redis: *redis
    allow-updates: true
    cache-failed-actions: true
    entry-type: action-result-digest""",
    "memory": """\
storages:
  - !lru-storage &cas
    size: 8192M
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true""",
}


def ensure_buildgrid() -> Path:
    """A throw-away virtual environment holding BuildGrid, outside asynccas's dependencies."""
    bgd = BUILDGRID_VENV / "bin" / "bgd"
    if not bgd.exists():
        print(f"installing {BUILDGRID_VERSION} into {BUILDGRID_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BUILDGRID_VENV)], check=True)
        subprocess.run(
            [str(BUILDGRID_VENV / "bin" / "pip"), "install", "-q", BUILDGRID_VERSION], check=True
        )
    return bgd


def wait_for_port(port: int, timeout: float = 60.0, *, listeners: int = 1) -> None:
    """Wait until ``listeners`` sockets listen on ``port``: with ``serve --workers N`` each
    worker binds its own (SO_REUSEPORT), and a connection made before the last one binds
    can only go to those already listening."""
    deadline = time.monotonic() + timeout
    while listening_sockets(port) < listeners:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{listening_sockets(port)} of {listeners} listeners are up on port {port}"
            )
        time.sleep(0.1)


def listening_sockets(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)  # the header
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port  # LISTEN
    return count


@contextmanager
def process(
    args: list[str], log: Path, port: int, *, listeners: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, listeners=listeners)
            yield child
        finally:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@dataclass
class Target:
    address: str
    server_pid: int
    redis_pid: int | None
    other_server_pids: tuple[int, ...] = ()
    """Further server processes on the same address that are not children of ``server_pid``."""


@contextmanager
def buildgrid_server(work: Path, processes: int = 1, *, storage: str = "redis") -> Iterator[Target]:
    """BuildGrid on disk over its own redis-server, or (``storage="memory"``) all in RAM;
    ``processes`` > 1 starts that many on one port (gRPC sets SO_REUSEPORT), sharing the Redis
    index and the disk store."""
    if storage == "memory" and processes > 1:
        raise ValueError("BuildGrid processes cannot share in-memory storage")
    bgd = ensure_buildgrid()
    work.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(work / f"redis-buildgrid-{processes}")
    if storage == "redis":
        redis.start()
    port = free_port()
    config = work / f"buildgrid-{processes}.yml"
    stores = BUILDGRID_STORES[storage].format(
        redis_port=redis.port, data=work / f"buildgrid-{processes}"
    )
    config.write_text(BUILDGRID_CONFIG.format(port=port, stores=stores))
    try:
        with ExitStack() as stack:
            children = [
                stack.enter_context(
                    process(
                        [str(bgd), "server", "start", str(config)],
                        work / f"buildgrid-{processes}-{index}.log",
                        port,
                        listeners=index + 1,
                    )
                )
                for index in range(processes)
            ]
            yield Target(
                f"127.0.0.1:{port}",
                children[0].pid,
                redis.process.pid if redis.process is not None else None,
                tuple(child.pid for child in children[1:]),
            )
    finally:
        redis.stop()
