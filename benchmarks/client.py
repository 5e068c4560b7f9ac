"""Client-side figures: ``download_directory`` of a 10,000-file tree with a cold and a warm
client cache, and GetTree of a 5,000-directory tree, first call versus repeated call. Against
asynccas (embedded default: disk + SQLite) and BuildGrid 0.4.4, in the same run."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import anyio

from asynccas.client import CasClient
from asynccas.client.caches import ClientCaches
from benchmarks.fmb import asynccas_server, machine
from benchmarks.peers import Target, buildgrid_server


def make_files_tree(root: Path, files: int = 10_000, per_directory: int = 100) -> None:
    for i in range(files):
        directory = root / f"d{i // per_directory:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:05d}.txt").write_bytes(os.urandom(512 + i % 1024))


def make_directories_tree(root: Path, directories: int = 5_000, fan_out: int = 50) -> None:
    """``directories`` directories, ``fan_out`` per parent, each holding one small file."""
    paths = [root]
    made = 0
    while made < directories:
        parent = paths[made // fan_out]
        child = parent / f"d{made % fan_out:02d}"
        child.mkdir(parents=True, exist_ok=True)
        (child / "x").write_bytes(str(made).encode())
        paths.append(child)
        made += 1


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def measure(
    target: Target, work: Path, files_tree: Path, dirs_tree: Path
) -> dict[str, float]:
    endpoint = f"grpc://{target.address}"
    async with CasClient(endpoint) as cas:
        files_root = await cas.upload_directory(files_tree)
        dirs_root = await cas.upload_directory(dirs_tree)
        first = await timed(lambda: cas.get_tree(dirs_root))
        repeats = [await timed(lambda: cas.get_tree(dirs_root)) for _ in range(3)]
    cache = work / "client-cache"
    shutil.rmtree(cache, ignore_errors=True)
    times: list[float] = []
    for attempt in ("cold", "warm"):
        out = work / f"out-{attempt}"
        async with CasClient(endpoint, cache=ClientCaches(cache)) as cas:
            times.append(await timed(partial(cas.download_directory, files_root, out)))
    return {
        "get_tree_first": first,
        "get_tree_repeated": min(repeats),
        "download_cold": times[0],
        "download_warm": times[1],
        "files_root": float(files_root.size_bytes),
        "dirs_root": float(dirs_root.size_bytes),
    }


def run(duration: float = 0.0) -> str:
    del duration  # fixed amounts of work, not a time budget
    rows = []
    with tempfile.TemporaryDirectory(prefix="asynccas-bench-client-") as scratch:
        work = Path(scratch)
        files_tree, dirs_tree = work / "files", work / "dirs"
        make_files_tree(files_tree)
        make_directories_tree(dirs_tree)
        servers: list[tuple[str, Callable[[], AbstractContextManager[Target]]]] = [
            ("BuildGrid 0.4.4 (disk + Redis index)", lambda: buildgrid_server(work / "bg")),
            (
                "asynccas (disk + SQLite index)",
                lambda: asynccas_server(work / "ac", index="sqlite"),
            ),
        ]
        for name, start in servers:
            with start() as target:
                figures = anyio.run(
                    measure, target, work / name.split()[0], files_tree, dirs_tree,
                    backend_options={"use_uvloop": True},
                )  # fmt: skip
            rows.append((name, figures))
    lines = [
        "### Client: download_directory (10,000 files) and GetTree (5,000 directories)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        "- command: `make bench` (`python -m benchmarks client`)",
        "- download: asynccas.client.CasClient with its persistent cache, first empty (cold),"
        " then filled by the first run (warm); GetTree: the same client without a cache,"
        " first call after upload versus the best of three repeats",
        "",
        "| server | download cold s | download warm s | warm speed-up | GetTree first s |"
        " GetTree repeated s | GetTree speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f in rows:
        lines.append(
            f"| {name} | {f['download_cold']:.2f} | {f['download_warm']:.2f} |"
            f" {f['download_cold'] / f['download_warm']:.1f}x | {f['get_tree_first']:.3f} |"
            f" {f['get_tree_repeated']:.3f} | {f['get_tree_first'] / f['get_tree_repeated']:.1f}x |"
        )
    lines += ["", "Target: repeated GetTree more than 10x faster than the first call.", ""]
    return "\n".join(lines)
