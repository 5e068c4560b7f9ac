"""What Bazel sends, asynccas against BuildGrid 0.4.4 in the same run: ByteStream writes in
Bazel's 16 KiB messages, small ByteStream reads, action cache gets and updates, Bazel's own
per-action sequences (``bazel-like`` for an uploading build, ``bazel-download`` for a build
that downloads everything), and how actions/s hold up from 32 to 1,000 concurrent clients.

Both servers run as their users run them: asynccas with its defaults (disk, blobs up to
64 KiB as SQLite rows, SQLite index, fsync on), BuildGrid 0.4.4 on disk with its Redis index
(it does not fsync). Both stay up for the whole run and the loads take turns, round after
round, so that a noisy minute on the shared machine hits both; each figure is the median of
the rounds. The targets are those of the real-client performance issue.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from asynccas.bench.report import to_html
from asynccas.bench.runner import RunConfig, RunResult
from asynccas.bench.runner import run as run_scenario
from asynccas.bench.scenarios import Settings, fresh_seed
from benchmarks.fmb import asynccas_server, machine
from benchmarks.peers import Target, buildgrid_server, process
from tests.support.redis_servers import free_port

OUT = Path(__file__).parent / "out"
ASYNCCAS = "asynccas (defaults: disk + SQLite, fsync)"
ASYNCCAS_NO_FSYNC = "asynccas (disk + SQLite, --no-fsync)"
BUILDGRID = "BuildGrid 0.4.4 (disk + Redis index)"
FLOOR = "grpc.aio floor (handlers that do no work: count bytes, read from a dict)"
FILES_FLOOR = "files floor (hash, write, fsync, link; nothing else)"
FILES_FLOOR_NO_FSYNC = "files floor, no fsync"
SIZE_MIX_8K = ((8192, 8193, 1.0),)  # the concurrency sweep's blobs: 8 KiB each


@dataclass(frozen=True)
class Load:
    key: str
    scenario: str
    label: str  # the operation whose rate is compared
    blob_size: int = 4096
    concurrency: int = 16
    batch: int = 100
    target: float | None = None  # asynccas / BuildGrid, at least
    size_mix: tuple[tuple[int, int, float], ...] | None = None
    servers: tuple[str, ...] = ()  # beyond asynccas and BuildGrid


WRITE_SERVERS = (ASYNCCAS_NO_FSYNC, FILES_FLOOR, FILES_FLOOR_NO_FSYNC, FLOOR)
LOADS = [
    Load(
        "write-1",
        "bytestream-write",
        "ByteStream.Write",
        300_000,
        1,
        target=2.0,
        servers=WRITE_SERVERS,
    ),
    Load(
        "write-16",
        "bytestream-write",
        "ByteStream.Write",
        300_000,
        16,
        target=3.0,
        servers=WRITE_SERVERS,
    ),
    Load("read-16", "bytestream-read", "ByteStream.Read", 8192, 16, target=3.0, servers=(FLOOR,)),
    Load("ac-get-16", "action-cache", "GetActionResult", target=3.0),
    Load("ac-update-16", "action-cache", "UpdateActionResult", target=3.0),
    Load("bazel-upload-16", "bazel-like", "action", servers=(ASYNCCAS_NO_FSYNC,)),
    Load("bazel-download-16", "bazel-download", "action", batch=200),
]
SWEEP = (32, 250, 1000)  # concurrent clients of bazel-like with 8 KiB blobs


def _config(target: Target, load: Load, duration: float) -> RunConfig:
    mix = list(load.size_mix) if load.size_mix else None
    return RunConfig(
        endpoint=f"grpc://{target.address}", scenario=load.scenario,
        concurrency=load.concurrency, duration=duration, processes=min(2, load.concurrency),
        settings=Settings(blob_size=load.blob_size, batch=load.batch, size_mix=mix,
                          seed=fresh_seed()),
        server_pid=target.server_pid,
    )  # fmt: skip


def _rate(result: RunResult, label: str) -> float:
    stats = result.ops.get(label)
    return stats.histogram.count / result.seconds if stats is not None else 0.0


def _errors(result: RunResult) -> int:
    return sum(sum(s.errors.values()) + s.corruptions for s in result.ops.values())


@dataclass
class Measured:
    """One load on one server over the rounds."""

    runs: list[RunResult]
    label: str

    @property
    def rate(self) -> float:
        return statistics.median(_rate(r, self.label) for r in self.runs)

    def percentile_ms(self, p: float) -> float:
        return statistics.median(r.ops[self.label].histogram.percentile(p) for r in self.runs
                                 if self.label in r.ops) * 1e3  # fmt: skip

    @property
    def errors(self) -> int:
        return sum(_errors(r) for r in self.runs)

    @property
    def server_cpu(self) -> float:
        return statistics.median(r.server_cpu or 0.0 for r in self.runs)


def _servers(stack: ExitStack, work: Path) -> dict[str, Target]:
    return {
        BUILDGRID: stack.enter_context(buildgrid_server(work / "bg")),
        # The other benchmarks run asynccas with --no-fsync; this one runs its defaults.
        ASYNCCAS: stack.enter_context(asynccas_server(work / "ac", index="sqlite", fsync=True)),
        ASYNCCAS_NO_FSYNC: stack.enter_context(asynccas_server(work / "nofsync", index="sqlite")),
        FLOOR: stack.enter_context(floor_server(work)),
        FILES_FLOOR: stack.enter_context(floor_server(work, files=work / "files-floor")),
        FILES_FLOOR_NO_FSYNC: stack.enter_context(
            floor_server(work, files=work / "files-floor-no-fsync", fsync=False)
        ),
    }


@contextmanager
def floor_server(
    work: Path, *, keep_all: bool = False, files: Path | None = None, fsync: bool = True
) -> Iterator[Target]:
    """``benchmarks.floor``: what grpc.aio costs with no work behind it (``keep_all``: a
    cache Bazel can build against, keeping everything in dicts, checking nothing; ``files``:
    writes that only hash, write a file, fsync unless told not to, and link it in there)."""
    port = free_port()
    args = [sys.executable, "-m", "benchmarks.floor", str(port)]
    if keep_all:
        args.append("--keep-all")
    if files is not None:
        args += ["--durable", str(files)] + ([] if fsync else ["--no-fsync"])
    log = work / ("floor.log" if files is None else f"{files.name}.log")
    with process(args, log, port) as child:
        yield Target(f"127.0.0.1:{port}", child.pid, None)


def run(duration: float = 6.0, *, rounds: int = 3) -> str:
    """Run every load on both servers in turns and return a Markdown section."""
    results: list[RunResult] = []
    table: dict[str, dict[str, list[RunResult]]] = {}
    sweep: dict[int, dict[str, RunResult]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="asynccas-bench-bazel-") as scratch,
        ExitStack() as stack,
    ):
        servers = _servers(stack, Path(scratch))
        for round_number in range(rounds):
            order = list(servers.items())
            if round_number % 2:
                order.reverse()  # neither server always goes first
            done: dict[tuple[str, str], RunResult] = {}
            for load in LOADS:
                for name, target in order:
                    if name not in (ASYNCCAS, BUILDGRID, *load.servers):
                        continue
                    # Two comparisons read one scenario (action-cache): run it once.
                    key = (load.scenario + str(load.blob_size) + str(load.concurrency), name)
                    if key not in done:
                        done[key] = run_scenario(_config(target, load, duration), progress=False)
                        done[key].config["server"] = name
                        results.append(done[key])
                    table.setdefault(load.key, {}).setdefault(name, []).append(done[key])
        for clients in SWEEP:
            load = Load("sweep", "bazel-like", "action", concurrency=clients,
                        size_mix=SIZE_MIX_8K)  # fmt: skip
            for name, target in servers.items():
                if name not in (ASYNCCAS, BUILDGRID):
                    continue
                result = run_scenario(_config(target, load, 2 * duration), progress=False)
                result.config["server"] = name
                results.append(result)
                sweep.setdefault(clients, {})[name] = result
    OUT.mkdir(exist_ok=True)
    (OUT / "bazel-traffic.html").write_text(to_html(results))
    (OUT / "bazel-traffic.json").write_text(json.dumps([r.to_json() for r in results]))
    return markdown(table, sweep, duration, rounds)


def markdown(
    table: dict[str, dict[str, list[RunResult]]],
    sweep: dict[int, dict[str, RunResult]],
    duration: float,
    rounds: int,
) -> str:
    lines = [
        "### Bazel's traffic: asynccas vs BuildGrid 0.4.4",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- command: `make bench ARGS=bazel-traffic`; {rounds} rounds of {duration:.0f} s per"
        " load and server, taking turns; medians; 2 client processes (1 for one stream);"
        " HTML: `benchmarks/out/bazel-traffic.html`",
        f"- {ASYNCCAS} against {BUILDGRID}, which does not fsync",
        "- floors (`benchmarks/floor.py`): the grpc.aio floor does no work; the files floor"
        " does only what a cache that loses nothing must do per blob (check its SHA-256, write"
        " a file, fsync, link it in place) in one worker-thread hop, and no index",
        "",
        "| load | server | ops/s | vs BuildGrid | target | p50 ms | p99 ms | errors |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for load in LOADS:
        theirs = Measured(table[load.key][BUILDGRID], load.label)
        for name in (ASYNCCAS, *load.servers, BUILDGRID):
            measured = Measured(table[load.key][name], load.label)
            ratio = measured.rate / theirs.rate if theirs.rate else 0.0
            lines.append(
                f"| {describe(load)} | {name} | {measured.rate:,.0f} | {ratio:.2f}x"
                f" | {verdict(ratio, load.target) if name == ASYNCCAS else ''}"
                f" | {measured.percentile_ms(50):,.1f} | {measured.percentile_ms(99):,.1f}"
                f" | {measured.errors} |"
            )
    lines += [
        "",
        "Concurrency sweep, `bazel-like` with 8 KiB blobs (target: asynccas's actions/s at 1,000"
        " clients at least 80% of its best, with no errors):",
        "",
        "| clients | asynccas actions/s | p99 ms | errors | BuildGrid actions/s | p99 ms | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for clients, by_server in sweep.items():
        cells = []
        for name in (ASYNCCAS, BUILDGRID):
            result = by_server[name]
            stats = result.ops.get("action")
            p99 = stats.histogram.percentile(99) * 1e3 if stats else 0.0
            cells.append(f"{_rate(result, 'action'):,.0f} | {p99:,.0f} | {_errors(result)}")
        lines.append(f"| {clients} | {' | '.join(cells)} |")
    best = max(_rate(s[ASYNCCAS], "action") for s in sweep.values())
    at_most = _rate(sweep[max(sweep)][ASYNCCAS], "action")
    share = at_most / best if best else 0.0
    errors = _errors(sweep[max(sweep)][ASYNCCAS])
    lines += [
        "",
        f"At {max(sweep):,} clients asynccas did {share:.0%} of its best actions/s with"
        f" {errors} errors: " + ("met" if share >= 0.8 and errors == 0 else "MISSED"),
    ]
    return "\n".join(lines) + "\n"


def describe(load: Load) -> str:
    what = {
        "write-1": "ByteStream.Write 300 KB in 16 KiB messages, 1 stream",
        "write-16": "ByteStream.Write 300 KB in 16 KiB messages, 16 streams",
        "read-16": "ByteStream.Read 8 KiB, 16 streams",
        "ac-get-16": "GetActionResult (half hits), 16 clients",
        "ac-update-16": "UpdateActionResult, 16 clients",
        "bazel-upload-16": "bazel-like actions (uploading build), 16 clients",
        "bazel-download-16": "bazel-download actions (downloading build), 16 clients",
    }
    return what[load.key]


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "-"
    return f"{target:g}x: " + ("met" if ratio >= target else "MISSED")
