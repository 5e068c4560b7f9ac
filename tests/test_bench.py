"""``asynccas bench`` end to end: every scenario against a real server, and corruption detection."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas.bench.report import _timeline_svg
from asynccas.bench.runner import RunConfig, progress_line
from asynccas.bench.scenarios import SCENARIOS
from asynccas.bench.stats import OpStats
from asynccas.server.app import CasServer
from asynccas.server.bytestream import ByteStreamService
from asynccas.server.errors import Context
from asynccas.server.uploads import UploadSessions
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.memory import MemoryStorage
from tests.conftest import serve_with_bytestream
from tests.support.redis_servers import free_port

pytestmark = pytest.mark.anyio


def bench(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "bench", f"grpc://{target}", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_every_scenario_runs_clean(scenario: str, tmp_path: Path) -> None:
    async with CasServer(MemoryStorage(), MemoryActionCache(), address="127.0.0.1:0") as server:
        report = tmp_path / "run.json"
        html = tmp_path / "run.html"
        result = await anyio.to_thread.run_sync(
            lambda: bench(
                server.target,
                "--scenario",
                scenario,
                "--requests",
                "12",
                "--concurrency",
                "4",
                "--batch",
                "20",
                "--blob-size",
                "2M" if scenario.startswith("bytestream") else "4K",
                "--json",
                str(report),
                "--html",
                str(html),
            )
        )
        assert result.returncode == 0, result.stdout + result.stderr
        data = json.loads(report.read_text())
        assert data["client_cpu"] > 0
        for label, stats in data["ops"].items():
            assert stats["errors"] == {}, (label, stats["errors"])
            assert stats["corruptions"] == 0
        main_label = {
            "fmb": "FindMissingBlobs",
            "bazel-like": "action",
            "bazel-download": "action",
            "batch-client": "action",
        }.get(scenario)
        counted = data["ops"][main_label]["histogram"]["count"] if main_label else None
        assert counted in (None, 12)
        assert html.read_text().count("<svg") >= 2


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
@pytest.mark.parametrize("present", ["0", "0.25", "1"])
async def test_fmb_stores_the_share_of_digests_asked_for(present: str, tmp_path: Path) -> None:
    storage = MemoryStorage()
    async with CasServer(storage, MemoryActionCache(), address="127.0.0.1:0") as server:
        report = tmp_path / "run.json"
        args = ["--scenario", "fmb", "--present", present, "--batch", "40", "--requests", "4"]
        args += ["--processes", "1", "--json", str(report)]
        result = await anyio.to_thread.run_sync(lambda: bench(server.target, *args))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"40 digests, {float(present):.0%} present" in result.stdout
    # Every answer is checked against the digests the scenario left out: a wrong one would
    # count as a corruption and fail the run.
    assert json.loads(report.read_text())["ops"]["FindMissingBlobs"]["histogram"]["count"] == 4
    assert storage.total_size == round(40 * float(present)) * 64  # fmb's blobs are 64 bytes


@pytest.mark.parametrize("share", ["1.5", "-0.1", "nan", "half"])
def test_fmb_refuses_a_share_outside_zero_to_one(share: str) -> None:
    result = bench(f"127.0.0.1:{free_port()}", "--scenario", "fmb", "--present", share)
    assert result.returncode == 2
    assert f"{share!r} is not a share between 0 and 1" in result.stderr


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
async def test_report_sets_runs_against_several_endpoints_side_by_side(tmp_path: Path) -> None:
    runs: list[Path] = []
    async with (
        CasServer(MemoryStorage(), MemoryActionCache(), address="127.0.0.1:0") as first,
        CasServer(MemoryStorage(), MemoryActionCache(), address="127.0.0.1:0") as second,
    ):
        for server in (first, second):
            runs.append(tmp_path / f"{len(runs)}.json")
            args = ["--scenario", "batch-read", "--requests", "6", "--batch", "10"]
            args += ["--processes", "1", "--json", str(runs[-1])]
            result = await anyio.to_thread.run_sync(partial(bench, server.target, *args))
            assert result.returncode == 0, result.stdout + result.stderr
    # `make bench` names the server of a run (as the harness does): the page says which.
    named = json.loads(runs[1].read_text())
    named["config"]["server"] = "the second server"
    runs[1].write_text(json.dumps(named))
    page = tmp_path / "both.html"
    command = [sys.executable, "-m", "asynccas.cli", "bench", "report", *map(str, runs)]
    merged = await anyio.to_thread.run_sync(
        partial(
            subprocess.run,
            [*command, "--label", "first", "--html", str(page)],
            capture_output=True,
            text=True,
        )
    )
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.count("batch-read against grpc://") == 2
    # Side by side: each run's ops/s as a ratio of the first's, with p50 and p99.
    assert "runs: [1] first; [2] the second server" in merged.stdout
    comparison = merged.stdout.split("runs: [1]", 1)[1]
    (row,) = [line for line in comparison.splitlines() if line.startswith("BatchReadBlobs ")]
    cells = row.split()
    assert cells[2] == "1.00x"
    first_rate, second_rate = float(cells[1]), float(cells[5])
    # The ratio is of the unrounded rates: the printed ones may give another last digit.
    assert cells[6].endswith("x")
    assert float(cells[6][:-1]) == pytest.approx(second_rate / first_rate, rel=0.02, abs=0.01)
    text = page.read_text()
    assert "Run 1: first</h2>" in text
    assert "Run 2: the second server</h2>" in text
    assert "<h2>Side by side</h2>" in text
    # One histogram and one timeline for the operation, each drawing both runs, with a legend.
    assert text.count("<h3>BatchReadBlobs</h3>") == 1
    assert text.count("<svg") == 2
    assert "&#9632; [1] first" in text
    assert "latency (log scale)" in text
    assert "seconds (0 to" in text
    for colour in {text.split("<h2 style='color:")[i].split("'")[0] for i in (1, 2)}:
        assert text.count(colour) >= 4, f"run in {colour} is missing from a plot"
    saved = json.loads(runs[0].read_text())
    assert saved["asynccas_version"] not in ("", None)
    stats = saved["ops"]["BatchReadBlobs"]
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_report_has_a_help_of_its_own() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "bench", "report", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0
    assert shown.stdout.startswith("usage: asynccas bench report")
    assert "--label" in shown.stdout


def test_the_timeline_leaves_out_the_last_partial_second() -> None:
    """A run of 3.5 s has a fourth second with half the completions: plotting it drew a
    drop to half that never happened."""
    stats = OpStats()
    for second, count in ((0, 100), (1, 100), (2, 100), (3, 50)):
        stats.per_second[second] = count
    svg = _timeline_svg([(0, stats)], [3])
    (points,) = [part.split("'")[0] for part in svg.split("points='")[1:]]
    heights = {float(point.split(",")[1]) for point in points.split()}
    assert len(points.split()) == 3
    assert len(heights) == 1, "every full second is drawn at the same height"


class CorruptingByteStream(ByteStreamService):
    """The real service, except that reads flip one bit of the first chunk."""

    async def Read(
        self, request: bs_pb2.ReadRequest, context: Context
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        first = True
        async for response in super().Read(request, context):
            if first and response.data:
                response.data = bytes([response.data[0] ^ 1]) + response.data[1:]
                first = False
            yield response


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
async def test_corrupted_reads_are_reported(tmp_path: Path) -> None:
    storage = MemoryStorage()
    corrupting = CorruptingByteStream(storage, UploadSessions(storage))
    async with serve_with_bytestream(storage, corrupting) as port:
        report = tmp_path / "run.json"
        result = await anyio.to_thread.run_sync(
            lambda: bench(
                f"127.0.0.1:{port}",
                "--scenario",
                "bytestream-read",
                "--requests",
                "5",
                "--concurrency",
                "1",
                "--processes",
                "1",
                "--blob-size",
                "100K",
                "--json",
                str(report),
            )
        )
        assert result.returncode == 1
        assert "CORRUPTION" in result.stderr
        assert json.loads(report.read_text())["ops"]["ByteStream.Read"]["corruptions"] == 5


class RecordingByteStream(ByteStreamService):
    """Records the data size of every WriteRequest it receives."""

    def __init__(self, storage: MemoryStorage) -> None:
        super().__init__(storage, UploadSessions(storage))
        self.message_sizes: list[int] = []
        self.writes = 0

    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        self.writes += 1

        async def recorded() -> AsyncIterator[bs_pb2.WriteRequest]:
            async for request in request_iterator:
                self.message_sizes.append(len(request.data))
                yield request

        return await super().Write(recorded(), context)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
@pytest.mark.parametrize(
    ("chunk_args", "chunk_size"), [((), 16 * 1024), (("--chunk-size", "4K"), 4096)]
)
async def test_bazel_like_uploads_every_blob_by_bytestream_in_bazels_chunks(
    chunk_args: tuple[str, ...], chunk_size: int, tmp_path: Path
) -> None:
    storage = MemoryStorage()
    recording = RecordingByteStream(storage)
    mix = tmp_path / "mix.json"
    mix.write_text("[[40000, 40001, 1.0]]")  # every blob ~40 KB: several messages each
    async with serve_with_bytestream(storage, recording) as port:
        report = tmp_path / "run.json"
        result = await anyio.to_thread.run_sync(
            lambda: bench(
                f"127.0.0.1:{port}",
                "--scenario",
                "bazel-like",
                "--requests",
                "5",
                "--concurrency",
                "1",
                "--processes",
                "1",
                "--size-mix",
                str(mix),
                "--json",
                str(report),
                *chunk_args,
            )
        )
    assert result.returncode == 0, result.stdout + result.stderr
    ops = json.loads(report.read_text())["ops"]
    # Per action: a miss, one FindMissingBlobs of three digests, three uploads, one update.
    assert ops["GetActionResult"]["histogram"]["count"] == 5
    assert ops["FindMissingBlobs"]["items"] == 15
    assert ops["UpdateActionResult"]["histogram"]["count"] == 5
    assert "BatchUpdateBlobs" not in ops
    assert "upload" not in ops
    assert recording.writes == ops["ByteStream.Write"]["histogram"]["count"] == 15
    assert max(recording.message_sizes) == chunk_size
    assert len(recording.message_sizes) > 2 * recording.writes


async def test_a_client_that_cannot_prepare_fails_fast_and_says_so() -> None:
    """Nothing listens on the endpoint: the client processes die before the barrier."""
    started = time.monotonic()
    result = await anyio.to_thread.run_sync(
        lambda: bench(f"127.0.0.1:{free_port()}", "--scenario", "batch-read", "--requests", "3")
    )
    assert result.returncode == 2
    assert "died while preparing" in result.stderr
    assert time.monotonic() - started < 60, "it waited for a process that had died"


def test_the_progress_line_shows_bytes_rate_and_time_left() -> None:
    """A run of a few large blobs shows its bytes moving before any op completes."""
    timed = RunConfig(endpoint="grpc://x", scenario="bytestream-write", duration=10.0)
    line = progress_line(timed, ops=0, moved=200 * 2**20, elapsed=4.0)
    assert line == "bytestream-write: running  0 ops  200.0 MiB  50.0 MiB/s  6 s left"
    assert progress_line(timed, ops=1, moved=0, elapsed=11.0).endswith(
        "finishing the ops under way"
    )
    counted = RunConfig(
        endpoint="grpc://x", scenario="bytestream-write", duration=None, requests=10
    )
    assert progress_line(counted, ops=0, moved=0, elapsed=1.0).endswith("0.0 MiB/s")
    assert progress_line(counted, ops=2, moved=0, elapsed=1.0).endswith("4 s left")
