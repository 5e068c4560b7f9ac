"""``asynccas bench``: the load harness's command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from asynccas.bench.report import comparison, summary, to_html
from asynccas.bench.runner import BenchmarkFailed, RunConfig, RunResult, run
from asynccas.bench.scenarios import SCENARIOS, Settings, fresh_seed
from asynccas.client.options import add_connection_arguments, connection_options
from asynccas.errors import CasError


def add_bench_commands(commands: Any, parse_size: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test any REAPI endpoint",
        description="Load-test a REAPI CAS (asynccas, BuildGrid, bazel-remote, ...) and report"
        " throughput, latency percentiles, errors by status and CPU use.",
    )
    bench.add_argument(
        "endpoint",
        help="grpc://HOST:PORT (`asynccas bench report --help`: compare saved runs)",
    )
    bench.add_argument(
        "runs", nargs="*", type=Path, help="JSON files of earlier runs, shown beside this one"
    )
    bench.add_argument("--label", default=None,
                       help="what reports call this run (default: its scenario and endpoint)")  # fmt: skip
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
    bench.add_argument("--compressor", choices=["zstd"], default=None,
                       help="move ByteStream data zstd-compressed (the server must offer it)")  # fmt: skip
    bench.add_argument("--compressible", action="store_true",
                       help="ByteStream scenarios, bazel-like and bazel-download: blobs of 3 bits"
                            " of entropy per byte (zstd makes them about 40%%), not random bytes")  # fmt: skip
    bench.add_argument("--seed", type=int, default=None,
                       help="makes the run's blobs and actions; the default, a new one per run,"
                            " keeps a run from meeting an earlier run's data already stored")  # fmt: skip
    bench.add_argument("--instance", default="", help="REAPI instance name")
    bench.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                       help="client processes (default: up to 2)")  # fmt: skip
    bench.add_argument("--server-pid", type=int, default=None,
                       help="PID of a local server, to report its CPU use too")  # fmt: skip
    bench.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    add_connection_arguments(bench)
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


def report_parser() -> argparse.ArgumentParser:
    report = argparse.ArgumentParser(
        prog="asynccas bench report",
        description="Show saved runs (`asynccas bench ... --json FILE`) one after the other and,"
        " for two or more, side by side: each operation's ops/s as a ratio of the first run's,"
        " with p50 and p99.",
    )
    report.add_argument("runs", nargs="+", type=Path, help="JSON files of runs; the first is"
                        " the baseline of the ratios")  # fmt: skip
    report.add_argument("--label", action="append", default=[],
                        help="name the runs in order (repeat once per run)")  # fmt: skip
    report.add_argument("--html", type=Path, default=None,
                        help="also write one HTML page with plots of every run")  # fmt: skip
    return report


def run_report(argv: list[str]) -> int:
    args = report_parser().parse_args(argv)
    if len(args.label) > len(args.runs):
        report_parser().error("more --label than runs")
    try:
        results = [RunResult.from_json(json.loads(path.read_text())) for path in args.runs]
    except (OSError, ValueError, KeyError) as exc:
        print(f"asynccas bench report: cannot read a run: {exc}", file=sys.stderr)
        return 2
    for result, label in zip(results, args.label, strict=False):
        result.config["label"] = label
    for result in results:
        print(summary(result))
    if len(results) > 1:
        print(comparison(results))
    if args.html:
        args.html.write_text(to_html(results))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    if args.endpoint == "report":  # only without --help: main() hands `bench report` over
        return run_report([str(path) for path in args.runs])
    if args.chunk_size <= 0:
        print("asynccas bench: --chunk-size must be at least 1 byte", file=sys.stderr)
        return 2
    size_mix = None
    if args.size_mix is not None:
        size_mix = [tuple(row) for row in json.loads(args.size_mix.read_text())]
    try:
        tls, token = connection_options(args)
    except CasError as exc:
        print(f"asynccas bench: {exc}", file=sys.stderr)
        return 2
    batch = args.batch or _DEFAULT_BATCH.get(args.scenario, 100)
    duration = args.duration if args.requests is None else None
    config = RunConfig(
        endpoint=args.endpoint, scenario=args.scenario, instance=args.instance,
        concurrency=args.concurrency, duration=duration or (10.0 if args.requests is None else None),
        requests=args.requests, processes=max(1, min(args.processes, args.concurrency)),
        settings=Settings(blob_size=args.blob_size, batch=batch, size_mix=size_mix,
                          present=args.present, chunk_size=args.chunk_size,
                          compressor=args.compressor, compressible=args.compressible,
                          seed=fresh_seed() if args.seed is None else args.seed),
        server_pid=args.server_pid, label=args.label, tls=tls, token=token,
    )  # fmt: skip
    try:
        result = run(config)
    except BenchmarkFailed as exc:
        print(f"asynccas bench: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json()))
    previous = [RunResult.from_json(json.loads(p.read_text())) for p in args.runs]
    if previous:
        print(comparison([*previous, result]))
    if args.html:
        args.html.write_text(to_html([*previous, result]))
    failed = any(s.errors or s.corruptions for s in result.ops.values())
    if any(s.corruptions for s in result.ops.values()):
        print("CORRUPTION: a read returned data that does not match its digest", file=sys.stderr)
    return 1 if failed else 0
