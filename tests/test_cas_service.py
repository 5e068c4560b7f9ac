"""ContentAddressableStorage and Capabilities over a real grpc.aio server."""

from __future__ import annotations

import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.digest import Digest, DigestFunction
from asynccas.testing import blob

pytestmark = pytest.mark.anyio
Request = re_pb2.BatchUpdateBlobsRequest.Request
OK, INVALID, NOT_FOUND = (
    grpc.StatusCode.OK.value[0],
    grpc.StatusCode.INVALID_ARGUMENT.value[0],
    grpc.StatusCode.NOT_FOUND.value[0],
)
EMPTY = Digest.empty()


async def upload(channel: grpc.aio.Channel, *blobs: tuple[Digest, bytes]) -> None:
    response = await re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[Request(digest=d.to_proto(), data=data) for d, data in blobs]
        )
    )
    assert [r.status.code for r in response.responses] == [OK] * len(blobs)


async def test_capabilities(channel: grpc.aio.Channel) -> None:
    caps = await re_grpc.CapabilitiesStub(channel).GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name="any/instance")
    )
    cache = caps.cache_capabilities
    assert cache.digest_functions[0] == re_pb2.DigestFunction.SHA256
    assert set(cache.digest_functions) == {f.proto_value for f in DigestFunction}
    assert cache.max_batch_total_size_bytes == 1 << 20
    assert cache.action_cache_update_capabilities.update_enabled
    assert (caps.low_api_version.major, caps.high_api_version.minor) == (2, 3)


async def test_find_missing_blobs(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    present, absent = blob(1000, 1), blob(1000, 2)
    await upload(channel, present)
    response = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(
            blob_digests=[present[0].to_proto(), absent[0].to_proto(), EMPTY.to_proto()]
        )
    )
    assert list(response.missing_blob_digests) == [absent[0].to_proto()]


@pytest.mark.parametrize(
    ("hash_", "size"),
    [("../../etc/passwd", 1), ("A" * 64, 1), ("a" * 63, 1), ("a" * 64, -1), ("", 0)],
)
async def test_find_missing_rejects_bad_digests(
    channel: grpc.aio.Channel, hash_: str, size: int
) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                blob_digests=[re_pb2.Digest(hash=hash_, size_bytes=size)]
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hash" in (caught.value.details() or "") or "size" in (caught.value.details() or "")


async def test_find_missing_blobs_in_any_field_order(channel: grpc.aio.Channel) -> None:
    """Requests the wire reader does not take (here: digest_function first, and a field this
    server does not know) get the same answer through protobuf; garbage gets a clear error."""
    present, absent = blob(300, 5), blob(300, 6)
    await upload(channel, present)
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
    )
    entries = re_pb2.FindMissingBlobsRequest(
        blob_digests=[present[0].to_proto(), absent[0].to_proto()]
    ).SerializeToString()
    for body in (entries, b"\x18\x01" + entries, entries + b"\x78\x01"):
        answer = re_pb2.FindMissingBlobsResponse.FromString(await raw(body))
        assert list(answer.missing_blob_digests) == [absent[0].to_proto()]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(entries[:-3])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FindMissingBlobsRequest is malformed" in (caught.value.details() or "")


async def test_unsupported_digest_function_is_named(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                blob_digests=[blob(10)[0].to_proto()],
                digest_function=re_pb2.DigestFunction.MURMUR3,
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MURMUR3" in (caught.value.details() or "")


async def test_batch_update_statuses_are_per_blob(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    good, other = blob(500, 3), blob(600, 4)
    response = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                Request(digest=good[0].to_proto(), data=good[1]),
                Request(digest=other[0].to_proto(), data=b"wrong"),
                Request(digest=re_pb2.Digest(hash="/etc/passwd", size_bytes=4), data=b"root"),
                Request(digest=EMPTY.to_proto(), data=b""),
                Request(digest=good[0].to_proto(), data=good[1], compressor=re_pb2.Compressor.ZSTD),
            ]
        )
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [OK, INVALID, INVALID, OK, INVALID]
    assert "zstd" in response.responses[4].status.message
    assert response.responses[1].digest == other[0].to_proto()
    missing = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[good[0].to_proto(), other[0].to_proto()])
    )
    assert list(missing.missing_blob_digests) == [other[0].to_proto()]


