"""The whole system as `make cluster` starts it: real Redis, real SeaweedFS and two stateless
`asynccas serve` frontends over them. What one frontend stores is a full hit on the other,
one byte budget holds across both (eviction deletes from S3 and from the shared index), and
per-instance isolation holds across frontends; `make cluster-down` leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.client import CasClient
from asynccas.digest import Digest
from asynccas.storage.s3 import S3Storage
from asynccas.testing import blob
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """One event loop is enough: what runs here is other processes (each on uvloop)."""
    return ("asyncio", {"use_uvloop": True})


SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local_cluster.py"


@dataclass
class Cluster:
    directory: Path
    frontends: list[str]
    s3_endpoint: str

    def objects(self) -> S3Storage:
        return S3Storage(
            "asynccas", endpoint_url=self.s3_endpoint, region="us-east-1",
            access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        )  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180
    )


@asynccontextmanager
async def cluster(directory: Path, *options: str) -> AsyncIterator[Cluster]:
    started = await anyio.to_thread.run_sync(lambda: run("up", "--dir", str(directory), *options))
    assert started.returncode == 0, started.stderr
    lines = started.stdout.splitlines()
    assert all(re.fullmatch(r"frontend grpc://127\.0\.0\.1:\d+", line) for line in lines), lines
    s3 = re.search(r"^s3 (\S+)", started.stderr, re.MULTILINE)
    assert s3 is not None, started.stderr
    pids = json.loads((directory / "cluster.json").read_text())["pids"]
    try:
        yield Cluster(directory, [line.split()[1] for line in lines], s3.group(1))
    finally:
        stopped = await anyio.to_thread.run_sync(lambda: run("down", "--dir", str(directory)))
        assert stopped.returncode == 0, stopped.stderr
    assert not await anyio.Path(directory).exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def read(client: CasClient, digest: Digest) -> bytes:
    return b"".join([chunk async for chunk in client.read_blob(digest)])


async def test_two_frontends_share_blobs_results_and_one_budget(tmp_path: Path) -> None:
    async with cluster(tmp_path / "cluster", "--max-size", "8M") as running:
        assert len(running.frontends) == 2
        first, second = running.frontends
        blobs = [blob(size, seed) for seed, size in enumerate([10, 5000, 70_000, 3 << 20])]
        action = Digest.of(b"an action run through the first frontend")
        result = re_pb2.ActionResult(exit_code=0)
        for number, (digest, _) in enumerate(blobs):
            result.output_files.add(path=f"out/{number}", digest=digest.to_proto())
        async with CasClient(first) as via_first, CasClient(second) as via_second:
            await via_first.upload_blobs(blobs)
            async with grpc.aio.insecure_channel(first.removeprefix("grpc://")) as channel:
                await re_grpc.ActionCacheStub(channel).UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(
                        action_digest=action.to_proto(), action_result=result
                    )
                )
            # Full hits through the other frontend: the result, and every output it names.
            async with grpc.aio.insecure_channel(second.removeprefix("grpc://")) as channel:
                hit = await re_grpc.ActionCacheStub(channel).GetActionResult(
                    re_pb2.GetActionResultRequest(action_digest=action.to_proto())
                )
            assert hit == result
            assert await via_second.find_missing([d for d, _ in blobs]) == []
            for digest, data in blobs:
                assert await read(via_second, digest) == data

            # One budget over both: 16 MiB more, half through each, leaves at most 8 MiB.
            more = [blob(1 << 20, 100 + seed) for seed in range(16)]
            await via_first.upload_blobs(more[::2])
            await via_second.upload_blobs(more[1::2])
        async with running.objects() as objects:
            with anyio.fail_after(60):
                while True:
                    listed = [d async for d, _ in objects.list_blobs()]
                    held = sum(d.size_bytes for d in listed)
                    if held <= 8 << 20:
                        break
                    await anyio.sleep(0.5)
            assert len(listed) < len(blobs) + len(more), "nothing was deleted from S3"


async def test_per_instance_isolation_holds_across_frontends(tmp_path: Path) -> None:
    async with cluster(tmp_path / "cluster", "--isolation", "per-instance") as running:
        first, second = running.frontends
        digest, data = blob(200_000, 1)
        async with (
            CasClient(first, "team-a") as a_first,
            CasClient(second, "team-a") as a_second,
            CasClient(second, "team-b") as b_second,
        ):
            await a_first.upload_blobs([(digest, data)])
            assert await a_second.find_missing([digest]) == []
            assert await read(a_second, digest) == data
            assert await b_second.find_missing([digest]) == [digest]
            await b_second.upload_blobs([(digest, data)])
            assert await b_second.find_missing([digest]) == []
        async with running.objects() as objects:
            listed = [d async for d, _ in objects.list_blobs()]
        assert listed == [digest], "team-b's upload of the same bytes was stored twice"
