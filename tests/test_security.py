"""A server a team can share: TLS and mutual TLS, bearer tokens and JWTs with per-instance
rights, all on real grpc.aio servers and channels over loopback."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.auth import AccessPolicy, JwtVerifier, TokenFile, token_hash
from asynccas.client.cas import CasClient
from asynccas.digest import Digest
from asynccas.errors import BackendUnavailable, Unauthenticated
from asynccas.resource_names import format_read_name, format_write_name
from asynccas.storage.base import contains
from asynccas.storage.context import NO_CONTEXT
from asynccas.testing import blob
from asynccas.transport import ClientTls, ServerTls
from tests.servers import memory_server
from tests.support.tls import JwtIssuer, make_pki

pytestmark = pytest.mark.anyio

WRITER, READER, TEAM = "writer-token", "reader-token", "team-token"


def write_tokens(path: Path, extra: str = "") -> Path:
    path.write_text(
        f"""
[[token]]
name = "ci"
sha256 = "{token_hash(WRITER)}"
write = ["*"]

[[token]]
name = "developer"
sha256 = "{token_hash(READER)}"
read = ["*"]

[[token]]
name = "team"
sha256 = "{token_hash(TEAM)}"
write = ["team/*"]
{extra}"""
    )
    return path


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def upload(
    channel: grpc.aio.Channel, token: str | None, data: bytes, instance: str = ""
) -> Digest:
    digest = Digest.of(data)
    name = format_write_name(instance, str(uuid.uuid4()), digest)
    await bs_grpc.ByteStreamStub(channel).Write(
        iter([bs_pb2.WriteRequest(resource_name=name, data=data, finish_write=True)]),
        metadata=metadata(token),
    )
    return digest


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def eventually(call: Any, expected: grpc.StatusCode) -> None:
    """Until ``call()`` answers ``expected``: the server re-reads its files now and then."""
    with anyio.fail_after(10):
        for _ in range(1000):
            if await code_of(call()) == expected:
                return
            await anyio.sleep(0.05)


async def test_tokens_decide_who_may_read_and_write_which_instance(tmp_path: Path) -> None:
    policy = AccessPolicy(tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")))
    async with (
        memory_server(access=policy) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        cas = re_grpc.ContentAddressableStorageStub(ch)
        data = b"shared by a team"
        digest = Digest.of(data)

        # No token, a wrong one, a reader's: the write is refused and nothing is stored.
        for token, expected in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("not-a-known-token", grpc.StatusCode.UNAUTHENTICATED),
            (READER, grpc.StatusCode.PERMISSION_DENIED),
            (TEAM, grpc.StatusCode.PERMISSION_DENIED),  # only team/* instances
        ):
            assert await code_of(upload(ch, token, data)) == expected, token
            batch = re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)
                ]
            )
            assert await code_of(cas.BatchUpdateBlobs(batch, metadata=metadata(token))) == expected
        assert not await contains(server.storage, NO_CONTEXT, digest)

        # Reading needs a token too, unless anonymous reads are allowed.
        find = re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()])
        assert await code_of(cas.FindMissingBlobs(find)) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(cas.FindMissingBlobs(find, metadata=metadata(READER))) == (
            grpc.StatusCode.OK
        )

        # The writer may; the team may under team/ only; a reader then reads.
        await upload(ch, WRITER, data)
        await upload(ch, TEAM, b"team data", instance="team/a")
        read = bs_pb2.ReadRequest(resource_name=format_read_name("", digest))
        chunks = [
            r.data async for r in bs_grpc.ByteStreamStub(ch).Read(read, metadata=metadata(READER))
        ]
        assert b"".join(chunks) == data
        assert (
            await code_of(bs_grpc.ByteStreamStub(ch).Read(read).read())
            == grpc.StatusCode.UNAUTHENTICATED
        )

        # The action cache: updates are writes.
        action = Digest.of(b"an action")
        update = re_pb2.UpdateActionResultRequest(
            action_digest=action.to_proto(), action_result=re_pb2.ActionResult(exit_code=0)
        )
        ac = re_grpc.ActionCacheStub(ch)
        assert await code_of(ac.UpdateActionResult(update, metadata=metadata(READER))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await code_of(ac.UpdateActionResult(update, metadata=metadata(WRITER))) == (
            grpc.StatusCode.OK
        )
        get = re_pb2.GetActionResultRequest(action_digest=action.to_proto())
        assert await code_of(ac.GetActionResult(get, metadata=metadata(READER))) == (
            grpc.StatusCode.OK
        )


async def test_a_denial_says_who_and_what(tmp_path: Path) -> None:
    policy = AccessPolicy(tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")))
    async with (
        memory_server(access=policy) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await upload(ch, READER, b"data", instance="main")
        assert denied.value.details() == "'developer' may not write instance 'main'"
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await upload(ch, None, b"data")
        assert "needs a bearer token" in str(anonymous.value.details())
        assert "--remote_header=Authorization=Bearer" in str(anonymous.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await re_grpc.CapabilitiesStub(ch).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(), metadata=(("authorization", "Basic abc"),)
            )
        assert malformed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer TOKEN" in str(malformed.value.details())


async def test_anonymous_reads_but_no_anonymous_writes(tmp_path: Path) -> None:
    policy = AccessPolicy(
        tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")), anonymous_reads=True
    )
    async with (
        memory_server(access=policy) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        digest = await upload(ch, WRITER, b"public")
        cas = re_grpc.ContentAddressableStorageStub(ch)
        answer = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest.to_proto()]))
        assert answer.responses[0].data == b"public"
        assert await code_of(upload(ch, None, b"anonymous")) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_changed_tokens_file_is_reloaded_and_a_broken_one_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asynccas.auth.RELOAD_INTERVAL", 0.05)
    path = write_tokens(tmp_path / "tokens.toml")
    policy = AccessPolicy(tokens=TokenFile(path))
    async with (
        memory_server(access=policy) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        newcomer = "a-new-token"
        assert await code_of(upload(ch, newcomer, b"x")) == grpc.StatusCode.UNAUTHENTICATED
        write_tokens(
            path, f'[[token]]\nname = "new"\nsha256 = "{token_hash(newcomer)}"\nwrite = ["*"]\n'
        )
        await eventually(lambda: upload(ch, newcomer, b"x"), grpc.StatusCode.OK)
        path.write_text("this is [not toml")  # an editor's half-saved file
        await anyio.sleep(0.3)
        assert await code_of(upload(ch, newcomer, b"y")) == grpc.StatusCode.OK
        write_tokens(path)  # revoked
        await eventually(lambda: upload(ch, newcomer, b"z"), grpc.StatusCode.UNAUTHENTICATED)


def test_a_tokens_file_with_mistakes_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    for text, reason in (
        ('[[token]]\nname = "x"\nsha256 = "abc"\n', "64 hex digits"),
        (f'[[token]]\nsha256 = "{token_hash("t")}"\n', "needs a name"),
        (f'[[token]]\nname = "x"\nsha256 = "{token_hash("t")}"\nwrite = "*"\n', "must be a list"),
        ("[[token]\n", "not valid TOML"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=reason):
            TokenFile(path).load()


async def test_jwts_signed_by_a_trusted_key_carry_their_rights(tmp_path: Path) -> None:
    issuer = await anyio.to_thread.run_sync(JwtIssuer, tmp_path / "jwks.json")
    verifier = JwtVerifier(issuer.jwks, issuer=issuer.issuer, audience="asynccas")
    async with (
        memory_server(access=AccessPolicy(jwt=verifier)) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        writer = issuer.token("ci", write=["*"])
        reader = issuer.token("dev", read=["*"])
        await upload(ch, writer, b"signed")
        assert await code_of(upload(ch, reader, b"x")) == grpc.StatusCode.PERMISSION_DENIED
        other = await anyio.to_thread.run_sync(
            JwtIssuer, tmp_path / "other-jwks.json"
        )  # a key the server does not trust
        for token in (
            issuer.token("late", write=["*"], lifetime=-60),
            issuer.token("elsewhere", write=["*"], audience="another-service"),
            other.token("forged", write=["*"]),
            writer[:-4] + "AAAA",  # a tampered signature
        ):
            assert await code_of(upload(ch, token, b"x")) == grpc.StatusCode.UNAUTHENTICATED


async def test_tls_serves_clients_that_trust_its_ca(tmp_path: Path) -> None:
    pki = await anyio.to_thread.run_sync(make_pki, tmp_path / "pki")
    tls = ServerTls(pki.server_cert, pki.server_key)
    async with memory_server(tls=tls) as server:
        endpoint = f"grpcs://{server.target}"
        async with CasClient(endpoint, tls=ClientTls(ca=pki.ca)) as client:
            [(digest, data)] = [blob(5000, 1)]
            await client.upload_blobs([(digest, data)])
            assert await client.download_blobs([digest]) == {digest: data}
        # Not trusting the CA is a clear asynccas error, not a raw grpc one.
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            async with CasClient(endpoint, max_attempts=1):
                pass
        # A plain-text client cannot talk to it either.
        with pytest.raises(BackendUnavailable):
            async with CasClient(f"grpc://{server.target}", max_attempts=1):
                pass


async def test_mutual_tls_needs_a_client_certificate(tmp_path: Path) -> None:
    pki = await anyio.to_thread.run_sync(make_pki, tmp_path / "pki")
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    async with memory_server(tls=tls) as server:
        endpoint = f"grpcs://{server.target}"
        with pytest.raises(BackendUnavailable):
            async with CasClient(endpoint, tls=ClientTls(ca=pki.ca), max_attempts=1):
                pass
        mutual = ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        async with CasClient(endpoint, tls=mutual) as client:
            assert await client.find_missing([]) == []


async def test_tls_and_tokens_together_through_the_client(tmp_path: Path) -> None:
    pki = await anyio.to_thread.run_sync(make_pki, tmp_path / "pki")
    policy = AccessPolicy(tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")))
    async with memory_server(
        tls=ServerTls(pki.server_cert, pki.server_key), access=policy
    ) as server:
        endpoint = f"grpcs://{server.target}"
        async with CasClient(endpoint, tls=ClientTls(ca=pki.ca), token=WRITER) as client:
            # Over the batch limit: ByteStream both ways, whose streaming calls carry the token
            # too (the client once sent it on unary calls only).
            digest, data = blob(5 << 20, 2)
            await client.upload_blobs([(digest, data)])
            assert await client.download_blobs([digest]) == {digest: data}
        # A token the server does not know fails the client's first call.
        with pytest.raises(Unauthenticated, match="UNAUTHENTICATED"):
            async with CasClient(
                endpoint, tls=ClientTls(ca=pki.ca), token="forged", max_attempts=1
            ):
                pass
        # Without a token, Capabilities answers (see below) and the first read is refused.
        async with CasClient(endpoint, tls=ClientTls(ca=pki.ca), max_attempts=1) as client:
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await client.find_missing([digest])
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with CasClient(endpoint, "main", tls=ClientTls(ca=pki.ca), token=READER) as client:
            assert await client.download_blobs([digest]) == {digest: data}
        async with CasClient(endpoint, "x", tls=ClientTls(ca=pki.ca), token=TEAM) as client:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await client.find_missing([digest])
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert denied.value.details() == "'team' may not read instance 'x'"


async def test_capabilities_need_no_token(tmp_path: Path) -> None:
    """Capabilities holds nothing but the server's settings, and Bazel before 3 sends no
    --remote_header on it: it answers every caller whose credentials, if any, verify."""
    policy = AccessPolicy(tokens=TokenFile(write_tokens(tmp_path / "tokens.toml")))
    async with (
        memory_server(access=policy) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        stub = re_grpc.CapabilitiesStub(ch)
        answer = await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="any"))
        assert answer.cache_capabilities.max_batch_total_size_bytes > 0
        forged = stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(), metadata=metadata("forged"))
        assert await code_of(forged) == grpc.StatusCode.UNAUTHENTICATED
