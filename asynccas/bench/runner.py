"""Runs a scenario from several client processes, so that on a small machine the client is
not the bottleneck: Python uses one core per process. Payloads are prepared in every process
before a shared start, and each process sends back its merged statistics."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import multiprocessing
import multiprocessing.synchronize
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from asynccas.allocator import keep_freed_memory
from asynccas.bench.scenarios import SCENARIOS, Recorder, Scenario, Settings
from asynccas.bench.stats import OpStats
from asynccas.client.cas import CasClient
from asynccas.transport import ClientTls


@dataclass
class RunConfig:
    endpoint: str
    scenario: str
    instance: str = ""
    concurrency: int = 8
    duration: float | None = 10.0
    requests: int | None = None
    processes: int = 1
    settings: Settings = field(default_factory=Settings)
    server_pid: int | None = None
    label: str | None = None
    tls: ClientTls | None = None
    token: str | None = field(default=None, repr=False)  # never in reports


@dataclass
class RunResult:
    config: dict[str, Any]
    seconds: float
    ops: dict[str, OpStats]
    client_cpu: float  # cores busy on average
    server_cpu: float | None

    @property
    def name(self) -> str:
        """What reports call this run: its --label, else the server `make bench` named, else
        the scenario and endpoint."""
        c = self.config
        return str(c.get("label") or c.get("server") or f"{c['scenario']} @ {c['endpoint']}")

    def to_json(self) -> dict[str, Any]:
        return {"asynccas_version": _version(), "config": self.config, "seconds": self.seconds,
                "client_cpu": self.client_cpu,
                "server_cpu": self.server_cpu,
                "ops": {label: stats.to_json() for label, stats in self.ops.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        ops = {label: OpStats.from_json(stats) for label, stats in data["ops"].items()}
        return cls(data["config"], data["seconds"], ops, data["client_cpu"], data["server_cpu"])


def _version() -> str:
    try:
        return importlib.metadata.version("asynccas")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class BenchmarkFailed(Exception):
    """A client process could not prepare or run its load (the cause is on its stderr)."""


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(config: RunConfig, progress: bool = True) -> RunResult:
    context = multiprocessing.get_context("spawn")  # gRPC must not be forked
    ready = context.Barrier(config.processes + 1)
    done = context.Value("q", 0)
    moved = context.Array("q", config.processes)  # blob bytes sent and received, per process
    results = context.Queue()
    workers = [
        context.Process(
            target=_worker_entry, args=(config, index, ready, done, moved, results), daemon=True
        )
        for index in range(config.processes)
    ]
    showing = progress and sys.stderr.isatty()
    preparing_since = time.perf_counter()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for worker in workers:
        worker.start()
    # Every process has its payloads and connection: start together. A process that died
    # while preparing (its error is on stderr) would otherwise leave the others waiting.
    while ready.n_waiting < config.processes:
        if not all(worker.is_alive() for worker in workers):
            ready.abort()
            raise BenchmarkFailed("a benchmark process died while preparing; see its output above")
        if showing:
            waited = time.perf_counter() - preparing_since
            sys.stderr.write(
                f"\r{config.scenario}: preparing payloads and connections,"
                f" {ready.n_waiting}/{config.processes} processes ready, {waited:.0f} s\x1b[K"
            )
            sys.stderr.flush()
        time.sleep(0.05)
    ready.wait(timeout=60)
    server_before = None if config.server_pid is None else _cpu_of(config.server_pid)
    started = time.perf_counter()
    collected: list[dict[str, OpStats]] = []
    while len(collected) < len(workers):
        try:
            collected.append(results.get(timeout=0.5))
        except Exception:  # queue.Empty: show progress while waiting
            if not any(w.is_alive() for w in workers) and results.empty():
                raise BenchmarkFailed("a benchmark process died; see its output above") from None
        if showing:
            line = progress_line(config, done.value, sum(moved[:]), time.perf_counter() - started)
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join()
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (usage_after.ru_utime + usage_after.ru_stime
                  - usage_before.ru_utime - usage_before.ru_stime) / elapsed  # fmt: skip
    server_cpu = None
    if config.server_pid is not None and server_before is not None:
        server_cpu = (_cpu_of(config.server_pid) - server_before) / elapsed
    merged: dict[str, OpStats] = {}
    for ops in collected:
        for label, stats in ops.items():
            merged.setdefault(label, OpStats()).merge(stats)
    summary = {
        "endpoint": config.endpoint, "scenario": config.scenario, "instance": config.instance,
        "concurrency": config.concurrency, "duration": config.duration, "requests": config.requests,
        "processes": config.processes, "blob_size": config.settings.blob_size,
        "batch": config.settings.batch, "present": config.settings.present,
        "chunk_size": config.settings.chunk_size, "seed": config.settings.seed,
        "compressor": config.settings.compressor, "compressible": config.settings.compressible,
        "label": config.label,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    return RunResult(summary, elapsed, merged, client_cpu, server_cpu)


def progress_line(config: RunConfig, ops: int, moved: int, elapsed: float) -> str:
    """``bytestream-write: running  3 ops  412.0 MiB  95.1 MiB/s  6 s left``: bytes move with
    each message, so a run of a few large blobs shows progress long before an op completes."""
    rate = moved / elapsed if elapsed > 0 else 0.0
    left: float | None = None
    if config.requests is not None:
        left = (config.requests - ops) * elapsed / ops if ops else None
    elif config.duration:
        left = max(0.0, config.duration - elapsed)
    eta = "" if left is None else f"  {left:.0f} s left"
    if config.requests is None and left == 0:
        eta = "  time is up: finishing the ops under way"
    return (
        f"{config.scenario}: running  {ops} ops  {moved / 2**20:.1f} MiB"
        f"  {rate / 2**20:.1f} MiB/s{eta}"
    )


def _worker_entry(
    config: RunConfig, index: int, ready: Any, done: Any, moved: Any, results: Any
) -> None:
    keep_freed_memory()  # a spawned process starts with malloc's defaults again
    ops = anyio.run(
        _worker, config, index, ready, done, moved, backend_options={"use_uvloop": True}
    )
    results.put(ops)


async def _worker(
    config: RunConfig, index: int, ready: Any, done: Any, moved: Any
) -> dict[str, OpStats]:
    settings = dataclasses.replace(
        config.settings, worker=index, seed=config.settings.seed * 1000 + index
    )
    scenario: Scenario = SCENARIOS[config.scenario](settings)
    tasks_here = config.concurrency // config.processes + (
        index < config.concurrency % config.processes
    )
    budget = None
    if config.requests is not None:
        budget = config.requests // config.processes + (index < config.requests % config.processes)
    async with CasClient(
        config.endpoint,
        config.instance,
        max_concurrency=max(1, tasks_here) * 4,
        chunk_size=settings.chunk_size,
        compressor=settings.compressor,
        tls=config.tls,
        token=config.token,
    ) as cas:
        await scenario.setup(cas)
        await anyio.to_thread.run_sync(ready.wait)
        recorder = Recorder(time.perf_counter())
        deadline = time.perf_counter() + config.duration if config.duration else math.inf
        remaining = [budget if budget is not None else math.inf]

        async def loop() -> None:
            while time.perf_counter() < deadline and remaining[0] > 0:
                remaining[0] -= 1
                await scenario.run_once(cas, recorder)
                with done.get_lock():
                    done.value += 1

        async def report_bytes() -> None:
            while True:
                moved[index] = cas.bytes_sent + cas.bytes_received
                await anyio.sleep(0.2)

        async with anyio.create_task_group() as reporting:
            reporting.start_soon(report_bytes)
            async with anyio.create_task_group() as tasks:
                for _ in range(max(1, tasks_here)):
                    tasks.start_soon(loop)
            reporting.cancel_scope.cancel()
        moved[index] = cas.bytes_sent + cas.bytes_received
    return recorder.ops
