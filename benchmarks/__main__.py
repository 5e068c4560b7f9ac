"""``make bench``: run the benchmarks against asynccas and BuildGrid in one run and record the
figures in benchmarks/RESULTS.md (newest first). ``python -m benchmarks fmb`` runs just one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import bazel_traffic, client, fmb, harness

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Produced by `make bench`. Every figure compares asynccas with BuildGrid 0.4.4 (from PyPI,\n"
    "in a throw-away virtual environment) measured in the same run on the same machine, because\n"
    "these machines are shared and noisy: read the ratios, not the absolute numbers.\n"
)
BENCHMARKS: dict[str, Callable[..., str]] = {
    "bazel-traffic": bazel_traffic.run,
    "fmb": fmb.run,
    "client": client.run,
    "harness": harness.run,
}


def record(section: str) -> None:
    previous = RESULTS.read_text() if RESULTS.exists() else HEADER
    body = previous[len(HEADER) :] if previous.startswith(HEADER) else "\n" + previous
    RESULTS.write_text(f"{HEADER}\n{section.rstrip()}\n\n{body.lstrip(chr(10))}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], default=[])
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per load (fmb: per server and round; each benchmark has a default)",
    )
    parser.add_argument("--no-record", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args()
    for name in args.names or list(BENCHMARKS):
        timing = {} if args.duration is None else {"duration": args.duration}
        section = BENCHMARKS[name](**timing)
        print(section)
        if not args.no_record:
            record(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
