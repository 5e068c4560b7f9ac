"""asynccas in front of other servers: how many upstream calls a caching proxy makes per client
call, with and without its existence cache, and what a frontend sharding over three storage
nodes does against one node.

Proxy: one upstream asynccas and two proxies of it, `serve --upstream` (existence cache on)
and the same graph without the existence cache (`--config`). Each proxy gets its own actions
(three blobs each, in Bazel's size mix): a cold round uploads them the way Bazel does
(FindMissingBlobs, ByteStream.Write of what is missing, UpdateActionResult), then warm rounds
ask again (GetActionResult, FindMissingBlobs of the same blobs), 8 clients at a time. The
upstream counts what it answers (its Prometheus metrics).

Cluster: the `bazel-like` load (16 clients) against one `asynccas serve` node and against a
frontend sharding over three such nodes, taking turns round after round. All processes share
this machine's two cores, so the frontend's extra hop is pure cost here: the figure shows what
the hop costs, not how far more machines scale.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.bench.runner import RunConfig
from asynccas.bench.runner import run as run_scenario
from asynccas.bench.scenarios import SIZE_MIX_BAZEL, Settings, fresh_seed
from asynccas.client import CasClient
from asynccas.digest import Digest
from benchmarks.fmb import machine
from benchmarks.peers import process
from tests.support.redis_servers import free_port

ACTIONS = 300
WARM_ROUNDS = 3
CLIENTS = 8


@dataclass(frozen=True)
class Server:
    address: str
    server_pid: int
    metrics: str | None  # HOST:PORT of its Prometheus endpoint, if on


@contextmanager
def asynccas(work: Path, name: str, *flags: str, metrics: bool = False) -> Iterator[Server]:
    """One `asynccas serve` process on a free port."""
    port = free_port()
    metrics_address = f"127.0.0.1:{free_port()}" if metrics else None
    metrics_flags = ["--metrics-address", metrics_address] if metrics_address else []
    args = [
        sys.executable, "-m", "asynccas.cli", "serve", "--address", f"127.0.0.1:{port}",
        "--log-level", "WARNING", *metrics_flags, *flags,
    ]  # fmt: skip
    with process(args, work / f"{name}.log", port) as child:
        yield Server(f"127.0.0.1:{port}", child.pid, metrics_address)


def answered(server: Server) -> Counter[str]:
    """The calls ``server`` answered so far, by method (from its metrics endpoint)."""
    url = f"http://{server.metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    calls: Counter[str] = Counter()
    for method, count in re.findall(r'asynccas_rpcs_total\{[^}]*method="(\w+)"[^}]*\} (\S+)', text):
        calls[method] += int(float(count))
    return calls


def actions(seed: int) -> list[tuple[Digest, list[tuple[Digest, bytes]]]]:
    """``ACTIONS`` actions of three blobs each, sizes drawn from Bazel's mix."""
    rng = random.Random(seed)
    made = []
    for number in range(ACTIONS):
        blobs = []
        for _ in range(3):
            low, high, _ = rng.choices(SIZE_MIX_BAZEL, [s for _, _, s in SIZE_MIX_BAZEL])[0]
            size = int(low * (high / low) ** rng.random())
            data = rng.randbytes(size)
            blobs.append((Digest.of(data), data))
        made.append((Digest.of(b"action %d %d" % (seed, number)), blobs))
    return made


async def bazel_rounds(endpoint: str, work: list[tuple[Digest, list[tuple[Digest, bytes]]]],
                       warm: bool) -> tuple[Counter[str], float]:  # fmt: skip
    """One round over ``work`` through ``endpoint``: the client calls made, and seconds."""
    sent: Counter[str] = Counter()
    limiter = anyio.CapacityLimiter(CLIENTS)
    started = time.perf_counter()
    async with CasClient(endpoint, max_concurrency=CLIENTS, chunk_size=16 * 1024) as client:

        async def one(action: Digest, blobs: list[tuple[Digest, bytes]]) -> None:
            async with limiter:
                await client.get_action_result(action)
                sent["GetActionResult"] += 1
                missing = await client.find_missing([d for d, _ in blobs])
                sent["FindMissingBlobs"] += 1
                if warm:
                    assert not missing, "a warm round found blobs missing"
                    return
                for digest, data in blobs:
                    if digest in missing:
                        await client.write_blob(digest, data)
                        sent["Write"] += 1
                result = re_pb2.ActionResult()
                result.output_files.add(path="out", digest=blobs[0][0].to_proto())
                await client.update_action_result(action, result)
                sent["UpdateActionResult"] += 1

        async with anyio.create_task_group() as tasks:
            for action, blobs in work:
                tasks.start_soon(one, action, blobs)
    return sent, time.perf_counter() - started


