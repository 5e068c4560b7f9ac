"""FindMissingBlobs of 1,000 digests (half present) through the server, asynccas + Redis index
versus BuildGrid 0.4.4 + its Redis index, in the same run on the same machine, with one and
with two server processes on each side.

Both servers run as separate processes over their own fresh redis-server. The client keeps
``concurrency`` requests in flight for ``duration`` seconds per server and reports p50/p99
latency and digests checked per second.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import grpc

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.testing import blob
from benchmarks.peers import Target, buildgrid_server, process
from tests.support.redis_servers import RedisServer, free_port

FIND_MISSING_BLOBS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    latencies: list[float]
    digests_per_request: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process role

    @property
    def digests_per_second(self) -> float:
        return self.requests * self.digests_per_request / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User plus system CPU time of a process and its threads, and its child processes."""
    pids = [pid]
    for entry in os.listdir("/proc") if children else []:
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    pids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    total = 0.0
    for each in pids:
        try:
            fields = _stat(each)
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextmanager
def asynccas_server(
    work: Path,
    workers: int = 1,
    *,
    index: str = "redis",
    storage: str = "disk",
    extra: Sequence[str] = (),
    fsync: bool = False,
) -> Iterator[Target]:
    """``asynccas serve`` in its own process: disk over a fresh redis-server or the SQLite
    default, or (``storage="memory"``) everything in RAM; without fsync unless asked, as
    BuildGrid does not fsync."""
    redis = RedisServer(work / f"redis-asynccas-{workers}-{index}")
    redis.start()
    port = free_port()
    args = [
        sys.executable, "-m", "asynccas.cli", "serve", "--address", f"127.0.0.1:{port}",
        "--data-dir", str(work / f"asynccas-{workers}-{index}"),
        "--index", redis.url if index == "redis" and storage == "disk" else "sqlite",
        "--storage", storage, "--max-size", "8G" if storage == "memory" else "0",
        "--log-level", "WARNING", "--workers", str(workers),
        *([] if fsync else ["--no-fsync"]), *extra,
    ]  # fmt: skip
    try:
        with process(args, work / "asynccas.log", port, listeners=workers) as child:
            assert redis.process is not None
            yield Target(f"127.0.0.1:{port}", child.pid, redis.process.pid)
    finally:
        redis.stop()


async def measure(
    name: str, target: Target, *, digests: int, concurrency: int, duration: float
) -> Result:
    present = [blob(256, i) for i in range(digests // 2)]
    absent = [blob(256, 10**6 + i)[0] for i in range(digests - len(present))]
    request = re_pb2.FindMissingBlobsRequest(
        blob_digests=[d.to_proto() for d in [*(d for d, _ in present), *absent]]
    )
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target.address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        upload = re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                for d, data in present
            ]
        )
        response = await cas.BatchUpdateBlobs(upload)
        assert all(r.status.code == 0 for r in response.responses), f"{name}: upload failed"
        check = await cas.FindMissingBlobs(request)
        assert len(check.missing_blob_digests) == len(absent), f"{name}: wrong answer"
        body, expected = request.SerializeToString(), check.SerializeToString()
        for _ in range(20):  # warm up connections and caches
            await cas.FindMissingBlobs(request)
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            # A connection per task, as clients like Bazel open several: with SO_REUSEPORT
            # the kernel spreads connections, not requests, over server processes.
            # gRPC shares connections between a process's channels unless told not to.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(target.address, options=options) as own:
                # Bytes in and out, so that the client spends its CPU on the traffic, not on
                # protobuf; every answer is still checked by its size.
                find_missing: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
                find_missing = own.unary_unary(FIND_MISSING_BLOBS)
                await find_missing(body)
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    answer = await find_missing(body)
                    latencies.append(time.perf_counter() - started)
                    if len(answer) != len(expected):
                        raise AssertionError(f"{name}: wrong answer under load")

        # The servers are this process's children: count the client alone.
        assert target.redis_pid is not None, "every server here runs over Redis"
        roles = {"server": target.server_pid, "redis": target.redis_pid, "client": os.getpid()}

        def cpu_now() -> dict[str, float]:
            cpu = {role: cpu_seconds(pid, children=role != "client") for role, pid in roles.items()}
            cpu["server"] += sum(cpu_seconds(pid) for pid in target.other_server_pids)
            return cpu

        cpu_before = cpu_now()
        started = time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for _ in range(concurrency):
                tasks.start_soon(worker)
        elapsed = time.perf_counter() - started
        cpu_after = cpu_now()
        cpu = {role: (cpu_after[role] - cpu_before[role]) / elapsed for role in roles}
    return Result(name, len(latencies), elapsed, latencies, digests, cpu)


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal"):
                memory_kib = int(line.split()[1])
    return f"{os.cpu_count()} cores ({model}), {memory_kib / 2**20:.0f} GiB RAM"


