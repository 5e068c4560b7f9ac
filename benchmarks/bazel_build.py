"""A real Bazel build against asynccas and against BuildGrid 0.4.4, in the same run: Debian's
``bazel-bootstrap`` (Bazel 4.2.3) builds a generated workspace of genrules whose outputs follow
a build's size mix, and the remote part of two builds is timed for each server:

- uploading: a clean build with ``--remote_cache`` minus the same clean build without it
  (Bazel runs every action, then uploads the outputs, action and command of each);
- downloading: a clean build in a fresh output base that gets every action from the cache
  (one GetActionResult and a ByteStream.Read per output) minus a ``--nobuild`` run, which
  does all the loading and analysis but no action.

Each build runs five times per server, the servers taking turns; figures are the medians. A
third server, ``floor.py --keep-all`` (blobs and action results in dicts, nothing hashed,
checked or written to disk), shows how much of the remote part is Bazel's own work: the least
any server on grpc.aio could reach. The workspace needs no external repository, so Bazel works
offline. Bazel reports cache trouble as
warnings and exits 0, so every build's output is checked: the downloading build must execute
no action locally ("N remote cache hit").
"""

from __future__ import annotations

import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bazel_traffic import floor_server
from benchmarks.fmb import asynccas_server, machine
from benchmarks.peers import Target, buildgrid_server

ACTIONS = 600
SIZE_MIX = (  # (smallest, largest, share of outputs): Bazel's blobs are mostly small
    (1024, 64 * 1024, 0.80),
    (64 * 1024, 1024 * 1024, 0.17),
    (1024 * 1024, 8 * 1024 * 1024, 0.03),
)
ASYNCCAS = "asynccas (defaults: disk + SQLite, fsync)"
BUILDGRID = "BuildGrid 0.4.4 (disk + Redis index)"
FLOOR = "grpc.aio floor (blobs and action results in dicts, nothing checked)"
# Debian's bazelrc turns on sandbox debugging; sandboxing would time the sandbox, not the cache.
COMMON = ["--nosandbox_debug", "--spawn_strategy=standalone", "--jobs=8", "--color=no",
          "--curses=no", "--show_progress_rate_limit=60",
          "--symlink_prefix=/"]  # no bazel-* links, which //... would walk into  # fmt: skip


def bazel_available() -> bool:
    return shutil.which("bazel") is not None


