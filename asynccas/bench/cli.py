"""``asynccas bench``: the load harness's command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from asynccas.bench.report import summary, to_html
from asynccas.bench.runner import BenchmarkFailed, RunConfig, RunResult, run
from asynccas.bench.scenarios import SCENARIOS, Settings, fresh_seed


def add_bench_commands(commands: Any, parse_size: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test any REAPI endpoint",
        description="Load-test a REAPI CAS (asynccas, BuildGrid, bazel-remote, ...) and report"
        " throughput, latency percentiles, errors by status and CPU use.",
    )
    bench.add_argument("endpoint", help="grpc://HOST:PORT, or 'report' to merge JSON runs")
    bench.add_argument(
        "runs", nargs="*", type=Path, help="with 'report': JSON files of earlier runs"
    )
    bench.add_argument("--scenario", choices=sorted(SCENARIOS), default="fmb")
    bench.add_argument(
        "--concurrency", type=int, default=8, help="operations in flight (default 8)"
    )
    limit = bench.add_mutually_exclusive_group()
    limit.add_argument("--duration", type=float, default=None, help="seconds to run (default 10)")
    limit.add_argument("--requests", type=int, default=None, help="operations to run")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--blob-size", type=parse_size, default=4096, help="e.g. 4K, 256M")
    size.add_argument("--size-mix", type=Path, default=None,
                      help="JSON list of [smallest, largest, share] for bazel-like,"
                           " bazel-download and batch-client")  # fmt: skip
    bench.add_argument("--batch", type=int, default=None,
                       help="digests or blobs per request (fmb: 1000, batch RPCs: 100, get-tree: 1000 directories)")  # fmt: skip
    bench.add_argument("--present", type=_share, default=0.5,
                       help="fmb: share of the digests stored beforehand, 0 to 1 (default 0.5)")  # fmt: skip
    bench.add_argument("--chunk-size", type=parse_size, default=16 * 1024,
                       help="data per ByteStream WriteRequest (default 16K, as Bazel sends)")  # fmt: skip
    bench.add_argument("--seed", type=int, default=None,
                       help="makes the run's blobs and actions; the default, a new one per run,"
                            " keeps a run from meeting an earlier run's data already stored")  # fmt: skip
    bench.add_argument("--instance", default="", help="REAPI instance name")
    bench.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                       help="client processes (default: up to 2)")  # fmt: skip
    bench.add_argument("--server-pid", type=int, default=None,
                       help="PID of a local server, to report its CPU use too")  # fmt: skip
    bench.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    bench.add_argument("--html", type=Path, default=None, help="write an HTML report")


def _share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        share = math.nan
    if not 0 <= share <= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1")
    return share


_DEFAULT_BATCH = {"fmb": 1000, "get-tree": 1000, "batch-client": 200, "bazel-download": 200,
                  "action-cache": 1000}  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    if args.endpoint == "report":
        results = [RunResult.from_json(json.loads(path.read_text())) for path in args.runs]
        for result in results:
            print(summary(result))
        if args.html:
            args.html.write_text(to_html(results))
        return 0
    if args.chunk_size <= 0:
        print("asynccas bench: --chunk-size must be at least 1 byte", file=sys.stderr)
        return 2
    size_mix = None
    if args.size_mix is not None:
        size_mix = [tuple(row) for row in json.loads(args.size_mix.read_text())]
    batch = args.batch or _DEFAULT_BATCH.get(args.scenario, 100)
    duration = args.duration if args.requests is None else None
    config = RunConfig(
        endpoint=args.endpoint, scenario=args.scenario, instance=args.instance,
        concurrency=args.concurrency, duration=duration or (10.0 if args.requests is None else None),
        requests=args.requests, processes=max(1, min(args.processes, args.concurrency)),
        settings=Settings(blob_size=args.blob_size, batch=batch, size_mix=size_mix,
                          present=args.present, chunk_size=args.chunk_size,
                          seed=fresh_seed() if args.seed is None else args.seed),
        server_pid=args.server_pid,
    )  # fmt: skip
    try:
        result = run(config)
    except BenchmarkFailed as exc:
        print(f"asynccas bench: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json()))
    if args.html:
        previous = [RunResult.from_json(json.loads(p.read_text())) for p in args.runs]
        args.html.write_text(to_html([*previous, result]))
    failed = any(s.errors or s.corruptions for s in result.ops.values())
    if any(s.corruptions for s in result.ops.values()):
        print("CORRUPTION: a read returned data that does not match its digest", file=sys.stderr)
    return 1 if failed else 0
