"""RemoteStorage: a storage that is another REAPI CAS, here a real asynccas server (and, in
test_proxy_peers.py, BuildGrid) on a loopback port."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.auth import AccessPolicy, TokenFile
from asynccas.config import build
from asynccas.digest import Digest, DigestBatch, DigestFunction
from asynccas.errors import (
    BackendUnavailable,
    ConfigurationError,
    DeadlineExceeded,
    PermissionDenied,
)
from asynccas.index.sqlite import SqliteIndex
from asynccas.server.app import CasServer
from asynccas.server.uploads import UploadSessions
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import contains, put_chunks, read_all
from asynccas.storage.context import NO_CONTEXT, RequestContext
from asynccas.storage.memory import MemoryStorage
from asynccas.storage.remote import RemoteStorage
from asynccas.storage.remote_action_cache import RemoteActionCache
from asynccas.testing import blob, check_storage
from asynccas.transport import ServerTls
from tests.conftest import serve_with_bytestream
from tests.servers import memory_server
from tests.support.redis_servers import free_port
from tests.support.tls import make_pki
from tests.test_client_resume import DroppingByteStream
from tests.test_security import TEAM, WRITER, write_tokens

pytestmark = pytest.mark.anyio


async def chunks_of(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_remote_asynccas_passes_the_storage_conformance_kit() -> None:
    async with memory_server() as upstream:
        remote = RemoteStorage(f"grpc://{upstream.target}")
        async with remote:
            await check_storage(remote)
        assert remote.calls["GetCapabilities"] == 1, "the batch limit is asked for once"


async def test_batches_follow_the_remotes_limit_and_larger_blobs_stream() -> None:
    """A remote that takes 100 KB batches: many small blobs go in several batches, a blob
    above the limit through ByteStream, and all read back the same ways."""
    small = [blob(30_000, seed) for seed in range(10)]
    large = blob(3 * 1024 * 1024 + 5, 99)
    async with (
        memory_server(max_batch_total_size_bytes=100_000) as upstream,
        RemoteStorage(f"grpc://{upstream.target}") as remote,
    ):
        assert await remote.bulk_update(NO_CONTEXT, [*small, large]) == [None] * 11
        assert remote.calls["BatchUpdateBlobs"] >= 4  # 300 KB in batches of under 100 KB
        assert remote.calls["Write"] == 1
        assert upstream.storage is not None
        assert await contains(upstream.storage, NO_CONTEXT, large[0])
        found = await remote.bulk_read(NO_CONTEXT, [d for d, _ in [*small, large]])
        assert found == dict([*small, large])
        assert remote.calls["BatchReadBlobs"] >= 4
        assert remote.calls["Read"] == 1


async def test_the_callers_instance_and_digest_function_reach_the_remote(tmp_path: Path) -> None:
    """instance_name=None passes each caller's instance on; a fixed one replaces it. The remote
    here lets the token write only team/* instances, which tells which instance arrived."""
    policy = AccessPolicy(tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")))
    digest, data = blob(5000, 1)
    async with memory_server(access=policy) as upstream:
        target = f"grpc://{upstream.target}"
        async with RemoteStorage(target, token=TEAM) as passing_on:
            team = RequestContext(instance_name="team/a")
            await put_chunks(passing_on, team, digest, chunks_of(data))
            assert await read_all(passing_on, team, digest) == data
            with pytest.raises(PermissionDenied, match="PERMISSION_DENIED"):
                await put_chunks(passing_on, RequestContext(instance_name="other"), digest,
                                 chunks_of(data))  # fmt: skip
        async with RemoteStorage(target, instance_name="team/b", token=TEAM) as fixed:
            other = RequestContext(instance_name="other")
            await put_chunks(fixed, other, digest, chunks_of(data))
            blake3 = Digest.of(b"blake3 through a remote", DigestFunction.BLAKE3)
            await put_chunks(fixed, other, blake3, chunks_of(b"blake3 through a remote"))
            assert await read_all(fixed, other, blake3) == b"blake3 through a remote"


async def test_what_a_remote_cannot_do_is_refused_when_the_graph_is_built(tmp_path: Path) -> None:
    remote = RemoteStorage("grpc://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match=r"Deletable; a remote CAS .* REAPI has no call"):
        SqliteIndex(remote, tmp_path / "index.sqlite")


async def test_without_retries_an_unreachable_remote_is_unavailable_naming_it() -> None:
    async with RemoteStorage("grpc://127.0.0.1:1", request_timeout=5) as remote:
        with pytest.raises(BackendUnavailable, match=r"remote CAS grpc://127.0.0.1:1"):
            await contains(remote, NO_CONTEXT, blob(10)[0])


async def test_with_retries_a_restarted_remote_loses_no_call() -> None:
    """The remote goes away and comes back on the same port while an upload is under way: the
    upload succeeds (retried with backoff), and what the remote stored before is still there."""
    storage = MemoryStorage()
    address = f"127.0.0.1:{free_port()}"
    before = blob(20_000, 1)
    digest, data = blob(300_000, 2)
    async with RemoteStorage(f"grpc://{address}", retries=10, max_backoff=0.5) as remote:
        async with CasServer(storage, MemoryActionCache(), address=address):
            assert await remote.bulk_update(NO_CONTEXT, [before]) == [None]
        uploaded = anyio.Event()

        async def upload() -> None:
            await put_chunks(remote, NO_CONTEXT, digest, chunks_of(data))
            uploaded.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(upload)
            await anyio.sleep(0.8)  # the upload is failing and retrying by now
            async with CasServer(storage, MemoryActionCache(), address=address):
                with anyio.fail_after(30):
                    await uploaded.wait()
                assert await read_all(remote, NO_CONTEXT, digest) == data
                assert await contains(remote, NO_CONTEXT, before[0])
        assert remote.calls["Write"] > 1, "the upload was not retried: the remote never left"


async def test_a_stalled_remote_gives_deadline_exceeded_promptly() -> None:
    """A remote that accepts calls and never answers: request_timeout bounds each call."""

    async def stall(request: bytes, context: object) -> bytes:
        await anyio.sleep(3600)
        raise AssertionError("unreachable")

    server = grpc.aio.server()
    service = "build.bazel.remote.execution.v2.ContentAddressableStorage"
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(stall)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {"FindMissingBlobs": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with RemoteStorage(f"grpc://127.0.0.1:{port}", request_timeout=0.5) as remote:
            digest = blob(1)[0]
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="did not answer FindMissingBlobs"):
                await remote.find_missing(
                    NO_CONTEXT, DigestBatch.of(DigestFunction.SHA256, [digest])
                )
            assert time.monotonic() - started < 3
    finally:
        await server.stop(None)


async def test_an_interrupted_upload_resumes_where_the_remote_stopped() -> None:
    """The remote's ByteStream drops the first stream of each upload after 2 MiB (keeping what
    arrived): the writer asks QueryWriteStatus and sends only the rest, from what it kept."""
    storage = MemoryStorage()
    bytestream = DroppingByteStream(storage, UploadSessions(storage), cut_after=2 * 1024 * 1024)
    digest, data = blob(6 * 1024 * 1024, 9)
    async with (
        serve_with_bytestream(storage, bytestream) as port,
        RemoteStorage(f"grpc://127.0.0.1:{port}", retries=3, max_backoff=0.1) as remote,
    ):
        await put_chunks(remote, NO_CONTEXT, digest, chunks_of(data))
        assert await read_all(storage, NO_CONTEXT, digest) == data
        # Once to resume, and once more when grpc reported the drop as a failed send.
        assert remote.calls["QueryWriteStatus"] in (1, 2)
    assert len(bytestream.first_offsets) == 2
    assert bytestream.first_offsets[1] >= 2 * 1024 * 1024, "the retry restarted from 0"


async def test_without_retries_an_interrupted_upload_fails_unavailable_and_stores_nothing() -> None:
    storage = MemoryStorage()
    bytestream = DroppingByteStream(storage, UploadSessions(storage), cut_after=1024 * 1024)
    digest, data = blob(3 * 1024 * 1024, 10)
    async with (
        serve_with_bytestream(storage, bytestream) as port,
        RemoteStorage(f"grpc://127.0.0.1:{port}") as remote,
    ):
        with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
            await put_chunks(remote, NO_CONTEXT, digest, chunks_of(data))
        assert not await contains(storage, NO_CONTEXT, digest)


async def test_a_remote_over_mutual_tls_with_a_token_from_a_config_file(tmp_path: Path) -> None:
    """The TLS files, the token file and channel options of a `remote` table reach the
    channel: a remote that wants a client certificate and a writer's token takes uploads."""
    pki = await anyio.to_thread.run_sync(make_pki, tmp_path / "pki")
    policy = AccessPolicy(tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")))
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    await anyio.Path(tmp_path / "token").write_text(f"{WRITER}\n")
    async with memory_server(tls=tls, access=policy) as upstream:
        table: dict[str, object] = {
            "type": "remote", "url": f"grpcs://{upstream.target}",
            "tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert),
            "tls_key": str(pki.client_key), "token_file": "token",
            "channel_options": {"grpc.keepalive_time_ms": 30_000},
        }  # fmt: skip
        config = {"cas": "up", "storage": {"up": table}}
        deployment = await anyio.to_thread.run_sync(build, config, tmp_path)
        remote = deployment.cas
        assert isinstance(remote, RemoteStorage)
        assert ("grpc.keepalive_time_ms", 30_000) in remote.channel_options
        digest, data = blob(3 * 1024 * 1024, 4)
        async with remote:
            await put_chunks(remote, NO_CONTEXT, digest, chunks_of(data))
            assert await read_all(remote, NO_CONTEXT, digest) == data
        # Without the client certificate the remote cannot be reached at all.
        del table["tls_cert"], table["tls_key"]
        deployment = await anyio.to_thread.run_sync(build, config, tmp_path)
        async with deployment.cas as without_certificate:
            with pytest.raises(BackendUnavailable):
                await contains(without_certificate, NO_CONTEXT, digest)


async def test_an_upload_the_remote_answers_early_succeeds_without_retries() -> None:
    """The remote has the blob already (another upload just finished) and ends this upload's
    stream while it is still sending: that is success, not UNAVAILABLE (grpc reports the
    failed send as INTERNAL, which once failed the upload; seen in a write-behind cache)."""
    async with memory_server() as upstream, RemoteStorage(f"grpc://{upstream.target}") as remote:
        for seed in range(10):
            digest, data = blob(4 * 1024 * 1024, 100 + seed)
            await put_chunks(remote, NO_CONTEXT, digest, chunks_of(data, 1024 * 1024))
            await put_chunks(remote, NO_CONTEXT, digest, chunks_of(data, 1024 * 1024))
        assert remote.calls["Write"] == 20


async def test_a_remote_action_cache_answers_hits_from_memory_for_their_ttl() -> None:
    """Hits are kept for ``hit_ttl`` (the upstream is not asked again), misses never are, and
    a result the server drops as unusable is asked for again."""
    action = Digest.of(b"an action")
    first = re_pb2.ActionResult(exit_code=1).SerializeToString()
    second = re_pb2.ActionResult(exit_code=2).SerializeToString()
    async with memory_server() as upstream:
        kept = RemoteActionCache(RemoteStorage(f"grpc://{upstream.target}"), hit_ttl=60)
        plain = RemoteActionCache(RemoteStorage(f"grpc://{upstream.target}"))
        await kept.start()
        await plain.start()
        try:
            assert await kept.get("", action) is None
            await upstream.action_cache.put("", action, first)
            assert await kept.get("", action) == first, "a miss was remembered"
            await upstream.action_cache.put("", action, second)
            assert await kept.get("", action) == first, "a hit was asked for again"
            assert await plain.get("", action) == second
            await kept.delete("", action)  # the server found it unusable
            assert await kept.get("", action) == second
            await kept.put("team", action, first)
            assert await kept.get("team", action) == first
            assert await upstream.action_cache.get("team", action) == first
        finally:
            await kept.stop()
            await plain.stop()
