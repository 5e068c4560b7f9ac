"""Requests a hostile or careless client can send, each of which once harmed the server or the
cache for everyone: each answer must be a clear INVALID_ARGUMENT (or a miss), built without
first spending the memory the request asks for."""

from __future__ import annotations

from typing import cast

import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.digest import Digest
from asynccas.server.errors import MAX_MESSAGE_CHARS
from asynccas.testing import blob
from tests.test_cas_service import upload

pytestmark = pytest.mark.anyio


async def invalid_argument(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details() or ""


async def test_batch_read_counts_every_repeat_of_a_digest(channel: grpc.aio.Channel) -> None:
    """The limit was checked on distinct digests while the answer copied the data once per
    entry: 250 repeats of a 4 MiB blob took a server from 233 MB to 2.2 GB."""
    digest, data = blob(100_000, 1)
    await upload(channel, (digest, data))
    cas = re_grpc.ContentAddressableStorageStub(channel)
    request = re_pb2.BatchReadBlobsRequest(digests=[digest.to_proto()] * 20)  # 2 MB > 1 MiB
    details = await invalid_argument(cas.BatchReadBlobs(request))
    assert "max_batch_total_size_bytes" in details
    few = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest.to_proto()] * 5))
    assert [r.data for r in few.responses] == [data] * 5


async def test_an_answer_over_the_message_limit_is_refused_up_front(
    channel: grpc.aio.Channel,
) -> None:
    """30,000 absent digests fit in a request, but their NOT_FOUND entries did not fit in the
    server's own message limit: the call failed in transport instead of saying why."""
    digests = [blob(8, 10_000 + i)[0].to_proto() for i in range(30_000)]
    cas = re_grpc.ContentAddressableStorageStub(channel)
    details = await invalid_argument(
        cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    )
    assert "message limit" in details


@pytest.mark.parametrize("length", [17_000, 1_000_000])
async def test_a_huge_instance_name_is_refused_in_a_few_words(
    channel: grpc.aio.Channel, length: int
) -> None:
    """A 17,000-character name was echoed into the status and overflowed gRPC's metadata
    limit; a 1 MB one was accepted."""
    cas = re_grpc.ContentAddressableStorageStub(channel)
    request = re_pb2.FindMissingBlobsRequest(
        instance_name="x" * length, blob_digests=[blob(8, 1)[0].to_proto()]
    )
    details = await invalid_argument(cas.FindMissingBlobs(request))
    assert len(details) < MAX_MESSAGE_CHARS + 100
    assert "at most 1024" in details


async def test_a_result_whose_tree_names_a_malformed_digest_is_a_miss(
    channel: grpc.aio.Channel,
) -> None:
    """Such a result was accepted, and every later GetActionResult of the action then failed
    with INVALID_ARGUMENT: the entry was poisoned for good."""
    bad_file = re_pb2.Digest(hash="zz" * 32, size_bytes=5)  # not hexadecimal
    tree = re_pb2.Tree(root=re_pb2.Directory(files=[re_pb2.FileNode(name="a", digest=bad_file)]))
    tree_data = tree.SerializeToString()
    tree_digest = Digest.of(tree_data)
    await upload(channel, (tree_digest, tree_data))
    action = blob(50, 7)[0].to_proto()
    result = re_pb2.ActionResult(
        output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=tree_digest.to_proto())]
    )
    ac = re_grpc.ActionCacheStub(channel)
    await ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


RPCS = [
    ("build.bazel.remote.execution.v2.Capabilities/GetCapabilities", "unary"),
    ("build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs", "unary"),
    ("build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs", "unary"),
    ("build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs", "unary"),
    ("build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree", "server-streaming"),
    ("build.bazel.remote.execution.v2.ActionCache/GetActionResult", "unary"),
    ("build.bazel.remote.execution.v2.ActionCache/UpdateActionResult", "unary"),
    ("google.bytestream.ByteStream/Read", "server-streaming"),
    ("google.bytestream.ByteStream/Write", "client-streaming"),
    ("google.bytestream.ByteStream/QueryWriteStatus", "unary"),
]
MALFORMED = [b"\xff\xff\xff", b"\x0a\x80", b"\x12\x05abc"]  # bad tag; cut length; cut field


@pytest.mark.parametrize(("method", "kind"), RPCS, ids=[m.rsplit("/", 1)[1] for m, _ in RPCS])
async def test_a_malformed_request_is_invalid_argument_on_every_rpc(
    channel: grpc.aio.Channel, method: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Malformed bodies got UNKNOWN or INTERNAL on every RPC but FindMissingBlobs, each with
    a traceback logged at ERROR."""
    path = f"/{method}"
    for body in MALFORMED:
        if kind == "unary":
            unary = cast(
                "grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(path)
            )
            call: object = unary(body)
        elif kind == "server-streaming":

            async def read_all(body: bytes = body) -> None:
                stream = cast(
                    "grpc.aio.UnaryStreamMultiCallable[bytes, bytes]", channel.unary_stream(path)
                )
                async for _ in stream(body):
                    pass

            call = read_all()
        else:
            upload = cast(
                "grpc.aio.StreamUnaryMultiCallable[bytes, bytes]", channel.stream_unary(path)
            )
            call = upload(iter([body]))
        details = await invalid_argument(call)
        assert "not a valid" in details or "malformed" in details
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a traceback was logged"
