"""The ``asynccas bench`` scenarios against asynccas (memory; disk + SQLite; disk + Redis) and
BuildGrid 0.4.4 (memory; disk + Redis index) in one run, each asynccas configuration compared
with the matching BuildGrid one, with the targets of the load-harness issue:

- 4 KiB BatchUpdateBlobs and BatchReadBlobs: at least 5x BuildGrid's blobs/s;
- ByteStream write of a 256 MiB blob: at least 60% of single-core SHA-256 throughput (measured
  here, in the same run); read at least 1 GB/s; both at least 3x BuildGrid;
- peak server RSS while writing then reading a 4 GiB blob: at most 150 MiB;
- batch-client (the batch-RPC client mix, formerly bazel-like) at concurrency 64: zero
  errors, p99 reported. Bazel's own traffic is the bazel-traffic benchmark's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from asynccas.bench.report import summary, to_html
from asynccas.bench.runner import RunConfig, RunResult
from asynccas.bench.runner import run as run_scenario
from asynccas.bench.scenarios import Settings, fresh_seed
from benchmarks.fmb import asynccas_server, machine
from benchmarks.peers import Target, buildgrid_server

MiB = 1024 * 1024
OUT = Path(__file__).parent / "out"


@dataclass(frozen=True)
class Load:
    scenario: str
    label: str
    blob_size: int
    batch: int = 100
    concurrency: int = 8
    duration: float = 10.0
    requests: int | None = None
    # 1 MiB messages, as this benchmark's ByteStream figures have always been measured (the
    # client library's default); Bazel's 16 KiB messages are bazel-traffic's.
    chunk_size: int = MiB


LOADS = [
    Load("batch-update", "BatchUpdateBlobs", 4096),
    Load("batch-read", "BatchReadBlobs", 4096),
    Load("bytestream-write", "ByteStream.Write", 256 * MiB, concurrency=1, duration=20.0),
    Load("bytestream-read", "ByteStream.Read", 256 * MiB, concurrency=1, duration=20.0),
    Load("batch-client", "action", 4096, batch=200, concurrency=64, duration=20.0),
]


def sha256_throughput(seconds: float = 2.0) -> float:
    """Bytes per second one core hashes with SHA-256, on this machine, now."""
    buffer = os.urandom(64 * MiB)
    hashed, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        hashlib.sha256(buffer).digest()
        hashed += len(buffer)
    return hashed / (time.perf_counter() - started)


def peak_rss(pid: int) -> int:
    """The process's peak resident set size so far, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> None:
    """Restart VmHWM from the current RSS (Linux: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")


def run_load(target: Target, load: Load, name: str) -> RunResult:
    config = RunConfig(
        endpoint=f"grpc://{target.address}", scenario=load.scenario, concurrency=load.concurrency,
        duration=load.duration if load.requests is None else None, requests=load.requests,
        processes=min(2, load.concurrency),
        settings=Settings(blob_size=load.blob_size, batch=load.batch, seed=fresh_seed(),
                          chunk_size=load.chunk_size),
        server_pid=target.server_pid,
    )  # fmt: skip
    result = run_scenario(config, progress=False)
    result.config["server"] = name
    return result


BUILDGRID_DISK, BUILDGRID_MEMORY = (
    "BuildGrid 0.4.4 (disk + Redis index)",
    "BuildGrid 0.4.4 (memory)",
)
SERVERS: list[tuple[str, Callable[[Path], AbstractContextManager[Target]]]] = [
    (BUILDGRID_DISK, lambda w: buildgrid_server(w / "bg")),
    (BUILDGRID_MEMORY, lambda w: buildgrid_server(w / "bgmem", storage="memory")),
    ("asynccas (memory)", lambda w: asynccas_server(w / "mem", storage="memory")),
    ("asynccas (disk + SQLite index)", lambda w: asynccas_server(w / "sq", index="sqlite")),
    ("asynccas (disk + Redis index)", lambda w: asynccas_server(w / "rd", index="redis")),
    (  # the layout before the small-blob tier became the default
        "asynccas (disk + SQLite index, one file per blob)",
        lambda w: asynccas_server(w / "files", index="sqlite", extra=["--small-blob-limit", "0"]),
    ),
]


def peer_of(name: str) -> str:
    """The BuildGrid configuration a row is compared with: in-memory with in-memory, and every
    disk layout with BuildGrid on disk (its SQL index takes no SQLite, only PostgreSQL)."""
    return BUILDGRID_MEMORY if "(memory)" in name else BUILDGRID_DISK


def _rate(result: RunResult, label: str) -> tuple[float, float, float]:
    """(items per second, bytes per second, p99 seconds) of one operation."""
    stats = result.ops.get(label)
    if stats is None:
        return 0.0, 0.0, 0.0
    return (stats.items / result.seconds, stats.bytes / result.seconds,
            stats.histogram.percentile(99))  # fmt: skip


def rss_of_4gib(work: Path) -> tuple[int, float]:
    """Peak server RSS (bytes) while a 4 GiB blob is written then read, and the seconds taken."""
    with asynccas_server(work / "rss", index="sqlite") as target:
        reset_peak_rss(target.server_pid)
        started = time.perf_counter()
        for scenario in ("bytestream-write", "bytestream-read"):
            load = Load(scenario, "", 4 * 1024 * MiB, concurrency=1, requests=1)
            run_load(target, load, "asynccas (disk + SQLite index)")
        return peak_rss(target.server_pid), time.perf_counter() - started


def run(duration: float = 0.0, *, with_rss: bool = True) -> str:
    del duration  # each load has its own duration
    results: list[RunResult] = []
    hash_rate = sha256_throughput()
    with tempfile.TemporaryDirectory(prefix="asynccas-bench-harness-") as scratch:
        work = Path(scratch)
        table: dict[str, dict[str, RunResult]] = {}
        for number, (name, start) in enumerate(SERVERS):
            # Each server's blobs go once its loads are done: together (every server keeps
            # all it was sent, tens of GB) they filled the disk, and uploads then failed.
            server_work = work / f"server-{number}"
            server_work.mkdir()
            with start(server_work) as target:
                for load in LOADS:
                    result = run_load(target, load, name)
                    print(summary(result), flush=True)
                    results.append(result)
                    table.setdefault(load.label, {})[name] = result
            shutil.rmtree(server_work, ignore_errors=True)
        rss = rss_of_4gib(work) if with_rss else None
    OUT.mkdir(exist_ok=True)
    (OUT / "harness.html").write_text(to_html(results))
    (OUT / "harness.json").write_text(json.dumps([r.to_json() for r in results]))
    return _markdown(table, hash_rate, rss)


def _markdown(
    table: dict[str, dict[str, RunResult]], hash_rate: float, rss: tuple[int, float] | None
) -> str:
    lines = [
        "### Load harness: asynccas bench scenarios, asynccas vs BuildGrid 0.4.4",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        "- command: `make bench` (`python -m benchmarks harness`); servers without fsync;"
        " 2 client processes; HTML report: `benchmarks/out/harness.html`",
        f"- single-core SHA-256 on this machine, same run: {hash_rate / 1e6:,.0f} MB/s",
        "- asynccas on disk in its default layout (blobs up to 64 KiB in `small-blobs.sqlite`,"
        " larger ones one file each) unless the row says otherwise",
        "- vs BuildGrid: asynccas in memory against BuildGrid in memory; asynccas on disk against"
        " BuildGrid on disk with its Redis index (BuildGrid 0.4.4's SQL index refuses SQLite)",
        "",
        "| operation | server | items/s | MB/s | p99 ms | errors | vs BuildGrid | server CPU | client CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, by_server in table.items():
        for name, result in by_server.items():
            items, rate, p99 = _rate(result, label)
            errors = sum(sum(s.errors.values()) + s.corruptions for s in result.ops.values())
            base = by_server.get(peer_of(name))
            base_items = _rate(base, label)[0] if base is not None else 0.0
            versus = items / base_items if base_items else 0.0
            lines.append(
                f"| {label} | {name} | {items:,.0f} | {rate / 1e6:,.1f} | {p99 * 1e3:,.1f} |"
                f" {errors} | {versus:.1f}x | {result.server_cpu or 0:.2f} | {result.client_cpu:.2f} |"
            )
    lines += ["", "Targets, for asynccas (disk + SQLite index) unless said otherwise:", ""]
    lines += list(_verdicts(table, hash_rate, rss))
    return "\n".join(lines) + "\n"


def _verdicts(
    table: dict[str, dict[str, RunResult]], hash_rate: float, rss: tuple[int, float] | None
) -> Iterator[str]:
    ours = "asynccas (disk + SQLite index)"

    def ratio(label: str, name: str = ours) -> float:
        base = _rate(table[label][peer_of(name)], label)[0]
        return _rate(table[label][name], label)[0] / base if base else 0.0

    for label in ("BatchUpdateBlobs", "BatchReadBlobs"):
        got = ratio(label)
        yield f"- 4 KiB {label}: {got:.1f}x BuildGrid's blobs/s (target 5x): " + _verdict(got, 5)
        for name in ("asynccas (disk + Redis index)", "asynccas (memory)"):
            got = ratio(label, name)
            yield (f"  - {name} against {peer_of(name)}: {got:.1f}x: "
                   + _verdict(got, 5))  # fmt: skip
    write = _rate(table["ByteStream.Write"][ours], "ByteStream.Write")[1]
    share = write / hash_rate
    yield (f"- ByteStream write, 256 MiB: {write / 1e6:,.0f} MB/s = {share:.0%} of single-core"
           f" SHA-256 (target 60%): " + _verdict(share, 0.6))  # fmt: skip
    read = _rate(table["ByteStream.Read"][ours], "ByteStream.Read")[1]
    yield f"- ByteStream read, 256 MiB: {read / 1e9:.2f} GB/s (target 1 GB/s): " + _verdict(
        read / 1e9, 1
    )
    for label in ("ByteStream.Write", "ByteStream.Read"):
        got = ratio(label)
        yield f"- {label} vs BuildGrid: {got:.2f}x (target 3x): " + _verdict(got, 3)
    if rss is not None:
        yield (f"- peak server RSS writing then reading a 4 GiB blob: {rss[0] / MiB:,.0f} MiB"
               f" (target at most 150 MiB; took {rss[1]:.0f} s): " + _verdict(150, rss[0] / MiB))  # fmt: skip
    bazel = table["action"][ours]
    errors = sum(sum(s.errors.values()) + s.corruptions for s in bazel.ops.values())
    yield (f"- batch-client at concurrency 64: {errors} errors, action p99"
           f" {bazel.ops['action'].histogram.percentile(99) * 1e3:,.0f} ms (target: zero errors): "
           + ("met" if errors == 0 else "MISSED"))  # fmt: skip


def _verdict(got: float, target: float) -> str:
    if got >= target:
        return "met"
    miss = 1 - got / target
    return f"MISSED by {miss:.0%}" if miss >= 0.005 else "MISSED by less than 1%"
