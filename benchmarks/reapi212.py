"""REAPI 2.12's cache features on asynccas alone (BuildGrid 0.4.4 has none of them): zstd
ByteStream transfers against uncompressed ones, FastCDC chunking speed, and the bytes a
200 MiB file with a 1 MiB edit in the middle moves when it goes by chunks (SpliceBlob up,
SplitBlob down) against whole.

The ByteStream loads (300 KB blobs in Bazel's 16 KiB messages, 16 clients) use data of 3 bits
of entropy per byte, which zstd level 1 makes about 38% of its size, like build outputs; the
server runs its defaults (disk, SQLite, fsync). Loads take turns over the rounds; medians.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from asynccas.bench.runner import RunConfig
from asynccas.bench.runner import run as run_scenario
from asynccas.bench.scenarios import Settings, fresh_seed
from asynccas.chunking import FastCdcParams, chunks_of
from asynccas.client import CasClient
from asynccas.client.caches import ClientCaches
from benchmarks.fmb import machine
from benchmarks.proxy import Server, asynccas

FILE_SIZE = 200 * 1024 * 1024
EDIT_SIZE = 1024 * 1024


def _bytestream(servers: dict[str, Server], rounds: int, duration: float) -> list[str]:
    """Plain and zstd writes and reads on each server (plain files, compressed at rest)."""
    rates: dict[tuple[str, str, str | None], list[float]] = {}
    cpu: dict[tuple[str, str, str | None], list[float]] = {}
    loads = [
        (server, scenario, compressor)
        for server in servers
        for scenario in ("bytestream-write", "bytestream-read")
        for compressor in (None, "zstd")
    ]
    for round_number in range(rounds):
        for server, scenario, compressor in loads[:: -1 if round_number % 2 else 1]:
            result = run_scenario(
                RunConfig(
                    endpoint=f"grpc://{servers[server].address}", scenario=scenario,
                    concurrency=16, duration=duration, processes=2,
                    server_pid=servers[server].server_pid,
                    settings=Settings(blob_size=300_000, seed=fresh_seed(),
                                      compressor=compressor, compressible=True),
                ),
                progress=False,
            )  # fmt: skip
            label = "ByteStream.Write" if scenario == "bytestream-write" else "ByteStream.Read"
            stats = result.ops[label]
            key = (server, label, compressor)
            rates.setdefault(key, []).append(stats.histogram.count / result.seconds)
            cpu.setdefault(key, []).append(result.server_cpu or 0.0)
    baseline = next(iter(servers))
    rows = []
    for server in servers:
        for label in ("ByteStream.Write", "ByteStream.Read"):
            plain, packed = (statistics.median(rates[server, label, c]) for c in (None, "zstd"))
            reference = statistics.median(rates[baseline, label, None])
            plain_cpu, packed_cpu = (
                statistics.median(cpu[server, label, c]) for c in (None, "zstd")
            )
            rows.append(
                f"| {label} 300 KB | {server} | {plain:.0f} | {packed:.0f}"
                f" | {packed / reference:.2f} | {plain_cpu:.2f} / {packed_cpu:.2f} |"
            )
    return rows


def _disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _at_rest(work: Path, duration: float) -> list[str]:
    """`bazel-like` uploads (Bazel's size mix, compressible outputs) to a server storing plain
    files and to one compressing at rest: disk taken, server CPU per GB, actions/s."""
    rows = []
    for name, flags in (("plain files", []), ("--compress-at-rest", ["--compress-at-rest"])):
        data = work / f"rest-{len(flags)}"
        with asynccas(work, f"rest-{len(flags)}", "--data-dir", str(data), *flags) as server:
            result = run_scenario(
                RunConfig(
                    endpoint=f"grpc://{server.address}", scenario="bazel-like", concurrency=16,
                    duration=duration, processes=2, server_pid=server.server_pid,
                    settings=Settings(seed=fresh_seed(), compressible=True),
                ),
                progress=False,
            )  # fmt: skip
        uploaded = result.ops["ByteStream.Write"].bytes
        actions = result.ops["action"].histogram.count / result.seconds
        cpu_per_gb = (result.server_cpu or 0.0) * result.seconds / (uploaded / 1e9)
        rows.append(
            f"| {name} | {uploaded / 2**20:.0f} MiB | {_disk_bytes(data) / 2**20:.0f} MiB"
            f" | {cpu_per_gb:.1f} | {actions:.0f} |"
        )
    return rows


async def _chunking_speed() -> float:
    data = os.urandom(256 * 1024 * 1024)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1024 * 1024):
            yield data[start : start + 1024 * 1024]

    started = time.perf_counter()
    count = 0
    async for _ in chunks_of(pieces(), FastCdcParams()):
        count += 1
    return len(data) / (time.perf_counter() - started) / 1e6


async def _edited_file(target: str, work: Path) -> list[str]:
    """Bytes sent and received for the second of two versions of a file, by chunks and whole."""
    rng = random.Random(7)
    first = bytearray(rng.randbytes(FILE_SIZE))
    second = bytearray(first)
    middle = FILE_SIZE // 2
    second[middle : middle + EDIT_SIZE] = rng.randbytes(EDIT_SIZE)
    paths = []
    for index, data in enumerate((first, second)):
        path = work / f"version-{index}.bin"
        await anyio.Path(path).write_bytes(bytes(data))
        paths.append(path)
    del first, second
    rows = []
    async with CasClient(target, cache=ClientCaches(work / "client-cache")) as client:
        await client.upload_file(paths[0])
        before, started = client.bytes_sent, time.perf_counter()
        digest = await client.upload_file(paths[1])
        up_bytes, up_seconds = client.bytes_sent - before, time.perf_counter() - started
        first_digest = await client.upload_file(paths[0])  # present: nothing moves
        await client.download_file(first_digest, work / "copy-0.bin")  # fills the cache
        before, started = client.bytes_received, time.perf_counter()
        await client.download_file(digest, work / "copy-1.bin")
        down_bytes, down_seconds = client.bytes_received - before, time.perf_counter() - started
    rows.append(
        f"| by chunks (SpliceBlob / SplitBlob) | {up_bytes / 2**20:.1f} MiB in {up_seconds:.2f} s"
        f" | {down_bytes / 2**20:.1f} MiB in {down_seconds:.2f} s |"
    )
    return rows


def run(duration: float = 10.0, rounds: int = 3) -> str:
    with tempfile.TemporaryDirectory(prefix="asynccas-reapi212-bench-") as tmp:
        work = Path(tmp)
        with (
            asynccas(work, "server", "--data-dir", str(work / "data")) as server,
            asynccas(work, "at-rest", "--data-dir", str(work / "at-rest"),
                     "--compress-at-rest") as at_rest,
        ):  # fmt: skip
            servers = {"plain files": server, "`--compress-at-rest`": at_rest}
            stream_rows = _bytestream(servers, rounds, duration)
            chunking = anyio.run(_chunking_speed)
            edit_rows = anyio.run(_edited_file, f"grpc://{server.address}", work)
        rest_rows = _at_rest(work, duration)
    return "\n".join(
        [
            f"### REAPI 2.12 features: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Machine: {machine()}. Reproduce: `python -m benchmarks reapi212`. asynccas with"
            " its defaults (disk, SQLite, fsync); BuildGrid 0.4.4 offers none of these.",
            "",
            f"ByteStream, 16 clients, data zstd makes 38% of its size (so 38% of the bytes on"
            f" the wire with zstd), median of {rounds} rounds of {duration:.0f} s; ops/s,"
            " server CPU in cores, and zstd's rate against plain files' plain rate:",
            "",
            "| load | server | plain ops/s | zstd ops/s | zstd / plain files' plain | server"
            " CPU plain / zstd |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *stream_rows,
            "",
            f"FastCDC 2020 (avg 512 KiB) over a 256 MiB blob streamed in 1 MiB pieces, one"
            f" core: {chunking:.0f} MB/s.",
            "",
            f"A {FILE_SIZE >> 20} MiB file of random bytes, then the same with {EDIT_SIZE >> 20}"
            " MiB changed in the middle: what the second version moves (its upload after the"
            " first's; its download with the first's chunks in the client cache). Whole, it"
            f" moves {FILE_SIZE >> 20} MiB each way.",
            "",
            "| second version | upload | download |",
            "| --- | ---: | ---: |",
            *edit_rows,
            "",
            f"Compression at rest: `bazel-like` uploads for {duration:.0f} s (16 clients,"
            " Bazel's size mix, outputs zstd makes 38% of) to a server storing plain files and"
            " to one with `--compress-at-rest` (blobs up to 64 KiB stay SQLite rows either"
            " way); disk is everything in the data directory, CPU is the server's:",
            "",
            "| server | uploaded | disk taken | server CPU s per GB uploaded | actions/s |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rest_rows,
        ]
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(run(float(sys.argv[1])) if len(sys.argv) > 1 else run())
