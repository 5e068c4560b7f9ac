"""asynccas in front of the real peer, BuildGrid 0.4.4 (installed into a throw-away venv on
first use): RemoteStorage speaks to it, and `asynccas serve --upstream` proxies it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.client import CasClient
from asynccas.errors import UnsupportedFeature
from asynccas.storage.remote import RemoteStorage
from asynccas.testing import blob, check_storage
from benchmarks.peers import Target, buildgrid_server
from tests.test_cli import start, stop

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def buildgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with buildgrid_server(tmp_path_factory.mktemp("buildgrid")) as target:
        yield target


async def test_a_remote_buildgrid_passes_the_storage_conformance_kit(buildgrid: Target) -> None:
    # BuildGrid serves one instance, ""; the kit asks as instance "conformance".
    remote = RemoteStorage(f"grpc://{buildgrid.address}", instance_name="")
    async with remote:
        await check_storage(remote, peer_quirks=True)
    assert remote.calls["Write"] > 0
    assert remote.calls["Read"] > 0


async def test_a_proxy_in_front_of_buildgrid(buildgrid: Target, tmp_path: Path) -> None:
    """Blobs and action results stored through the proxy are BuildGrid's; a second proxy,
    with an empty disk, serves them from BuildGrid."""
    blobs = dict([blob(10, 1), blob(600_000, 2), blob(5 * 1024 * 1024, 3)])
    action = blob(20, 4)[0]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    flags = ["--address", "127.0.0.1:0", "--upstream", f"grpc://{buildgrid.address}"]
    for step in ("store", "fetch"):
        proxy, target, _ = await anyio.to_thread.run_sync(
            start, [*flags, "--data-dir", str(tmp_path / step)], env
        )
        try:
            async with CasClient(f"grpc://{target}") as client:
                if step == "store":
                    await client.upload_blobs(blobs)
                    result = re_pb2.ActionResult(exit_code=0)
                    for digest in blobs:
                        result.output_files.add(path=digest.hash, digest=digest.to_proto())
                    await client.update_action_result(action, result)
                else:
                    cached = await client.get_action_result(action)
                    assert cached is not None
                    assert len(cached.output_files) == 3
                    assert await client.download_blobs(blobs) == blobs
        finally:
            await anyio.to_thread.run_sync(stop, proxy, signal.SIGTERM)
    async with CasClient(f"grpc://{buildgrid.address}") as buildgrid_itself:
        assert await buildgrid_itself.find_missing(blobs) == []


async def test_the_client_refuses_compression_buildgrid_does_not_offer(buildgrid: Target) -> None:
    with pytest.raises(UnsupportedFeature, match="does not offer zstd"):
        async with CasClient(f"grpc://{buildgrid.address}", compressor="zstd"):
            pass
