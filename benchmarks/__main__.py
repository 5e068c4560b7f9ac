"""``make bench``: run the benchmarks against asynccas and BuildGrid in one run and record the
figures in benchmarks/RESULTS.md (newest first). ``python -m benchmarks fmb`` runs just one."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import (
    bazel_build,
    bazel_traffic,
    client,
    fmb,
    harness,
    proxy,
    reapi212,
    scaleout,
)

RESULTS = Path(__file__).parent / "RESULTS.md"
SECTIONS = "## Latest run of each benchmark"
"""RESULTS.md is one page for users: what is written above this heading is kept as it is
(the headline figures, the machine, how to reproduce), and below it each benchmark has one
section, replaced by its newest run. History lives in git."""

BENCHMARKS: dict[str, Callable[..., str]] = {
    "bazel-build": bazel_build.run,
    "bazel-traffic": bazel_traffic.run,
    "fmb": fmb.run,
    "client": client.run,
    "harness": harness.run,
    "proxy": proxy.run,
    "reapi212": reapi212.run,
    "scaleout": scaleout.run,
}


def record(section: str, results: Path = RESULTS) -> None:
    """Put ``section`` (a Markdown block opening with a ``### `` heading) in place of the
    section of the same benchmark, or after the others if it has none yet."""
    text = results.read_text() if results.exists() else f"# Benchmark results\n\n{SECTIONS}\n"
    if SECTIONS not in text:
        text = text.rstrip() + f"\n\n{SECTIONS}\n"
    head, _, body = text.partition(SECTIONS)
    sections = [
        part.strip() for part in re.split(r"(?m)^(?=### )", body) if part.startswith("### ")
    ]
    title = _benchmark_of(section)
    if title in map(_benchmark_of, sections):
        sections = [section.strip() if _benchmark_of(s) == title else s for s in sections]
    else:
        sections.append(section.strip())
    results.write_text(f"{head}{SECTIONS}\n\n" + "\n\n".join(sections) + "\n")


def _benchmark_of(section: str) -> str:
    """A section's benchmark: its heading up to the first comma or colon (figures that a
    heading carries, such as a digest count, do not make it another benchmark)."""
    heading = section.strip().splitlines()[0]
    return heading.split(":")[0].split(",")[0].strip()


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
