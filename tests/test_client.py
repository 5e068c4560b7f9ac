"""CasClient against a real asynccas server (disk + SQLite index, and memory)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.client import CasClient, Progress
from asynccas.client.commands import describe
from asynccas.digest import Digest
from asynccas.errors import BackendUnavailable, BlobNotFound, InvalidArgument
from asynccas.server.app import CasServer
from asynccas.testing import blob

pytestmark = pytest.mark.anyio


def client(server: CasServer, **kwargs: object) -> CasClient:
    return CasClient(f"grpc://{server.target}", "ci/main", **kwargs)  # type: ignore[arg-type]


async def test_blobs_round_trip_across_batch_and_bytestream(server: CasServer) -> None:
    seen: list[Progress] = []
    blobs = dict([blob(10, 1), blob(100_000, 2), blob(3 * 1024 * 1024, 3), blob(0)])
    async with client(server, progress=seen.append) as cas:
        assert cas.max_batch_bytes == 1 << 20  # from the server's Capabilities
        assert set(await cas.find_missing(blobs)) == {d for d in blobs if not d.is_empty}
        sent = await cas.upload_blobs(blobs)
        assert len(sent) == 3
        assert await cas.find_missing(blobs) == []
        assert await cas.upload_blobs(blobs) == [], "present blobs are not sent again"
        assert await cas.download_blobs(blobs) == blobs
        with pytest.raises(BlobNotFound):
            await cas.download_blobs([blob(5, 9)[0]])
    total = sum(d.size_bytes for d in sent)
    uploads = [p for p in seen if p.bytes_total == total and p.blobs_total == 3]
    assert uploads[-1].bytes_done == uploads[-1].bytes_total
    assert uploads[-1].blobs_done == uploads[-1].blobs_total == 3
    assert uploads[-1].phase == "done"


async def test_progress_moves_within_a_blob(server: CasServer, tmp_path: Path) -> None:
    """A 500 MiB file showed 0% until it was done: progress now moves with each chunk, and
    says what the client is doing."""
    source = tmp_path / "big.bin"
    data = os.urandom(5 * 1024 * 1024 + 3)
    await anyio.Path(source).write_bytes(data)
    seen: list[Progress] = []
    async with client(server, progress=seen.append, chunk_size=64 * 1024) as cas:
        digest = await cas.upload_file(source)
        sent = list(seen)
        seen.clear()
        await cas.download_file(digest, tmp_path / "copy.bin")
    for events, moving in ((sent, "sending"), (seen, "receiving")):
        phases = [p.phase for p in events]
        assert phases[-1] == "done"
        partial = [p for p in events if p.phase == moving and 0 < p.bytes_done < len(data)]
        assert len(partial) >= 4, f"no progress within the blob while {moving}"
        assert all(p.blobs_done == 0 for p in partial)
        done = [p.bytes_done for p in events]
        assert done == sorted(done), "progress went backwards"
        assert events[-1].bytes_done == events[-1].bytes_total == len(data)
    assert list(dict.fromkeys(p.phase for p in sent)) == [
        "hashing", "checking", "sending", "done"
    ]  # fmt: skip


async def test_bytes_moved_are_counted_with_each_message(server: CasServer) -> None:
    """What `asynccas bench` shows while a large blob is under way: the client's byte counters
    move with every ByteStream message, in both directions, not when the blob is done."""
    digest, data = blob(5 * 1024 * 1024 + 3, 4)
    async with client(server, chunk_size=64 * 1024) as cas:
        seen_sending: list[int] = []

        async def watch() -> None:
            while True:
                seen_sending.append(cas.bytes_sent)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            await cas.write_blob(digest, data)
            tasks.cancel_scope.cancel()
        assert cas.bytes_sent == len(data)
        assert [n for n in seen_sending if 0 < n < len(data)], "no count within the blob"
        reading = cas.read_blob(digest)
        first = await anext(reading)
        assert cas.bytes_received == len(first) < len(data)
        async for _ in reading:
            pass
        assert cas.bytes_received == len(data)


def test_progress_line_shows_phase_rate_and_time_left() -> None:
    line = describe(Progress(210 * 2**20, 500 * 2**20, 3, 7, "sending"), elapsed=2.0)
    assert line.startswith("sending    42.0%")
    assert "3/7 blobs" in line
    assert "105.0 MiB/s" in line
    assert "ETA 3 s" in line


async def test_files_stream_both_ways(server: CasServer, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = os.urandom(5 * 1024 * 1024 + 3)
    await anyio.Path(source).write_bytes(data)
    async with client(server) as cas:
        digest = await cas.upload_file(source)
        assert digest == Digest.of(data)
        target = tmp_path / "copy.bin"
        await cas.download_file(digest, target, executable=True)
        assert await anyio.Path(target).read_bytes() == data
        assert (await anyio.Path(target).stat()).st_mode & stat.S_IXUSR
        leftovers = [
            p.name async for p in anyio.Path(tmp_path).iterdir() if p.name.endswith(".part")
        ]
        assert leftovers == []


def make_tree(root: Path) -> None:
    (root / "src" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "src" / "a.txt").write_text("alpha\n")
    (root / "src" / "deep" / "b.txt").write_text("alpha\n")  # same content twice
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty.txt").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    (root / "link").symlink_to("src/a.txt")
    (root / "Zeta").write_text("sorted before lower case\n")


def expected_root(root: Path) -> Digest:
    """The REAPI Merkle tree of ``root``, computed independently of asynccas.client."""

    def directory(path: Path) -> Digest:
        message = re_pb2.Directory()
        for entry in sorted(path.iterdir(), key=lambda p: p.name.encode()):
            if entry.is_symlink():
                message.symlinks.add(name=entry.name, target=os.readlink(entry))
            elif entry.is_dir():
                message.directories.add(name=entry.name, digest=directory(entry).to_proto())
            else:
                message.files.add(
                    name=entry.name,
                    digest=Digest.of(entry.read_bytes()).to_proto(),
                    is_executable=os.access(entry, os.X_OK),
                )
        return Digest.of(message.SerializeToString())

    return directory(root)


async def test_directory_round_trip(server: CasServer, tmp_path: Path) -> None:
    source = tmp_path / "source"
    await anyio.to_thread.run_sync(make_tree, source)
    async with client(server) as cas:
        root = await cas.upload_directory(source)
        assert root == await anyio.to_thread.run_sync(expected_root, source)
        assert await cas.upload_directory(source) == root
        target = tmp_path / "target"
        await cas.download_directory(root, target)
    assert await anyio.to_thread.run_sync(expected_root, target) == root
    assert (target / "run.sh").stat().st_mode & stat.S_IXUSR
    assert os.readlink(target / "link") == "src/a.txt"
    assert (target / "empty-dir").is_dir()
    assert (target / "big.bin").read_bytes() == (source / "big.bin").read_bytes()


async def test_hostile_tree_names_are_refused(server: CasServer, tmp_path: Path) -> None:
    evil = re_pb2.Directory(
        files=[re_pb2.FileNode(name="../escaped", digest=blob(3, 1)[0].to_proto())]
    ).SerializeToString()
    digest = Digest.of(evil)
    async with client(server) as cas:
        await cas.upload_blobs({digest: evil, blob(3, 1)[0]: blob(3, 1)[1]})
        with pytest.raises(InvalidArgument, match="escaped"):
            await cas.download_directory(digest, tmp_path / "out")
    assert not (tmp_path / "escaped").exists()


async def test_action_results(server: CasServer) -> None:
    action = blob(40, 5)[0]
    output = blob(100, 6)
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=output[0].to_proto())], exit_code=0
    )
    async with client(server) as cas:
        assert await cas.get_action_result(action) is None
        await cas.upload_blobs([output])
        assert await cas.update_action_result(action, result) == result
        assert await cas.get_action_result(action) == result


async def test_unreachable_server_fails_after_retries() -> None:
    from tests.support.redis_servers import free_port

    endpoint = f"grpc://127.0.0.1:{free_port()}"
    # An asynccas error naming the endpoint (a new user once met a raw AioRpcError here).
    with pytest.raises(BackendUnavailable, match=f"cannot reach {endpoint} \\(UNAVAILABLE\\)"):
        async with CasClient(endpoint, max_attempts=2, backoff=0.01):
            pass


def test_the_message_types_a_library_user_needs_are_public() -> None:
    """A new user had to import ActionResult from asynccas._proto to use the client."""
    import asynccas.reapi

    assert asynccas.reapi.ActionResult is re_pb2.ActionResult
    assert asynccas.reapi.DigestMessage is re_pb2.Digest


def test_importing_the_client_loads_no_server() -> None:
    """Build tools that import the client should not pay for (or depend on) the server."""
    import subprocess
    import sys

    probe = (
        "import sys, asynccas.client.cas\n"
        "print(sorted(m for m in sys.modules if m.startswith('asynccas.server')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
