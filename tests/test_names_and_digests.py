"""Digest validation and resource-name parsing, including hostile input (hypothesis)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import MAX_SIZE, Digest, DigestBatch, DigestFunction
from asynccas.errors import InvalidArgument, InvalidDigest, InvalidResourceName, UnsupportedFeature
from asynccas.resource_names import (
    RESERVED_SEGMENTS,
    format_read_name,
    format_write_name,
    parse_read_name,
    parse_write_name,
)

functions = st.sampled_from(list(DigestFunction))
sizes = st.integers(min_value=0, max_value=MAX_SIZE)
segment = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12)
reserved = RESERVED_SEGMENTS
instances = st.lists(
    segment.filter(lambda s: s not in reserved and s not in (".", "..")), max_size=4
).map("/".join)


@st.composite
def digests(draw: st.DrawFn) -> Digest:
    function = draw(functions)
    hex_ = draw(
        st.text(
            alphabet="0123456789abcdef", min_size=function.hex_length, max_size=function.hex_length
        )
    )
    return Digest(hex_, draw(sizes), function)


@given(digests())
def test_digest_roundtrips(digest: Digest) -> None:
    function = digest.function
    assert Digest.from_proto(digest.to_proto(), function.proto_value) == digest
    assert Digest.from_key(digest.key) == digest
    assert Digest.parse(str(digest), function) == digest
    assert Digest.from_member(digest.member) == digest
    if function.is_legacy:  # inferred from the hash's length where nothing names it
        assert Digest.from_proto(digest.to_proto()) == digest
        assert Digest.parse(str(digest)) == digest
        assert digest.member == digest.delimited
    else:  # never inferred: the same hex without a name is the legacy function's digest
        inferred = Digest.from_proto(digest.to_proto())
        assert inferred != digest
        assert inferred.function is DigestFunction.for_hex_length(function.hex_length)
        assert digest.member != inferred.member
        assert digest.delimited == inferred.delimited  # as requests carry them: the same


@given(digests())
def test_delimited_form_is_the_length_then_the_message_as_protobuf_writes_it(
    digest: Digest,
) -> None:
    message = digest.to_proto().SerializeToString()
    length = len(message)
    prefix = bytes([length]) if length < 128 else bytes([length & 0x7F | 0x80, length >> 7])
    assert digest.delimited == prefix + message
    batch = DigestBatch.of(digest.function, [digest, digest])
    assert batch.delimited == [digest.delimited] * 2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05\x0a\x03abc",  # not a supported hash
        Digest.of(b"a").delimited[:-1],  # cut short
        Digest.of(b"a").delimited + b"\x00",  # trailing byte
        # size 1 written as a two-byte varint: protobuf reads it, but it is not the one form
        b"\x45\x0a\x40" + Digest.of(b"a").hash.encode() + b"\x10\x81\x00",
        # size 0 written out, where protobuf leaves it away
        b"\x44\x0a\x40" + Digest.of(b"").hash.encode() + b"\x10\x00",
    ],
)
def test_from_member_accepts_only_the_one_form(data: bytes) -> None:
    with pytest.raises(InvalidDigest):
        Digest.from_member(data)


@given(st.text(), st.integers())
def test_digest_rejects_anything_not_hex_of_the_right_length(hash_: str, size: int) -> None:
    valid_hash = all(c in "0123456789abcdef" for c in hash_) and len(hash_) in {
        f.hex_length for f in DigestFunction
    }
    try:
        digest = Digest.from_proto(Digest.of(b"").to_proto().__class__(hash=hash_, size_bytes=size))
    except (InvalidDigest, ValueError):
        assert not (valid_hash and 0 <= size <= MAX_SIZE)
    else:
        assert valid_hash
        assert digest.size_bytes == size
        assert "/" not in digest.key
        assert ".." not in digest.key


@pytest.mark.parametrize(
    "hash_",
    [
        "",
        "../" * 21 + "a",
        "/etc/passwd",
        "A" * 64,
        "g" * 64,
        "a" * 63 + "\x00",
        "a" * 63 + "\n",
        " " + "a" * 63,
    ],
)
def test_hostile_hashes(hash_: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest(hash_, 1)


# Hashes that are almost right: the bulk validation must catch every one of them.
near_hashes = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    st.text(alphabet="0123456789abcdefA\n \x00é", min_size=62, max_size=66),
    st.text(alphabet="0123456789abcdef", min_size=40, max_size=40),
)


@given(
    st.lists(st.tuples(near_hashes, st.integers(min_value=-2, max_value=MAX_SIZE)), max_size=8),
    st.sampled_from([0, re_pb2.DigestFunction.SHA256, re_pb2.DigestFunction.SHA1]),
)
def test_batch_validation_agrees_with_one_by_one(
    entries: list[tuple[str, int]], function_value: int
) -> None:
    messages = [re_pb2.Digest(hash=h, size_bytes=n) for h, n in entries]
    try:
        expected = [Digest.from_proto(m, function_value) for m in messages]
    except (InvalidDigest, UnsupportedFeature):
        expected = None
    if expected is not None and len({d.function for d in expected}) > 1:
        expected = None  # REAPI: one digest function per request
    try:
        batch = DigestBatch.from_protos(messages, function_value)
    except (InvalidDigest, UnsupportedFeature):
        assert expected is None, "bulk validation refused what one-by-one accepts"
    else:
        assert expected is not None, f"bulk validation accepted {entries!r}"
        assert batch.digests == expected
        assert [d.key for d in batch.digests] == [d.key for d in expected]
        assert (batch.hashes, batch.sizes) == (
            [d.hash for d in expected],
            [d.size_bytes for d in expected],
        )


def test_batch_of_mixed_functions_names_them() -> None:
    sha256, sha1 = Digest.of(b"a"), Digest.of(b"a", DigestFunction.SHA1)
    with pytest.raises(InvalidDigest, match="one digest function, not sha1 and sha256"):
        DigestBatch.from_protos([sha256.to_proto(), sha1.to_proto()])


def test_batch_unique_and_empty_positions() -> None:
    a, b, empty = Digest.of(b"a"), Digest.of(b"b"), Digest.empty()
    same_hash_other_size = Digest(a.hash, a.size_bytes + 1)
    batch = DigestBatch.from_protos(
        [d.to_proto() for d in [a, b, a, empty, same_hash_other_size, b]]
    )
    unique = batch.unique()
    assert unique is not None
    distinct, first = unique
    assert distinct.digests == [a, b, empty, same_hash_other_size]
    assert first == [0, 1, 3, 4]
    assert batch.empty_positions() == [3]
    assert DigestBatch.from_protos([a.to_proto(), same_hash_other_size.to_proto()]).unique() is None


def test_a_batch_of_delimited_digests_derives_the_other_columns() -> None:
    a, b, empty = Digest.of(b"a"), Digest.of(b"b" * 300), Digest.empty()
    digests = [a, b, empty, a]
    batch = DigestBatch.of_delimited(
        DigestFunction.SHA256, [d.delimited for d in digests], "\n".join(d.hash for d in digests)
    )
    assert len(batch) == 4
    assert batch.hashes == [d.hash for d in digests]
    assert batch.sizes == [1, 300, 0, 1]
    assert batch.digests == digests
    assert batch.empty_positions() == [2]
    unique = batch.unique()
    assert unique is not None
    assert unique[0].digests == [a, b, empty]
    assert unique[1] == [0, 1, 2]


@pytest.mark.parametrize("size", [-1, MAX_SIZE + 1, True, 1.0])
def test_bad_sizes(size: object) -> None:
    with pytest.raises(InvalidDigest):
        Digest("a" * 64, size)  # type: ignore[arg-type]


def test_empty_blob() -> None:
    assert Digest.empty().is_empty
    assert Digest.empty().hash == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert not Digest("a" * 64, 0).is_empty


@given(instances, digests())
def test_read_names_roundtrip(instance: str, digest: Digest) -> None:
    parsed = parse_read_name(format_read_name(instance, digest))
    assert (parsed.instance_name, parsed.digest, parsed.compressor) == (instance, digest, None)
    compressed = parse_read_name(format_read_name(instance, digest, "zstd"))
    assert compressed.compressor == "zstd"
    assert compressed.digest == digest


@given(
    instances,
    segment.filter(lambda s: s not in (".", "..")),
    digests(),
    st.lists(segment, max_size=3).map("/".join),
)
def test_write_names_roundtrip(
    instance: str, upload_id: str, digest: Digest, metadata: str
) -> None:
    name = format_write_name(instance, upload_id, digest)
    name = f"{name}/{metadata}" if metadata else name
    parsed = parse_write_name(name)
    assert (parsed.instance_name, parsed.upload_id, parsed.digest, parsed.metadata) == (
        instance,
        upload_id,
        digest,
        metadata,
    )


def test_explicit_digest_function_segment() -> None:
    digest = Digest.of(b"x", DigestFunction.SHA512)
    parsed = parse_read_name(f"inst/blobs/sha512/{digest.hash}/1")
    assert parsed.digest == digest
    assert parse_read_name(f"blobs/blake3/{'a' * 64}/1").digest.function is DigestFunction.BLAKE3
    with pytest.raises(UnsupportedFeature, match="murmur3"):
        parse_read_name(f"blobs/murmur3/{'a' * 16}/1")
    with pytest.raises(InvalidResourceName):
        parse_read_name(f"blobs/sha1/{digest.hash}/1")  # length disagrees with the function


HOSTILE_NAMES = [
    "",
    "/",
    "blobs",
    "blobs/abc",
    f"blobs/{'a' * 64}",
    f"blobs/{'a' * 64}/-1",
    f"blobs/{'a' * 64}/+1",
    f"blobs/{'a' * 64}/01",
    f"blobs/{'a' * 64}/1e3",
    f"blobs/{'a' * 64}/{2**63}",
    f"blobs/{'a' * 64}/{10**30}",
    f"blobs/{'A' * 64}/1",
    "blobs/../../../../etc/passwd/1",
    f"../blobs/{'a' * 64}/1",
    f"/abs/blobs/{'a' * 64}/1",
    f"a//b/blobs/{'a' * 64}/1",
    f"uploads/x/blobs/{'a' * 64}/1",
    f"inst\x00/blobs/{'a' * 64}/1",
    f"blobs/{'a' * 64}/1\x00",
    f"compressed-blobs/gzip/{'a' * 64}/1",
    f"compressed-blobs/{'a' * 64}/1",
    f"actions/blobs/{'a' * 64}/1",
    f"blobs/{'a' * 64}/1/trailing",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_read_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_read_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "uploads/blobs/" + "a" * 64 + "/1",
        "uploads/../blobs/" + "a" * 64 + "/1",
        "uploads/x\x00/blobs/" + "a" * 64 + "/1",
        "uploads/x/blobs/" + "a" * 64 + "/-5",
        "blobs/" + "a" * 64 + "/1",
    ],
)
def test_hostile_write_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_write_name(name)


@given(st.text(max_size=300))
def test_arbitrary_text_never_escapes(name: str) -> None:
    """Whatever the input, parsing either fails cleanly or yields a validated digest."""
    for parse in (parse_read_name, parse_write_name):
        try:
            parsed = parse(name)
        except InvalidArgument:
            continue
        assert isinstance(parsed.digest, Digest)
        assert set(parsed.digest.hash) <= set("0123456789abcdef")
