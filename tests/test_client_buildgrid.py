"""CasClient against the real peer, BuildGrid 0.4.4 (installed into a throw-away venv on first use):
same Merkle root digests as BuildGrid's own tooling, and every transfer path works against it."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from asynccas.client import CasClient
from asynccas.digest import Digest
from asynccas.testing import blob
from benchmarks.peers import BUILDGRID_VENV, Target, buildgrid_server
from tests.test_client import expected_root, make_tree

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def buildgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with buildgrid_server(tmp_path_factory.mktemp("buildgrid")) as target:
        yield target


def bgd_upload_dir(target: Target, path: Path) -> Digest:
    """BuildGrid's own tool: uploads the tree and reports the root digest last."""
    result = subprocess.run(
        [str(BUILDGRID_VENV / "bin" / "bgd"), "cas", "--remote", f"http://{target.address}",
         "upload-dir", str(path)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    pushed = re.findall(r"Pushed path=\[(.*?)\] with digest=\[(\w+)/(\d+)\]", result.stdout)
    roots = [(h, int(n)) for p, h, n in pushed if Path(p) == path]
    assert roots, result.stdout
    return Digest(*roots[-1])


async def test_root_digest_matches_buildgrid_tooling(buildgrid: Target, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    await anyio.to_thread.run_sync(make_tree, tree)
    theirs = await anyio.to_thread.run_sync(bgd_upload_dir, buildgrid, tree)
    async with CasClient(f"grpc://{buildgrid.address}") as cas:
        ours = await cas.upload_directory(tree)
    assert ours == theirs
    assert ours == await anyio.to_thread.run_sync(expected_root, tree)


async def test_client_round_trips_through_buildgrid(buildgrid: Target, tmp_path: Path) -> None:
    blobs = dict([blob(10, 1), blob(600_000, 2), blob(3 * 1024 * 1024, 3)])
    tree = tmp_path / "tree"
    await anyio.to_thread.run_sync(make_tree, tree)
    source = tmp_path / "file.bin"
    await anyio.Path(source).write_bytes(os.urandom(5 * 1024 * 1024))
    async with CasClient(f"grpc://{buildgrid.address}") as cas:
        assert cas.max_batch_bytes == 4193280  # BuildGrid's advertised limit
        await cas.upload_blobs(blobs)
        assert await cas.download_blobs(blobs) == blobs
        digest = await cas.upload_file(source)
        await cas.download_file(digest, tmp_path / "copy.bin")
        copy = await anyio.Path(tmp_path / "copy.bin").read_bytes()
        assert copy == await anyio.Path(source).read_bytes()
        root = await cas.upload_directory(tree)
        await cas.download_directory(root, tmp_path / "out")
    assert await anyio.to_thread.run_sync(expected_root, tmp_path / "out") == root