def make_workspace(root: Path, actions: int = ACTIONS, seed: int = 0) -> int:
    """A workspace of ``actions`` genrules, each writing one output of a size drawn from the
    mix (distinct content per rule, and per ``seed``); returns the bytes of all outputs."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "WORKSPACE").write_text('workspace(name = "bench")\n')
    rules, total = [], 0
    for index in range(actions):
        pick, size = rng.random(), 1024
        for low, high, share in SIZE_MIX:
            if pick < share:
                size = int(low * (high / low) ** rng.random())
                break
            pick -= share
        total += size
        # A line naming the rule, then zeros: cheap to run, and no two outputs alike.
        rules.append(
            f'genrule(name = "g{index}", outs = ["out{index}.bin"],'
            f' cmd = "(echo {seed}-{index}; head -c {size} /dev/zero) > $@")'
        )
    (root / "BUILD").write_text("\n".join(rules) + "\n")
    return total


@dataclass
class Bazel:
    workspace: Path
    output_base: Path

    def run(self, *args: str) -> tuple[float, str]:
        """Run a bazel command; its wall time and output. Fails if bazel fails."""
        command = ["bazel", f"--output_base={self.output_base}", *args]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=self.workspace, capture_output=True, text=True,
                              timeout=1800)  # fmt: skip
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return took, done.stderr

    def shutdown(self) -> None:
        subprocess.run(["bazel", f"--output_base={self.output_base}", "shutdown"],
                       cwd=self.workspace, capture_output=True, timeout=300)  # fmt: skip


def _check_no_cache_trouble(output: str, server: str) -> None:
    for line in output.splitlines():
        if "WARNING" in line and ("remote" in line.lower() or "cache" in line.lower()):
            raise RuntimeError(f"Bazel warned about {server}: {line}")


def _hits(output: str) -> int:
    match = re.search(r"(\d+) remote cache hit", output)
    return int(match.group(1)) if match else 0


@dataclass
class Timings:
    upload: list[float] = field(default_factory=list)
    download: list[float] = field(default_factory=list)


def measure(target: Target, name: str, work: Path, round_number: int) -> tuple[float, float]:
    """The remote part of an uploading and of a downloading build against ``target``."""
    workspace = work / f"ws-{round_number}-{abs(hash(name)) % 1000}"
    make_workspace(workspace, seed=round_number * 1000 + abs(hash(name)) % 1000)
    remote = [f"--remote_cache=grpc://{target.address}", "--remote_timeout=600"]
    builder = Bazel(workspace, work / f"base-{workspace.name}")
    try:
        builder.run("info", "release")  # starts the server: not part of any timing
        local, _ = builder.run("build", *COMMON, "//...")
        builder.run("clean")
        uploading, output = builder.run("build", *COMMON, *remote, "//...")
        _check_no_cache_trouble(output, name)
    finally:
        builder.shutdown()
    fresh = Bazel(workspace, work / f"fresh-{workspace.name}")
    try:
        fresh.run("info", "release")
        nobuild, _ = fresh.run("build", *COMMON, *remote, "--nobuild", "//...")
        downloading, output = fresh.run("build", *COMMON, *remote, "//...")
        _check_no_cache_trouble(output, name)
        if _hits(output) < ACTIONS:
            raise RuntimeError(f"{name}: only {_hits(output)} of {ACTIONS} actions were hits")
    finally:
        fresh.shutdown()
    return uploading - local, downloading - nobuild


def run(duration: float = 0.0, *, rounds: int = 5) -> str:
    """Five rounds: a remote part of a few seconds spreads by a second across rounds of one
    server, and two rounds' medians swung the ratio by a quarter between runs."""
    del duration  # fixed amounts of work
    if not bazel_available():
        return ("### Bazel builds: asynccas vs BuildGrid 0.4.4\n\nNot run: no `bazel` on this"
                " machine (`apt-get install bazel-bootstrap`).\n")  # fmt: skip
    timings = {ASYNCCAS: Timings(), BUILDGRID: Timings(), FLOOR: Timings()}
    with tempfile.TemporaryDirectory(prefix="asynccas-bench-bazel-build-") as scratch:
        work = Path(scratch)
        total = make_workspace(work / "size-probe")
        with ExitStack() as stack:
            servers = {
                BUILDGRID: stack.enter_context(buildgrid_server(work / "bg")),
                ASYNCCAS: stack.enter_context(
                    asynccas_server(work / "ac", index="sqlite", fsync=True)
                ),
                FLOOR: stack.enter_context(floor_server(work, keep_all=True)),
            }
            for round_number in range(rounds):
                order = list(servers.items())
                if round_number % 2:
                    order.reverse()
                for name, target in order:
                    upload, download = measure(target, name, work, round_number)
                    print(f"{name}: round {round_number + 1}: remote part of the uploading"
                          f" build {upload:.1f} s, downloading {download:.1f} s", flush=True)  # fmt: skip
                    timings[name].upload.append(upload)
                    timings[name].download.append(download)
    return markdown(timings, total, rounds)


def markdown(timings: dict[str, Timings], total: int, rounds: int) -> str:
    ours, theirs, floor = timings[ASYNCCAS], timings[BUILDGRID], timings[FLOOR]
    lines = [
        "### Bazel builds: asynccas vs BuildGrid 0.4.4",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
        f"- command: `make bench ARGS=bazel-build`; Bazel 4.2.3 (Debian `bazel-bootstrap`),"
        f" {ACTIONS} genrules, {total / 2**20:,.0f} MiB of outputs; {rounds} rounds, servers"
        " taking turns, medians; `--spawn_strategy=standalone --jobs=8`",
        "- remote part = build time with `--remote_cache` minus the same build without it"
        " (uploading), or minus a `--nobuild` run (downloading, every action a hit)",
        f"- floor: {FLOOR} (`benchmarks/floor.py --keep-all`): Bazel's own share of the remote"
        " part, the least a server could reach",
        "",
        "| build | asynccas s | BuildGrid s | floor s | asynccas / BuildGrid | floor / BuildGrid"
        " | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for what, a, b, c in (
        ("uploading (clean build, all actions run, outputs uploaded)",
         ours.upload, theirs.upload, floor.upload),
        ("downloading (fresh output base, all actions hits)",
         ours.download, theirs.download, floor.download),
    ):  # fmt: skip
        mine, peer, least = statistics.median(a), statistics.median(b), statistics.median(c)
        ratio = mine / peer if peer > 0 else float("inf")
        floor_ratio = least / peer if peer > 0 else float("inf")
        verdict = "met" if ratio <= 0.5 else "MISSED"
        lines.append(
            f"| {what} | {mine:.1f} | {peer:.1f} | {least:.1f} | {ratio:.2f} | {floor_ratio:.2f}"
            f" | at most 0.5: {verdict} |"
        )
    return "\n".join(lines) + "\n"
