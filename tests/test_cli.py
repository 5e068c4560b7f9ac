"""The real `asynccas serve` process: defaults, start-up line, graceful stop, eviction."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.cli import DEFAULT_SMALL_BLOB_LIMIT, _small_blob_limit, build_parser, parse_size
from asynccas.digest import Digest
from asynccas.errors import CasError
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.disk import DiskStorage
from asynccas.storage.sqlite_rows import SqliteBlobStorage
from asynccas.testing import blob
from tests.support.redis_servers import RedisServer


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "asynccas.cli", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)(?: with \d+ workers)?; (.*)", line)
    if not match:
        process.kill()
        process.communicate()
        raise AssertionError(f"no start-up line, got {line!r}")
    return process, match.group(1), match.group(2)


def upload_batch(target: str, blobs: list[tuple[Digest, bytes]]) -> None:
    """One BatchUpdateBlobs of ``blobs`` to a server started by ``start``."""
    with grpc.insecure_channel(target) as channel:
        requests = [
            re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
            for d, data in blobs
        ]
        re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(requests=requests)
        )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}


def stop(process: subprocess.Popen[str], signum: int) -> str:
    process.send_signal(signum)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    return output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_default_serve_uses_xdg_cache_and_stops_gracefully(
    env: dict[str, str], tmp_path: Path, signum: int
) -> None:
    process, target, where = start(["--address", "127.0.0.1:0"], env)
    try:
        data_dir = tmp_path / "xdg" / "asynccas"
        assert str(data_dir / "cas") in where
        assert "index.sqlite" in where
        # A new data directory keeps blobs up to 64 KiB in SQLite, larger ones as files.
        assert f"those up to 64.0 KiB in {data_dir / 'small-blobs.sqlite'}" in where
        assert "cached in memory (up to 64.0 MiB)" in where  # the read cache, on by default
        (small, small_data), (large, large_data) = blob(1000, 1), blob(70_000, 2)
        upload_batch(target, [(small, small_data), (large, large_data)])
        files = data_dir / "cas" / "sha256"
        assert (files / large.hash[:2] / large.hash).read_bytes() == large_data
        assert not (files / small.hash[:2] / small.hash).exists()
        with closing(sqlite3.connect(data_dir / "small-blobs.sqlite")) as conn:
            rows = conn.execute("SELECT data FROM blobs WHERE key = ?", (small.key,)).fetchall()
        assert rows == [(small_data,)]
    finally:
        output = stop(process, signum)
    assert "shutting down" in output


def test_serve_default_address_is_documented() -> None:
    from asynccas.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.address, args.storage, args.max_size) == ("127.0.0.1:50051", "disk", None)


@pytest.mark.parametrize("index", ["sqlite", "redis"])
def test_max_size_evicts_least_recently_used(
    env: dict[str, str], tmp_path: Path, index: str, request: pytest.FixtureRequest
) -> None:
    index_url = "sqlite"
    if index == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        index_url = f"redis://127.0.0.1:{redis_server.port}/1"  # a db of its own
    process, target, where = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), "--max-size", "100K",
         "--index", index_url],
        env,
    )  # fmt: skip
    try:
        assert "budget 100.0 KiB" in where
        blobs = [blob(20_000, i) for i in range(10)]  # 200 kB, twice the budget
        minute = int(time.time() // 60)
        with grpc.insecure_channel(target) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            for digest, data in blobs:
                upload = re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)
                cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[upload]))

            deadline = time.monotonic() + 15
            while True:
                missing = cas.FindMissingBlobs(
                    re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d, _ in blobs])
                ).missing_blob_digests
                if len(missing) >= 6 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        # Down to the low watermark (90 KiB): the oldest blobs went, the newest stayed. Unless
        # a minute began meanwhile: then the polls' recency refresh (kept to the minute) gave
        # every remaining blob the same score, and which of them went first is arbitrary.
        if int(time.time() // 60) == minute:
            assert [m.hash for m in missing] == [d.hash for d, _ in blobs[: len(missing)]]
        assert len(missing) == 6
    finally:
        stop(process, signal.SIGTERM)


def test_bad_address_fails_with_a_message(env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "serve", "--address", "256.1.1.1:1",
         "--data-dir", str(tmp_path / "d")],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot serve" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("512", 512), ("1K", 1024), ("10G", 10 << 30), ("2GiB", 2 << 30),
     ("1.5G", 3 << 29), ("0.5k", 512)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--address", "127.0.0.1:99999"], "port from 0 to 65535"),
        (["--address", "127.0.0.1:"], "port from 0 to 65535"),
        (["--address", "nocolon"], "port from 0 to 65535"),
        (["--workers", "0"], "at least 1"),
        (["--storage", "memory", "--workers", "2"], "cannot be shared by --workers"),
        (["--log-level", "verbose"], "invalid choice"),
    ],
)
def test_serve_refuses_settings_that_cannot_work(
    env: dict[str, str], tmp_path: Path, args: list[str], complaint: str
) -> None:
    """Each of these was accepted: 99999 listened on 34463, an empty port on 443, and memory
    storage with two workers kept two stores answering in turn."""
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "serve", "--data-dir", str(tmp_path / "d"), *args],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr
    assert not (tmp_path / "d").exists()


def test_version_and_log_levels_in_any_case(env: dict[str, str]) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "--version"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0
    assert re.fullmatch(r"asynccas \S+\n", shown.stdout)
    args = build_parser().parse_args(["serve", "--log-level", "debug"])
    assert args.log_level == "DEBUG"


def test_two_processes_share_one_data_dir(env: dict[str, str], tmp_path: Path) -> None:
    """What one worker process stores, another serving the same directory sees at once."""
    args = ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "shared")]
    first, first_target, _ = start(args, env)
    second, second_target, _ = start(args, env)
    try:
        blobs = [blob(10_000 + i, i) for i in range(20)]
        action = blob(100, 99)[0]
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="o", digest=blobs[0][0].to_proto())]
        )
        upload_batch(first_target, blobs)
        with grpc.insecure_channel(first_target) as a, grpc.insecure_channel(second_target) as b:
            re_grpc.ActionCacheStub(a).UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=action.to_proto(), action_result=result
                )
            )
            cas_b = re_grpc.ContentAddressableStorageStub(b)
            missing = cas_b.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d, _ in blobs])
            )
            assert list(missing.missing_blob_digests) == []
            read = cas_b.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d, _ in blobs])
            )
            assert [r.data for r in read.responses] == [data for _, data in blobs]
            got = re_grpc.ActionCacheStub(b).GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=action.to_proto())
            )
            assert got == result
    finally:
        stop(first, signal.SIGTERM)
        stop(second, signal.SIGTERM)


def test_serve_with_redis_index_and_reindex(
    env: dict[str, str], tmp_path: Path, redis_server: RedisServer
) -> None:
    data_dir = tmp_path / "d"
    url = f"{redis_server.url}"
    blobs = [blob(3000 + i, i) for i in range(5)]
    process, target, where = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(data_dir), "--index", url,
         "--small-blob-limit", "0"],  # one file per blob; later runs keep to it unasked
        env,
    )  # fmt: skip
    try:
        assert f"index redis://127.0.0.1:{redis_server.port}/0" in where
        upload_batch(target, blobs)
    finally:
        stop(process, signal.SIGTERM)
    # Lose the index and one blob's file; reindex restores the truth from disk.
    import redis as redis_client

    redis_client.Redis(port=redis_server.port).flushall()
    lost = blobs[0][0]
    (data_dir / "cas" / "sha256" / lost.hash[:2] / lost.hash).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "reindex", "--data-dir", str(data_dir), "--index", url],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 blobs indexed" in result.stderr
    process, target, _ = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(data_dir), "--index", url], env
    )
    try:
        with grpc.insecure_channel(target) as channel:
            missing = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d, _ in blobs])
            )
        assert [m.hash for m in missing.missing_blob_digests] == [lost.hash]
    finally:
        stop(process, signal.SIGTERM)


def test_reindex_sqlite_drops_stale_entries(env: dict[str, str], tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    process, target, _ = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(data_dir), "--small-blob-limit", "0"], env
    )
    blobs = [blob(1000 + i, i) for i in range(3)]
    try:
        upload_batch(target, blobs)
    finally:
        stop(process, signal.SIGTERM)
    lost = blobs[1][0]
    (data_dir / "cas" / "sha256" / lost.hash[:2] / lost.hash).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "reindex", "--data-dir", str(data_dir)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 blobs indexed, 1 stale entries dropped" in result.stderr


def test_reindex_keeps_blobs_of_the_small_blob_tier(env: dict[str, str], tmp_path: Path) -> None:
    """Blobs kept in small-blobs.sqlite are not files: reindex must list and check them too."""
    data_dir = tmp_path / "d"
    serve = ["--address", "127.0.0.1:0", "--data-dir", str(data_dir), "--small-blob-limit", "4K"]
    process, target, _ = start(serve, env)
    small, large = blob(1000, 1), blob(10_000, 2)
    try:
        with grpc.insecure_channel(target) as channel:
            re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest(
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                        for d, data in (small, large)
                    ]
                )
            )
    finally:
        stop(process, signal.SIGTERM)
    reindex = [sys.executable, "-m", "asynccas.cli", "reindex", "--data-dir", str(data_dir)]
    refused = subprocess.run(
        [*reindex, "--small-blob-limit", "8K"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert "keeps blobs of up to 4.0 KiB" in refused.stderr, "8K would hide blobs"
    # The limit is recorded in the data directory: reindex finds it unasked.
    result = subprocess.run(reindex, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "2 blobs indexed, 0 stale entries dropped" in result.stderr
    process, target, where = start(serve[:4], env)
    try:
        assert "those up to 4.0 KiB" in where
        with grpc.insecure_channel(target) as channel:
            missing = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(
                    blob_digests=[small[0].to_proto(), large[0].to_proto()]
                )
            )
            assert list(missing.missing_blob_digests) == []
    finally:
        stop(process, signal.SIGTERM)


@pytest.mark.anyio
async def test_small_blob_limit_is_fixed_for_the_life_of_a_data_directory(
    tmp_path: Path,
) -> None:
    async def limit(data_dir: Path, asked: int | None) -> int:
        return await _small_blob_limit(argparse.Namespace(small_blob_limit=asked), data_dir)

    new = tmp_path / "new"
    assert await limit(new, None) == DEFAULT_SMALL_BLOB_LIMIT
    assert await limit(new, 0) == 0
    assert await limit(new, 4096) == 4096

    files = tmp_path / "files"  # one file per blob, as before the tier was the default
    async with DiskStorage(files, fsync=False) as disk:
        assert await disk.bulk_update(NO_CONTEXT, [blob(100, 1)]) == [None]
    assert await limit(files, None) == 0
    with pytest.raises(CasError, match="only be chosen for a new data directory"):
        await limit(files, 4096)

    tiered = tmp_path / "tiered"
    async with SqliteBlobStorage(tiered / "small-blobs.sqlite", max_blob_size=4096):
        pass
    assert await limit(tiered, None) == 4096
    assert await limit(tiered, 4096) == 4096
    for other in (0, 8192):
        with pytest.raises(CasError, match="would hide some of them"):
            await limit(tiered, other)

    earlier = tmp_path / "earlier"  # a tier made by a release that did not record its limit
    earlier.mkdir()
    with closing(sqlite3.connect(earlier / "small-blobs.sqlite")) as conn:
        conn.execute("CREATE TABLE blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID")
    with pytest.raises(CasError, match="pass the --small-blob-limit"):
        await limit(earlier, None)
    assert await limit(earlier, 4096) == 4096
    async with SqliteBlobStorage(earlier / "small-blobs.sqlite", max_blob_size=4096):
        pass  # the first start records it
    assert await limit(earlier, None) == 4096


def test_workers_share_the_port_and_stop_together(env: dict[str, str], tmp_path: Path) -> None:
    from tests.support.redis_servers import free_port

    port = free_port()
    process, target, _ = start(
        ["--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), "--workers", "2"],
        env,
    )
    try:
        deadline = time.monotonic() + 20  # the extra worker starts a moment later
        while True:
            listeners = subprocess.run(
                ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if len(listeners) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(listeners) == 2, listeners
        with grpc.insecure_channel(target) as channel:
            re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
    finally:
        stop(process, signal.SIGTERM)
    leftover = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True, text=True)
    assert leftover.stdout == "", "an extra worker outlived the server"


def cas_cli(target: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "cas", "--endpoint", f"grpc://{target}", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cas_commands(env: dict[str, str], tmp_path: Path) -> None:
    import json

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("hello\n")
    (tree / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    process, target, _ = start(["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")], env)
    try:
        uploaded = cas_cli(target, "--json", "upload", str(tree), env=env)
        assert uploaded.returncode == 0, uploaded.stderr
        record = json.loads(uploaded.stdout)
        assert record["kind"] == "directory"
        file_digest = Digest.of((tree / "big.bin").read_bytes())
        absent = blob(10, 1)[0]
        missing = cas_cli(target, "missing", str(file_digest), str(absent), env=env)
        assert (missing.returncode, missing.stdout.split()) == (1, [str(absent)])
        cat = subprocess.run(
            [sys.executable, "-m", "asynccas.cli", "cas", "--endpoint", f"grpc://{target}",
             "cat", str(file_digest)],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert cat.stdout == (tree / "big.bin").read_bytes()
        out = tmp_path / "out"
        fetched = cas_cli(target, "download", "--dir", record["digest"], str(out), env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert (out / "sub" / "f.txt").read_text() == "hello\n"
        assert (out / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
        lost = cas_cli(target, "download", str(absent), str(tmp_path / "x"), env=env)
        assert lost.returncode == 2
        assert "not in the CAS" in lost.stderr
    finally:
        stop(process, signal.SIGTERM)


def test_cas_usage_errors_and_the_endpoint_from_the_environment(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by a new user: a malformed digest was a traceback, --json after the verb was
    refused, and the endpoint had to be typed every time."""
    bad = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "cas", "missing", "zzz/12"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "'zzz/12' is not a digest HASH/SIZE" in bad.stderr
    process, target, _ = start(["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")], env)
    try:
        absent = blob(10, 1)[0]
        missing = subprocess.run(
            [sys.executable, "-m", "asynccas.cli", "cas", "missing", "--json", str(absent)],
            env={**env, "ASYNCCAS_ENDPOINT": f"grpc://{target}"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert missing.returncode == 1, missing.stderr
        assert missing.stdout.strip() == f'{{"missing": ["{absent}"]}}'
    finally:
        stop(process, signal.SIGTERM)


def test_reindex_refuses_a_directory_that_is_not_a_data_directory(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A mistyped --data-dir once made an empty directory and emptied a shared index."""
    typo = tmp_path / "tpyo"
    done = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "reindex", "--data-dir", str(typo)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "is not an asynccas data directory" in done.stderr
    assert not typo.exists()


def listeners(port: int) -> list[str]:
    return subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.splitlines()


def wait_for(condition: Any, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def workers_of(parent: int) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--parent-pid {parent}"], capture_output=True, text=True
    ).stdout.split()
    return [int(pid) for pid in found]


def test_a_second_server_cannot_join_a_port_in_use(env: dict[str, str], tmp_path: Path) -> None:
    """SO_REUSEPORT was always on: a second server silently shared the port, splitting the
    answers between two stores."""
    process, target, _ = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "a"), "--workers", "2"], env
    )
    port = int(target.rsplit(":", 1)[1])
    try:
        wait_for(lambda: len(listeners(port)) == 2, "the second worker listens")
        for workers in ("1", "2"):
            second = subprocess.run(
                [sys.executable, "-m", "asynccas.cli", "serve", "--address", target,
                 "--data-dir", str(tmp_path / f"b{workers}"), "--workers", workers],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert second.returncode == 1, second.stderr
            assert f"could not listen on {target}" in second.stderr
            assert "in use" in second.stderr
        assert len(listeners(port)) == 2
    finally:
        stop(process, signal.SIGTERM)


def test_workers_are_restarted_when_they_die_and_die_with_their_parent(
    env: dict[str, str], tmp_path: Path
) -> None:
    process, target, _ = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), "--workers", "2"], env
    )
    port = int(target.rsplit(":", 1)[1])
    try:
        wait_for(lambda: len(workers_of(process.pid)) == 1, "one extra worker")
        [first_worker] = workers_of(process.pid)
        os.kill(first_worker, signal.SIGKILL)
        wait_for(
            lambda: workers_of(process.pid) not in ([], [first_worker]), "a replacement worker"
        )
        wait_for(lambda: len(listeners(port)) == 2, "the replacement listens")
        orphans = workers_of(process.pid)
        os.kill(process.pid, signal.SIGKILL)  # the parent dies without a word to its workers
        output, _ = process.communicate(timeout=20)
        assert f"(pid {first_worker}) exited with status -9; restarting" in output
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in orphans),
                 "the orphaned worker exits")  # fmt: skip
        assert listeners(port) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_metrics_of_all_workers_on_one_endpoint(env: dict[str, str], tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.redis_servers import free_port

    metrics_port = free_port()
    process, target, where = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), "--workers", "2",
         "--metrics-address", f"127.0.0.1:{metrics_port}"],
        env,
    )  # fmt: skip
    port = int(target.rsplit(":", 1)[1])
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in where
    try:
        wait_for(lambda: len(listeners(port)) == 2, "the second worker listens")
        calls = 40
        for _ in range(calls):  # a new connection each: the kernel spreads them over workers
            with grpc.insecure_channel(target) as channel:
                re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
            text = answer.read().decode()
        counted = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "asynccas_rpcs_total"
            and sample.labels == {"method": "GetCapabilities", "code": "OK"}
        )
        assert counted == calls
    finally:
        stop(process, signal.SIGTERM)


def test_tls_and_tokens_from_the_command_line(env: dict[str, str], tmp_path: Path) -> None:
    from tests.support.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    made = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "token", "ci", "--write", "*"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(made.stdout)
    token_file = tmp_path / "ci.token"
    token_file.write_text(made.stderr.rsplit(": ", 1)[1])
    process, target, _ = start(
        ["--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--auth-tokens", str(tokens), "--access-log"],
        env,
    )  # fmt: skip
    assert target.startswith("grpcs://")
    (tmp_path / "f").write_bytes(b"over TLS, with a token")
    digest = Digest.of(b"over TLS, with a token")

    def cas(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "asynccas.cli", "cas", "--endpoint", target,
             "--tls-ca", str(pki.ca), *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    try:
        refused = cas("upload", str(tmp_path / "f"))
        assert refused.returncode == 2
        assert "UNAUTHENTICATED" in refused.stderr
        uploaded = cas("--token-file", str(token_file), "upload", str(tmp_path / "f"))
        assert uploaded.returncode == 0, uploaded.stderr
        assert uploaded.stdout.strip() == str(digest)
        bench = subprocess.run(
            [sys.executable, "-m", "asynccas.cli", "bench", target, "--scenario", "bazel-like",
             "--requests", "10", "--concurrency", "2", "--processes", "1",
             "--tls-ca", str(pki.ca), "--json", str(tmp_path / "run.json")],
            env={**env, "ASYNCCAS_TOKEN": token_file.read_text()},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr + bench.stdout
        assert "none" in bench.stdout  # the errors column
        assert token_file.read_text() not in (tmp_path / "run.json").read_text()
    finally:
        output = stop(process, signal.SIGTERM)
    assert re.search(r"ipv4:127\.0\.0\.1:\d+ ci instance='' FindMissingBlobs OK", output), output


def test_serve_refuses_a_memory_blob_info_shared_by_workers(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Each worker would know only the blobs uploaded through it: an instance would see its
    blobs missing on one worker and present on another."""
    config = tmp_path / "cas.toml"
    config.write_text(
        'cas = "index"\nisolation = "per-instance"\n\n[storage.index]\ntype = "sqlite-index"\n'
        'path = "index.sqlite"\nstorage = "files"\n\n[storage.files]\ntype = "disk"\npath = "."\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "asynccas.cli", "serve", "--config", str(config),
         "--address", "127.0.0.1:0", "--workers", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "a memory blob_info cannot be shared by --workers" in result.stderr
