"""``asynccas cas ...``: upload, download, check and print blobs of any REAPI cache."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import anyio

from asynccas.client.caches import ClientCaches
from asynccas.client.cas import CasClient, Progress
from asynccas.client.options import (
    add_connection_arguments,
    connection_options,
    default_endpoint,
    digest_argument,
)


def add_cas_commands(commands: Any) -> None:
    cas = commands.add_parser("cas", help="talk to any REAPI cache: upload, download, missing, cat")
    cas.add_argument(
        "--endpoint",
        default=default_endpoint(),
        help="the cache, grpc://HOST:PORT or grpcs://HOST:PORT (default: $ASYNCCAS_ENDPOINT,"
        " else the local asynccas at grpc://127.0.0.1:50051)",
    )
    cas.add_argument("--instance", default="", help="REAPI instance name")
    cas.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_connection_arguments(cas)
    cas.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="persistent local cache (default: $XDG_CACHE_HOME/asynccas/client)",
    )
    cas.add_argument("--no-cache", action="store_true", help="do not use the local cache")
    # --json may also follow the verb: `asynccas cas missing --json DIGEST`.
    after_verb = argparse.ArgumentParser(add_help=False)
    after_verb.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    verbs = cas.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help, parents=[after_verb])
        return parser

    upload = verb("upload", "upload a file or a directory; prints its digest")
    upload.add_argument("path", type=Path)
    download = verb("download", "download a blob to a file, or a tree (--dir)")
    download.add_argument("digest", type=digest_argument, metavar="HASH/SIZE")
    download.add_argument("path", type=Path)
    download.add_argument(
        "--dir", action="store_true", help="DIGEST is a Directory: fetch the tree"
    )
    download.add_argument("--executable", action="store_true", help="mark the file executable")
    missing = verb("missing", "print which digests the cache lacks")
    missing.add_argument("digests", type=digest_argument, nargs="+", metavar="HASH/SIZE")
    cat = verb("cat", "write a blob to standard output")
    cat.add_argument("digest", type=digest_argument, metavar="HASH/SIZE")


class ProgressLine:
    """A one-line progress display on a terminal: phase, share, bytes, rate and time left,
    refreshed as chunks move; silent when output is not a terminal."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 0.2) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._interval = interval
        self._last = 0.0
        self._started = time.monotonic()
        self._shown = False

    def __call__(self, progress: Progress) -> None:
        if self._enabled:
            now = time.monotonic()
            if now - self._last >= self._interval or progress.phase == "done":
                self._last = now
                self._stream.write("\r" + describe(progress, now - self._started) + "\x1b[K")
                self._stream.flush()
                self._shown = True

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()


def describe(progress: Progress, elapsed: float) -> str:
    """``sending   42.0%   210.0 / 500.0 MiB   3/7 blobs   85.2 MiB/s   ETA 3 s``."""
    done, total = progress.bytes_done, progress.bytes_total
    percent = 100 * done / total if total else 100.0
    rate = done / elapsed if elapsed > 0 else 0.0
    line = (
        f"{progress.phase:<9} {percent:5.1f}%  {done / 2**20:8.1f} / {total / 2**20:.1f} MiB"
        f"  {progress.blobs_done}/{progress.blobs_total} blobs"
    )
    if rate > 0 and progress.phase in ("sending", "receiving"):
        line += f"  {rate / 2**20:.1f} MiB/s  ETA {max(total - done, 0) / rate:.0f} s"
    return line


def _emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record) if args.json else text)


async def run_cas_command(args: argparse.Namespace) -> int:
    progress = ProgressLine()
    try:
        caches = None if args.no_cache else ClientCaches(args.cache_dir)
        tls, token = connection_options(args)
        async with CasClient(
            args.endpoint, args.instance, progress=progress, cache=caches, tls=tls, token=token
        ) as cas:
            if args.verb == "upload":
                path: Path = args.path
                if await anyio.Path(path).is_dir():
                    digest = await cas.upload_directory(path)
                    kind = "directory"
                else:
                    digest = await cas.upload_file(path)
                    kind = "file"
                progress.close()
                _emit(args, {"path": str(path), "kind": kind, "digest": str(digest)}, str(digest))
            elif args.verb == "download":
                if args.dir:
                    await cas.download_directory(args.digest, args.path)
                else:
                    await cas.download_file(args.digest, args.path, executable=args.executable)
                progress.close()
                _emit(
                    args,
                    {
                        "digest": str(args.digest),
                        "path": str(args.path),
                        "kind": "directory" if args.dir else "file",
                    },
                    str(args.path),
                )
            elif args.verb == "missing":
                missing = await cas.find_missing(args.digests)
                if args.json:
                    print(json.dumps({"missing": [str(d) for d in missing]}))
                else:
                    for digest in missing:
                        print(digest)
                return 1 if missing else 0
            elif args.verb == "cat":
                out = os.fdopen(sys.stdout.fileno(), "wb", closefd=False)
                async for chunk in cas.read_blob(args.digest):
                    out.write(chunk)
                out.flush()
    finally:
        progress.close()
    return 0
