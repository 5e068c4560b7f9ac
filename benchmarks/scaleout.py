"""Stateless frontends over shared engines (`make cluster`'s shape): Redis for the index and
the action results, SeaweedFS's S3 for the blobs.

- `bazel-like` actions/s with one frontend and with two over the same engines, the same 16
  clients in all (two load processes of 8: both at the one frontend, or one at each),
  taking turns round after round.
- ByteStream MB/s of 16 MiB blobs (4 streams) to and from a frontend on S3 and a server on
  its own disk (the default storage), taking turns.

Every process shares this machine's two cores (Redis, SeaweedFS, the frontends, the load), so
a second frontend cannot add CPU here: the figures show what sharing the engines costs and
whether a second frontend keeps up, not how far more machines scale.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from asynccas.bench.runner import RunConfig, RunResult
from asynccas.bench.runner import run as run_scenario
from asynccas.bench.scenarios import Settings, fresh_seed
from benchmarks.fmb import machine
from benchmarks.proxy import Server, asynccas
from scripts.local_cluster import frontend_config
from tests.support.redis_servers import RedisServer
from tests.support.seaweedfs import SeaweedFS

CLIENTS = 16
STREAM_BLOB = 16 * 1024 * 1024


@contextmanager
def engines(work: Path) -> Iterator[tuple[RedisServer, SeaweedFS]]:
    redis_server = RedisServer(work / "redis")
    seaweedfs = SeaweedFS(work / "seaweedfs")
    redis_server.start()
    try:
        seaweedfs.start()
        try:
            yield redis_server, seaweedfs
        finally:
            seaweedfs.stop()
    finally:
        redis_server.stop()


def load(target: Server, scenario: str, concurrency: int, processes: int, duration: float,
         blob_size: int = 4096) -> RunResult:  # fmt: skip
    return run_scenario(
        RunConfig(
            endpoint=f"grpc://{target.address}", scenario=scenario, concurrency=concurrency,
            duration=duration, processes=processes, server_pid=target.server_pid,
            settings=Settings(seed=fresh_seed(), blob_size=blob_size),
        ),
        progress=False,
    )  # fmt: skip


def actions_per_second(results: list[RunResult]) -> float:
    total = 0.0
    for result in results:
        stats = result.ops.get("action")
        total += stats.histogram.count / result.seconds if stats else 0.0
    return total


def megabytes_per_second(result: RunResult, op: str) -> float:
    stats = result.ops.get(op)
    return stats.histogram.count * STREAM_BLOB / result.seconds / 1e6 if stats else 0.0


def _frontend_figures(work: Path, redis_url: str, s3: str, duration: float,
                      rounds: int) -> tuple[float, float]:  # fmt: skip
    config = work / "frontend.toml"
    config.write_text(frontend_config(redis_url, s3, "20G", "shared"))
    rates: dict[str, list[float]] = {"one": [], "two": []}
    with ExitStack() as stack:
        first, second = (
            stack.enter_context(asynccas(work, f"frontend{n}", "--config", str(config)))
            for n in range(2)
        )
        half = CLIENTS // 2
        with ThreadPoolExecutor(2) as pool:
            for round_number in range(rounds):
                order = ["one", "two"] if round_number % 2 == 0 else ["two", "one"]
                for shape in order:
                    targets = [first, first] if shape == "one" else [first, second]
                    runs = [
                        pool.submit(load, target, "bazel-like", half, 1, duration)
                        for target in targets
                    ]
                    rates[shape].append(actions_per_second([run.result() for run in runs]))
    return statistics.median(rates["one"]), statistics.median(rates["two"])


def _stream_figures(work: Path, redis_url: str, s3: str, duration: float,
                    rounds: int) -> dict[str, dict[str, float]]:  # fmt: skip
    config = work / "streams.toml"
    # A bucket and Redis database of their own: nothing shared with the frontends' figures.
    streams_redis = redis_url.replace("/0", "/1")
    text = frontend_config(streams_redis, s3, "20G", "shared")
    config.write_text(text.replace('bucket = "asynccas"', 'bucket = "streams"'))
    figures: dict[str, dict[str, list[float]]] = {
        name: {"write": [], "read": []} for name in ("S3 (SeaweedFS)", "disk")
    }
    with ExitStack() as stack:
        servers = {
            "S3 (SeaweedFS)": stack.enter_context(
                asynccas(work, "s3-frontend", "--config", str(config))
            ),
            "disk": stack.enter_context(
                asynccas(work, "disk", "--data-dir", str(work / "disk"), "--no-fsync")
            ),
        }
        for round_number in range(rounds):
            order = list(servers.items())
            if round_number % 2:
                order.reverse()
            for name, server in order:
                wrote = load(server, "bytestream-write", 4, 1, duration, STREAM_BLOB)
                figures[name]["write"].append(megabytes_per_second(wrote, "ByteStream.Write"))
                read = load(server, "bytestream-read", 4, 1, duration, STREAM_BLOB)
                figures[name]["read"].append(megabytes_per_second(read, "ByteStream.Read"))
    return {
        name: {op: statistics.median(values) for op, values in ops.items()}
        for name, ops in figures.items()
    }


def run(duration: float = 10.0, rounds: int = 2) -> str:
    with tempfile.TemporaryDirectory(prefix="asynccas-scaleout-bench-") as tmp:
        work = Path(tmp)
        with engines(work) as (redis_server, seaweedfs):
            one, two = _frontend_figures(
                work, redis_server.url, seaweedfs.endpoint, duration, rounds
            )
            streams = _stream_figures(work, redis_server.url, seaweedfs.endpoint, duration, rounds)
    s3, disk = streams["S3 (SeaweedFS)"], streams["disk"]
    return "\n".join(
        [
            f"### scale-out: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Machine: {machine()}. Reproduce: `python -m benchmarks scaleout`. Redis, SeaweedFS,"
            " the frontends and the load all share this machine's cores.",
            "",
            f"`bazel-like`, {CLIENTS} clients, frontends over a Redis index on S3 and a Redis"
            f" action cache (median of {rounds} rounds of {duration:.0f} s):",
            "",
            "| frontends | actions/s | / one frontend |",
            "| --- | ---: | ---: |",
            f"| one | {one:.0f} | 1.00 |",
            f"| two (8 clients at each) | {two:.0f} | {two / one:.2f} |",
            "",
            "ByteStream of 16 MiB blobs, 4 streams, Bazel's 16 KiB write messages:",
            "",
            "| storage | write MB/s | read MB/s |",
            "| --- | ---: | ---: |",
            f"| S3 (SeaweedFS), behind a Redis index | {s3['write']:.0f} | {s3['read']:.0f} |",
            f"| disk (the default storage) | {disk['write']:.0f} | {disk['read']:.0f} |",
            f"| S3 / disk | {s3['write'] / disk['write']:.2f} | {s3['read'] / disk['read']:.2f} |",
        ]
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(run())
