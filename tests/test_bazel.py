"""Bazel 4.2.3 (Debian's ``bazel-bootstrap``) against a server that requires bearer tokens, as
a team would run it: a writer's token fills the cache, a reader's gets full hits, and Bazel
without a token is refused (it warns and builds locally) and stores nothing. CI installs Bazel (``.ci/run``); elsewhere the
test is skipped when there is no ``bazel`` on the PATH.

Debian's Bazel 4.2.3 cannot speak TLS at all: any ``grpcs://`` remote crashes it ("Failed to
init TLS infrastructure: JDK provider does not support ALPN protocol", exit 37, with JDK 17
and JDK 25 alike), as its unbundled Netty finds no ALPN provider. So it runs over plain gRPC,
and TLS with a token is driven from an official Bazel release (2.1.0, the newest on the npm
registry, which bundles a Netty that speaks TLS)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from asynccas.auth import AccessPolicy, TokenFile, token_hash
from asynccas.index.sqlite import SqliteIndex
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import SqliteActionCache
from asynccas.storage.disk import DiskStorage
from asynccas.transport import ServerTls
from tests.support.tls import make_pki
from tests.test_cli import start, stop
from tests.test_local_cluster import cluster

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="needs bazel (bazel-bootstrap)"),
    pytest.mark.timeout(600),
]

RULES = 6
WRITER, READER = "bazel-writer-token", "bazel-reader-token"
# Debian's bazelrc turns on sandbox debugging; the rest keeps Bazel quiet and local.
COMMON = ["--nosandbox_debug", "--spawn_strategy=standalone", "--color=no", "--curses=no",
          "--symlink_prefix=/", "--remote_timeout=60"]  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Bazel's run time dwarfs the event loop's: one backend is enough


def make_workspace(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "WORKSPACE").write_text('workspace(name = "secured")\n')
    rules = [
        f'genrule(name = "g{i}", outs = ["out{i}.bin"],'
        f' cmd = "(echo rule {i}; head -c {2000 * (i + 1) ** 3} /dev/zero) > $@")'
        for i in range(RULES)
    ]
    (root / "BUILD").write_text("\n".join(rules) + "\n")


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[CasServer, SqliteIndex]]:
    tokens = tmp_path / "tokens.toml"
    await anyio.Path(tokens).write_text(
        f'[[token]]\nname = "ci"\nsha256 = "{token_hash(WRITER)}"\nwrite = ["*"]\n\n'
        f'[[token]]\nname = "dev"\nsha256 = "{token_hash(READER)}"\nread = ["*"]\n'
    )
    storage = SqliteIndex(DiskStorage(tmp_path / "data", fsync=False), tmp_path / "index.sqlite")
    async with CasServer(
        storage,
        SqliteActionCache(tmp_path / "ac.sqlite"),
        address="127.0.0.1:0",
        access=AccessPolicy(tokens=TokenFile(tokens)),
    ) as server:
        yield server, storage


async def bazel(
    workspace: Path, output_base: Path, *args: str, binary: Path | str = "bazel"
) -> tuple[int, str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), f"--output_base={output_base}", *args],
            cwd=workspace, capture_output=True, text=True, timeout=500,
        )  # fmt: skip

    done = await anyio.to_thread.run_sync(run)
    return done.returncode, done.stderr


async def build(
    workspace: Path, output_base: Path, remote: list[str], *, binary: Path | str = "bazel"
) -> tuple[int, str]:
    # Debian's bazelrc adds --nosandbox_debug, which an official Bazel 2.1 does not know.
    flags = COMMON if binary == "bazel" else [f for f in COMMON if f != "--nosandbox_debug"]
    try:
        return await bazel(workspace, output_base, "build", *flags, *remote, "//...", binary=binary)
    finally:
        await bazel(workspace, output_base, "shutdown", binary=binary)


def hits(output: str) -> int:
    match = re.search(r"(\d+) remote cache hit", output)
    return int(match.group(1)) if match else 0


@pytest.fixture
def output_bases() -> Iterator[Path]:
    """Bazel's output bases, under a short path: its server's Unix socket lives there, and a
    pytest temp path is longer than a socket path may be (Bazel then exits with status 37)."""
    root = Path(tempfile.mkdtemp(prefix="asynccas-bazel-", dir="/tmp"))
    yield root
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)  # Bazel's are read-only
    shutil.rmtree(root, ignore_errors=True)


async def test_bazel_with_tokens(
    secured: tuple[CasServer, SqliteIndex], tmp_path: Path, output_bases: Path
) -> None:
    server, storage = secured
    workspace = tmp_path / "ws"
    await anyio.to_thread.run_sync(make_workspace, workspace)
    remote = [f"--remote_cache=grpc://{server.target}"]

    # No token: every cache call is refused; Bazel warns why, builds locally, stores nothing.
    code, output = await build(workspace, output_bases / "anonymous", remote)
    assert code == 0, output[-3000:]
    assert "UNAUTHENTICATED" in output, output[-3000:]
    assert "needs a bearer token" in output
    assert await storage.get_total_size() == 0

    # A reader's token: Bazel builds, but its uploads are refused; nothing is stored.
    reader = [*remote, f"--remote_header=Authorization=Bearer {READER}"]
    code, output = await build(workspace, output_bases / "reader-first", reader)
    assert code == 0, output[-3000:]
    assert "WARNING: Writing to Remote Cache" in output, output[-3000:]
    assert await storage.get_total_size() == 0

    # The writer's token fills the cache.
    writer = [*remote, f"--remote_header=Authorization=Bearer {WRITER}"]
    code, output = await build(workspace, output_bases / "writer", writer)
    assert code == 0, output[-3000:]
    assert "WARNING" not in output, output[-3000:]
    assert await storage.get_total_size() >= sum(2000 * (i + 1) ** 3 for i in range(RULES))

    # A reader's token, in a fresh output base: every action is a hit.
    code, output = await build(workspace, output_bases / "reader", reader)
    assert code == 0, output[-3000:]
    assert hits(output) == RULES, output[-3000:]


OFFICIAL_BAZEL = "2.1.0"  # the newest official Bazel on the npm registry (@bazel/bazel-linux_x64)


@pytest.fixture(scope="session")
def official_bazel() -> Path:
    """An official Bazel release, which bundles a Netty that speaks TLS (Debian's does not).
    Fetched once from the npm registry into /tmp and kept for later runs."""
    home = Path("/tmp/asynccas-test-tools")
    binary = home / f"bazel-{OFFICIAL_BAZEL}-linux-x86_64"
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        pytest.skip("needs npm, to fetch an official Bazel from the npm registry")
    home.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        ["npm", "pack", f"@bazel/bazel-linux_x64@{OFFICIAL_BAZEL}", "--pack-destination", str(home)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    tarball = home / fetched.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as archive:
        member = archive.getmember(f"package/{binary.name}")
        extracted = archive.extractfile(member)
        assert extracted is not None
        partial = binary.with_suffix(".partial")
        partial.write_bytes(extracted.read())
    partial.chmod(0o755)
    partial.rename(binary)
    tarball.unlink()
    return binary


async def test_official_bazel_over_tls_with_a_token(
    tmp_path: Path, output_bases: Path, official_bazel: Path
) -> None:
    """Bazel over TLS with a reader's token gets every action from the cache. (Without a token,
    Bazel 2.1 itself crashes on the UNAUTHENTICATED answer; the Bazel 4.2.3 test above covers
    callers without one.) The cache is filled through an open plain-text server on the same data
    directory first: Bazel 2.1 sends --remote_header on the action cache and FindMissingBlobs
    but not on ByteStream, so it cannot upload to a server that checks tokens (later Bazels
    send it on every call, as the Bazel 4.2.3 test above shows)."""
    pki = await anyio.to_thread.run_sync(make_pki, tmp_path / "pki")
    tokens = tmp_path / "tokens.toml"
    await anyio.Path(tokens).write_text(
        f'[[token]]\nname = "dev"\nsha256 = "{token_hash(READER)}"\nread = ["*"]\n'
    )
    workspace = tmp_path / "ws"
    await anyio.to_thread.run_sync(make_workspace, workspace)

    def stores() -> tuple[SqliteIndex, SqliteActionCache]:
        return (
            SqliteIndex(DiskStorage(tmp_path / "data", fsync=False), tmp_path / "index.sqlite"),
            SqliteActionCache(tmp_path / "ac.sqlite"),
        )

    async with CasServer(*stores(), address="127.0.0.1:0") as open_server:
        code, output = await build(
            workspace, output_bases / "fill", [f"--remote_cache=grpc://{open_server.target}"],
            binary=official_bazel,
        )  # fmt: skip
        assert code == 0, output[-3000:]
    async with CasServer(
        *stores(),
        address="127.0.0.1:0",
        tls=ServerTls(pki.server_cert, pki.server_key),
        access=AccessPolicy(tokens=TokenFile(tokens)),
    ) as server:
        remote = [f"--remote_cache=grpcs://{server.target}", f"--tls_certificate={pki.ca}"]
        reader = [*remote, f"--remote_header=Authorization=Bearer {READER}"]
        code, output = await build(
            workspace, output_bases / "reader", reader, binary=official_bazel
        )
        assert code == 0, output[-3000:]
        assert hits(output) == RULES, output[-3000:]


async def test_bazel_through_caching_proxies(tmp_path: Path, output_bases: Path) -> None:
    """Bazel builds through one `asynccas serve --upstream` proxy, then, from a fresh output
    base, through a second proxy with an empty disk: every action is a hit, served from the
    upstream's action cache and blobs."""
    upstream_storage = SqliteIndex(
        DiskStorage(tmp_path / "upstream", fsync=False), tmp_path / "upstream.sqlite"
    )
    workspace = tmp_path / "ws"
    await anyio.to_thread.run_sync(make_workspace, workspace)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    async with CasServer(
        upstream_storage, SqliteActionCache(tmp_path / "ac.sqlite"), address="127.0.0.1:0"
    ) as upstream:
        for name in ("first", "second"):
            proxy, target, _ = await anyio.to_thread.run_sync(
                start,
                ["--address", "127.0.0.1:0", "--upstream", f"grpc://{upstream.target}",
                 "--data-dir", str(tmp_path / name)],
                env,
            )  # fmt: skip
            try:
                code, output = await build(
                    workspace, output_bases / name, [f"--remote_cache=grpc://{target}"]
                )
            finally:
                await anyio.to_thread.run_sync(stop, proxy, signal.SIGTERM)
            assert code == 0, output[-3000:]
            assert "WARNING" not in output, output[-3000:]
            if name == "first":
                stored = await upstream_storage.get_total_size()
                assert stored >= sum(2000 * (i + 1) ** 3 for i in range(RULES))
            else:
                assert hits(output) == RULES, output[-3000:]


async def test_bazel_through_two_frontends_of_a_cluster(tmp_path: Path, output_bases: Path) -> None:
    """`make cluster`'s shape (Redis, SeaweedFS, two stateless frontends): Bazel uploads
    through the first frontend, then, from a fresh output base, gets every action as a hit
    through the second."""
    workspace = tmp_path / "ws"
    await anyio.to_thread.run_sync(make_workspace, workspace)
    async with cluster(tmp_path / "cluster") as running:
        for name, frontend in zip(("first", "second"), running.frontends, strict=True):
            code, output = await build(
                workspace, output_bases / name, [f"--remote_cache={frontend}"]
            )
            assert code == 0, output[-3000:]
            assert "WARNING" not in output, output[-3000:]
            if name == "second":
                assert hits(output) == RULES, output[-3000:]
