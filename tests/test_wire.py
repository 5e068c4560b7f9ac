"""The wire-level readers (the server's FindMissingBlobs, the client's ReadResponse) agree
with protobuf on everything they accept, and the wire-level writer (the server's
BatchReadBlobsResponse) writes what protobuf writes."""

from __future__ import annotations

from itertools import compress

from hypothesis import given, settings
from hypothesis import strategies as st

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas.client.channel import read_response_data
from asynccas.digest import Digest
from asynccas.errors import BatchTooLarge, BlobNotFound, InvalidDigest
from asynccas.server.cas import batch_read_response, batch_update_response
from asynccas.wire.messages import (
    FindMissingBlobsWire,
    ReadResult,
    UpdateResult,
    encode_batch_read_response,
    encode_batch_update_response,
)

HEX = "0123456789abcdef"
hashes = st.one_of(
    st.text(HEX, min_size=64, max_size=64),
    st.text(HEX + "ABCDEF/.\n", min_size=0, max_size=130),
)
sizes = st.one_of(
    st.integers(0, 300),
    st.integers(0, 2**35 + 5),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 127, 128, 16383, 16384, 2**35 - 1, 2**35]),
)
digests = st.builds(re_pb2.Digest, hash=hashes, size_bytes=sizes)
requests = st.builds(
    re_pb2.FindMissingBlobsRequest,
    instance_name=st.one_of(st.just(""), st.text(max_size=200)),
    blob_digests=st.lists(digests, max_size=40),
    digest_function=st.sampled_from([0, 0, 1, 2, 9]),
)


def canonical(request: re_pb2.FindMissingBlobsRequest) -> bool:
    """Whether the wire reader must take this request rather than defer to protobuf."""
    return request.digest_function in (0, 1) and all(
        len(d.hash) == 64 and set(d.hash) <= set(HEX) and 0 <= d.size_bytes < 2**35
        for d in request.blob_digests
    )


def check_agrees(body: bytes) -> FindMissingBlobsWire | None:
    parsed = FindMissingBlobsWire.parse(body)
    if parsed is None:
        return None
    # Whatever the reader accepts, protobuf reads the same way.
    message = re_pb2.FindMissingBlobsRequest.FromString(body)
    assert parsed.instance_name == message.instance_name
    assert message.digest_function in (0, re_pb2.DigestFunction.SHA256)
    assert parsed.batch.hashes == [d.hash for d in message.blob_digests]
    assert parsed.batch.sizes == [d.size_bytes for d in message.blob_digests]
    mask = bytes(i % 3 == 0 for i in range(len(message.blob_digests)))
    expected = re_pb2.FindMissingBlobsResponse(
        missing_blob_digests=list(compress(message.blob_digests, mask))
    )
    assert re_pb2.FindMissingBlobsResponse.FromString(parsed.answer(mask)) == expected
    return parsed


@settings(max_examples=400)
@given(requests)
def test_canonical_requests_are_read_exactly(request: re_pb2.FindMissingBlobsRequest) -> None:
    body = request.SerializeToString()
    parsed = check_agrees(body)
    assert (parsed is not None) == canonical(request)