PROCESSES = (1, 2)  # server processes per side: one per core of the 2-core machines
_CORES_NOTE = "the client and Redis run on the same cores"


def run(
    *, digests: int = 1000, concurrency: int = 8, duration: float = 15.0, rounds: int = 3
) -> str:
    """Run the benchmark and return a Markdown section for RESULTS.md.

    Every server stays up for the whole run, and the measurements take turns, round after
    round: a slow minute on this shared machine then falls on both sides rather than on
    whichever server it happened to meet, and the median round of each sets the ratio.
    """
    names = [f"BuildGrid 0.4.4 + Redis index, {_count(n, 'process')}" for n in PROCESSES]
    names += [f"asynccas + Redis index, {_count(n, 'worker')}" for n in PROCESSES]
    rows: dict[str, list[Result]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="asynccas-bench-") as scratch, ExitStack() as stack:
        work = Path(scratch)
        targets = [stack.enter_context(buildgrid_server(work, n)) for n in PROCESSES]
        targets += [stack.enter_context(asynccas_server(work, n)) for n in PROCESSES]
        load = partial(measure, digests=digests, concurrency=concurrency, duration=duration)
        for _ in range(rounds):
            for name, target in zip(names, targets, strict=True):
                # The same client loop (uvloop) for every server.
                result = anyio.run(
                    partial(load, name, target), backend_options={"use_uvloop": True}
                )
                rows[name].append(result)
    medians = {name: _median_round(results) for name, results in rows.items()}
    lines = [
        f"### FindMissingBlobs, {digests} digests (half present), concurrency {concurrency}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        "- command: `make bench` (`python -m benchmarks fmb`)",
        f"- each server with its own redis-server, all up for the whole run; {rounds} rounds of"
        f" {duration:.0f} s per server, taking turns; each row is that server's median round;"
        " with two processes, BuildGrid's share one port (SO_REUSEPORT) as asynccas's"
        " workers do",
        "",
        "- CPU columns: cores busy on average during the run (1.00 = one core saturated)",
        "",
        "| server | requests | digests/s | every round, digests/s | p50 ms | p99 ms"
        " | server CPU | redis CPU | client CPU |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in medians.items():
        each = ", ".join(f"{x.digests_per_second / 1000:,.0f}k" for x in rows[name])
        lines.append(
            f"| {r.name} | {r.requests} | {r.digests_per_second:,.0f} | {each} |"
            f" {statistics.median(r.latencies) * 1000:.1f} | {r.percentile(99):.1f} |"
            f" {r.cpu['server']:.2f} | {r.cpu['redis']:.2f} | {r.cpu['client']:.2f} |"
        )
    lines += [""]
    half = len(PROCESSES)
    for count, ours, theirs in zip(PROCESSES, names[half:], names[:half], strict=True):
        ratio = medians[ours].digests_per_second / medians[theirs].digests_per_second
        per_round = [
            a.digests_per_second / b.digests_per_second
            for a, b in zip(rows[ours], rows[theirs], strict=True)
        ]
        # The target is for one server process each, as each is deployed by default. With
        # two, the client and Redis share the same two cores, so that row shows the machine.
        label = "target: 20x" if count == 1 else f"no target: {_CORES_NOTE}"
        lines.append(
            f"- **{ours} / BuildGrid, {_count(count, 'process')}: {ratio:.1f}x** ({label};"
            f" round by round: {', '.join(f'{x:.1f}x' for x in per_round)})"
        )
    lines.append("")
    return "\n".join(lines)


def _median_round(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.digests_per_second)[(len(results) - 1) // 2]


def _count(number: int, noun: str) -> str:
    plural = "es" if noun.endswith("s") else "s"
    return f"{number} {noun}{plural if number > 1 else ''}"