async def test_batch_over_the_limit_fails_whole(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    big = [blob(300_000, i) for i in range(4)]  # 1.2 MB > the fixture's 1 MiB limit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[Request(digest=d.to_proto(), data=data) for d, data in big]
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_total_size_bytes" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d, _ in big])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_read_statuses_are_per_blob(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    present, absent = blob(700, 5), blob(700, 6)
    await upload(channel, present)
    response = await cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(
            digests=[
                present[0].to_proto(),
                absent[0].to_proto(),
                EMPTY.to_proto(),
                re_pb2.Digest(hash="../" * 21 + "a", size_bytes=1),
            ]
        )
    )
    assert [r.status.code for r in response.responses] == [OK, NOT_FOUND, OK, INVALID]
    assert response.responses[0].data == present[1]
    assert response.responses[2].data == b""
    assert str(absent[0]) in response.responses[1].status.message


def directory(
    files: list[tuple[str, Digest]], dirs: list[tuple[str, Digest]]
) -> tuple[Digest, bytes]:
    message = re_pb2.Directory(
        files=[re_pb2.FileNode(name=n, digest=d.to_proto()) for n, d in files],
        directories=[re_pb2.DirectoryNode(name=n, digest=d.to_proto()) for n, d in dirs],
    )
    data = message.SerializeToString()
    return Digest.of(data), data


async def test_get_tree_pages_and_omits_missing_subtrees(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    leaves = [directory([(f"f{i}", blob(10, i)[0])], []) for i in range(5)]
    ghost = directory([("never-uploaded", blob(10, 99)[0])], [])
    shared = leaves[0]
    middle = directory([], [("a", shared[0]), ("b", leaves[1][0])])
    root = directory(
        [],
        [
            ("m", middle[0]),
            ("s", shared[0]),
            ("x", ghost[0]),
            *[(f"l{i}", leaves[i][0]) for i in (2, 3, 4)],
        ],
    )
    await upload(channel, root, middle, *leaves)
    expected = {root[1], middle[1], *(leaf[1] for leaf in leaves)}

    async def fetch(page_size: int, token: str = "") -> list[re_pb2.GetTreeResponse]:
        request = re_pb2.GetTreeRequest(
            root_digest=root[0].to_proto(), page_size=page_size, page_token=token
        )
        return [r async for r in cas.GetTree(request)]

    whole = await fetch(0)
    got = [d.SerializeToString() for r in whole for d in r.directories]
    assert sorted(got) == sorted(expected), "each present directory once, missing ones omitted"
    assert got[0] == root[1]

    pages = await fetch(2)
    assert [len(p.directories) for p in pages] == [2, 2, 2, 1]
    assert [d.SerializeToString() for p in pages for d in p.directories] == got
    assert pages[-1].next_page_token == ""
    resumed = await fetch(2, pages[1].next_page_token)
    assert [d.SerializeToString() for p in resumed for d in p.directories] == got[4:]


async def test_get_tree_errors(channel: grpc.aio.Channel) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    missing = directory([], [])[0]
    missing = Digest.of(b"not stored")
    for request, code in [
        (re_pb2.GetTreeRequest(root_digest=missing.to_proto()), grpc.StatusCode.NOT_FOUND),
        (
            re_pb2.GetTreeRequest(root_digest=missing.to_proto(), page_token="garbage"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            re_pb2.GetTreeRequest(root_digest=missing.to_proto(), page_size=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            re_pb2.GetTreeRequest(instance_name="a/blobs/b", root_digest=missing.to_proto()),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in cas.GetTree(request)]
        assert caught.value.code() == code, request
    # The empty Directory is the empty blob, which always exists.
    tree = [r async for r in cas.GetTree(re_pb2.GetTreeRequest(root_digest=EMPTY.to_proto()))]
    assert [list(r.directories) for r in tree] == [[re_pb2.Directory()]]