@settings(max_examples=600)
@given(requests, st.data())
def test_damaged_requests_are_never_misread(
    request: re_pb2.FindMissingBlobsRequest, data: st.DataObject
) -> None:
    body = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(0, len(body)))
        if kind == "flip" and position < len(body):
            body[position] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            body[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del body[position : position + data.draw(st.integers(1, 3))]
        else:
            del body[position:]
    try:
        re_pb2.FindMissingBlobsRequest.FromString(bytes(body))
    except Exception:
        # protobuf rejects it, so the reader must too (the server then answers INVALID_ARGUMENT)
        assert FindMissingBlobsWire.parse(bytes(body)) is None
        return
    check_agrees(bytes(body))


def test_sizes_whose_varint_ends_in_the_tag_byte_are_read_exactly() -> None:
    """0x12 is both the entries' tag and, for these sizes, their varint's last byte."""
    sizes = [18, 0x12 << 7 | 5, 0x12 << 14, (0x12 << 21) + 1, 0x12 << 28, 1, 0]
    for order in (sizes, sizes[::-1], [18, 18 + (1 << 7), 18]):
        request = re_pb2.FindMissingBlobsRequest(
            blob_digests=[
                re_pb2.Digest(hash=f"{i:064x}", size_bytes=size) for i, size in enumerate(order)
            ]
        )
        parsed = check_agrees(request.SerializeToString())
        assert parsed is not None
        assert parsed.batch.delimited == [
            Digest(f"{i:064x}", size).delimited for i, size in enumerate(order)
        ]


@given(st.binary(max_size=6), st.integers(0, 63), st.sampled_from([0, 18, 300]))
def test_a_hash_holding_the_tag_byte_is_never_misread(
    junk: bytes, position: int, size: int
) -> None:
    """A hash with 0x12 in it puts extra tag bytes in the request: it must be refused."""
    hash_ = bytearray(b"a" * 64)
    hash_[position : position + len(junk) + 1] = b"\x12" + junk
    digest = re_pb2.Digest(hash=bytes(hash_[:64]).decode("latin-1"), size_bytes=size)
    good = re_pb2.Digest(hash="b" * 64, size_bytes=18)
    for digests in ([digest], [good, digest], [digest, good], [good, digest, good]):
        body = re_pb2.FindMissingBlobsRequest(blob_digests=digests).SerializeToString()
        assert FindMissingBlobsWire.parse(body) is None


def test_other_field_orders_and_unknown_fields_defer_to_protobuf() -> None:
    digest = re_pb2.Digest(hash="a" * 64, size_bytes=5)
    entry = b"\x12" + bytes([len(digest.SerializeToString())]) + digest.SerializeToString()
    function_first = b"\x18\x01" + entry
    unknown_field = entry + b"\x20\x07"
    name_last = entry + b"\x0a\x01x"
    for body in (function_first, unknown_field, name_last):
        assert FindMissingBlobsWire.parse(body) is None
        assert len(re_pb2.FindMissingBlobsRequest.FromString(body).blob_digests) == 1
    assert FindMissingBlobsWire.parse(entry + b"\x18\x01") is not None
    # An instance name ending in the bytes of a digest_function field is still a name.
    named = b"\x0a\x02\x18\x01"
    assert FindMissingBlobsWire.parse(named) is None
    assert re_pb2.FindMissingBlobsRequest.FromString(named).instance_name == "\x18\x01"
    assert FindMissingBlobsWire.parse(b"\x0a\x01\x18\x01") is None  # corrupt


@given(st.binary(max_size=300), st.binary(max_size=6))
def test_read_responses_are_read_off_the_wire_as_protobuf_reads_them(
    data: bytes, trailing: bytes
) -> None:
    message = bs_pb2.ReadResponse(data=data).SerializeToString()
    assert read_response_data(message) == data
    assert read_response_data(message + b"\x08\x01") == data  # then an unknown field
    try:
        expected = bs_pb2.ReadResponse.FromString(message + trailing).data
    except Exception:  # not a message at all: protobuf's error is the client's too
        return
    assert read_response_data(message + trailing) == expected


NOT_FOUND = BlobNotFound(Digest.of(b"gone"))
errors = st.sampled_from(
    [
        None,
        NOT_FOUND,
        InvalidDigest("hash 'xyz' is not 64 lower-case hex characters"),
        BatchTooLarge("ünïcode in a message, and a long one " * 10),
    ]
)
read_results = st.lists(
    st.tuples(
        digests,
        st.one_of(st.none(), st.binary(max_size=300), st.binary(min_size=200, max_size=20_000)),
        errors,
        st.sampled_from([0, 0, 1]),  # identity, or zstd (Compressor.ZSTD)
    ).map(lambda r: (r[0], r[1], r[2] if r[1] is not None else r[2] or NOT_FOUND, r[3])),
    max_size=30,
)


@settings(max_examples=300)
@given(read_results)
def test_batch_read_responses_are_encoded_as_protobuf_encodes_them(
    results: list[ReadResult],
) -> None:
    assert encode_batch_read_response(results) == (batch_read_response(results).SerializeToString())


@settings(max_examples=300)
@given(st.lists(st.tuples(digests, errors), max_size=30))
def test_batch_update_responses_are_encoded_as_protobuf_encodes_them(
    results: list[UpdateResult],
) -> None:
    assert encode_batch_update_response(results) == (
        batch_update_response(results).SerializeToString()
    )