def _proxy_figures(work_dir: Path) -> list[str]:
    rows = []
    with ExitStack() as stack:
        upstream = stack.enter_context(
            asynccas(work_dir, "upstream", "--data-dir", str(work_dir / "upstream"),
                     "--no-fsync", metrics=True)
        )  # fmt: skip
        url = f"grpc://{upstream.address}"
        plain = work_dir / "plain.toml"
        plain.write_text(
            'cas = "proxy"\n\n[storage.proxy]\ntype = "with-cache"\nfast = "local"\n'
            'slow = "upstream"\n\n[storage.local]\ntype = "sqlite-index"\npath = "index.sqlite"\n'
            'storage = "files"\nfsync = false\n\n[storage.files]\ntype = "disk"\npath = "."\n'
            f'fsync = false\n\n[storage.upstream]\ntype = "remote"\nurl = "{url}"\n\n'
            f'[action_cache]\ntype = "remote"\nurl = "{url}"\n'
        )
        proxies = {
            "serve --upstream (existence cache on)": stack.enter_context(
                asynccas(work_dir, "cached", "--upstream", url, "--no-fsync",
                         "--data-dir", str(work_dir / "cached"))
            ),
            "the same without the existence cache": stack.enter_context(
                asynccas(work_dir, "plain", "--config", str(plain))
            ),
        }  # fmt: skip
        for seed, (name, proxy) in enumerate(proxies.items()):
            work = actions(seed)
            endpoint = f"grpc://{proxy.address}"
            before = answered(upstream)
            cold_sent, _ = anyio.run(bazel_rounds, endpoint, work, False)
            cold_up = answered(upstream) - before
            before = answered(upstream)
            warm_sent: Counter[str] = Counter()
            warm_seconds = []
            for _ in range(WARM_ROUNDS):
                sent, seconds = anyio.run(bazel_rounds, endpoint, work, True)
                warm_sent += sent
                warm_seconds.append(seconds)
            warm_up = answered(upstream) - before
            rows.append(
                f"| {name} | {cold_up.total() / cold_sent.total():.2f}"
                f" | {warm_up.total() / warm_sent.total():.2f}"
                f" | {warm_up['FindMissingBlobs'] / warm_sent['FindMissingBlobs']:.3f}"
                f" | {ACTIONS / statistics.median(warm_seconds):.0f} |"
            )
    return rows


def _cluster_figures(work_dir: Path, duration: float, rounds: int) -> list[str]:
    rates: dict[str, list[float]] = {"one node": [], "frontend over three nodes": []}
    with ExitStack() as stack:
        single = stack.enter_context(
            asynccas(work_dir, "single", "--storage", "memory", "--max-size", "4G")
        )
        nodes = [
            stack.enter_context(
                asynccas(work_dir, f"node{i}", "--storage", "memory", "--max-size", "4G")
            )
            for i in range(3)
        ]
        config = work_dir / "frontend.toml"
        names = [f"node{i}" for i in range(3)]
        config.write_text(
            f'cas = "cluster"\n\n[storage.cluster]\ntype = "sharded"\nshards = {names}\n\n'
            + "".join(
                f'[storage.{n}]\ntype = "remote"\nurl = "grpc://{t.address}"\n\n'
                for n, t in zip(names, nodes, strict=True)
            )
            + f'[action_cache]\ntype = "remote"\nurl = "grpc://{nodes[0].address}"\n'
        )
        frontend = stack.enter_context(asynccas(work_dir, "frontend", "--config", str(config)))
        targets = {"one node": single, "frontend over three nodes": frontend}
        for round_number in range(rounds):
            order = list(targets.items())
            if round_number % 2:
                order.reverse()
            for name, target in order:
                result = run_scenario(
                    RunConfig(
                        endpoint=f"grpc://{target.address}", scenario="bazel-like",
                        concurrency=16, duration=duration, processes=2,
                        settings=Settings(seed=fresh_seed()), server_pid=target.server_pid,
                    ),
                    progress=False,
                )  # fmt: skip
                stats = result.ops.get("action")
                rates[name].append(stats.histogram.count / result.seconds if stats else 0.0)
    one, three = (statistics.median(r) for r in rates.values())
    return [
        f"| one node | {one:.0f} | 1.00 |",
        f"| frontend over three nodes | {three:.0f} | {three / one:.2f} |",
    ]


def run(duration: float = 15.0, rounds: int = 2) -> str:
    with tempfile.TemporaryDirectory(prefix="asynccas-proxy-bench-") as tmp:
        work_dir = Path(tmp)
        proxy_rows = _proxy_figures(work_dir)
        cluster_rows = _cluster_figures(work_dir, duration, rounds)
    return "\n".join(
        [
            f"### proxy and cluster: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Machine: {machine()}. Reproduce: `python -m benchmarks proxy`.",
            "",
            f"A caching proxy in front of one asynccas: {ACTIONS} actions of three blobs (Bazel's"
            f" size mix) uploaded once through it, then asked again {WARM_ROUNDS} times"
            f" (GetActionResult, FindMissingBlobs), {CLIENTS} clients. Upstream calls are what the"
            " upstream answered; target: under 0.1 upstream FindMissingBlobs per client"
            " FindMissingBlobs on a warm cache.",
            "",
            "| proxy | upstream calls per client call, cold | warm | upstream FindMissingBlobs"
            " per client FindMissingBlobs, warm | warm actions/s |",
            "| --- | ---: | ---: | ---: | ---: |",
            *proxy_rows,
            "",
            f"`bazel-like` (16 clients, memory stores, median of {rounds} rounds of"
            f" {duration:.0f} s) against one node and a frontend sharding over three; every"
            " process on this one 2-core machine:",
            "",
            "| target | actions/s | / one node |",
            "| --- | ---: | ---: |",
            *cluster_rows,
        ]
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(run())
