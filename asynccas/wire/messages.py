"""The hottest RPCs read and answered as wire bytes, without building protobuf messages.

FindMissingBlobs, both ways. A build asks FindMissingBlobs about thousands of digests before
every step, so this is the server's hottest request, and message objects (one per digest, in
and out) were most of its cost. Protobuf serializers write known fields in field-number order,
as the encoding guide asks (upb does, and so does protobuf-java: all of Bazel 4.2.3's requests
took this path), which gives every digest entry a fixed shape: the tag of field 2, the
digest's length, then its ``Digest`` message. So a request is checked by one regular
expression and cut at the tags, and each piece is then the digest in its
``Digest.delimited`` form, which is what ``RedisIndex`` stores, and the answer is the
missing pieces joined by tags again: ``FindMissingBlobsResponse.missing_blob_digests`` has the
same field number (2) as ``FindMissingBlobsRequest.blob_digests``.

Anything else (other field orders, unknown fields, other digest functions, malformed bytes)
returns ``None`` and takes the ordinary protobuf path, which also words the errors.
What this module accepts, it reads exactly as protobuf would: a property test compares them.

The batch RPCs, their responses only: BatchReadBlobs's is one join of each blob's data and a
few header bytes, where a message per blob cost more than reading the blobs. Property tests
check that the bytes are those protobuf would write.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from typing import Final, TypeAlias

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import DigestBatch, DigestFunction
from asynccas.errors import CasError
from asynccas.server.errors import rpc_status
from asynccas.wire import varint
from asynccas.wire.digests import is_hash_column

# One entry of field 2: its tag (0x12), its length, then a Digest of a SHA-256 hash (field 1:
# 64 characters) and a size (field 2: a varint of at most 5 bytes, so below 32 GiB; absent
# when 0). One alternative per varint length ties the entry's length byte to what follows it.
# Varints are as protobuf writes them, shortest first: a last byte of 0 would be a longer
# spelling of a smaller number, and its delimited form would not be the one the index holds.
_TAG: Final = b"\x12"
_ENTRIES: Final = re.compile(
    b"(?:\x12(?:"
    b"\x42\x0a\x40.{64}|"
    b"\x44\x0a\x40.{64}\x10[\x01-\x7f]|"
    b"\x45\x0a\x40.{64}\x10[\x80-\xff][\x01-\x7f]|"
    b"\x46\x0a\x40.{64}\x10[\x80-\xff]{2}[\x01-\x7f]|"
    b"\x47\x0a\x40.{64}\x10[\x80-\xff]{3}[\x01-\x7f]|"
    b"\x48\x0a\x40.{64}\x10[\x80-\xff]{4}[\x01-\x7f]"
    b"))*",
    re.DOTALL,
)
_HASH: Final = itemgetter(slice(3, 67))  # of a delimited digest: its length, 0x0a, 0x40, hash
# Field 3, digest_function, last: absent, UNKNOWN or SHA256.
_SHA256_TRAILERS: Final = (b"\x18\x00", b"\x18\x01")


@dataclass(frozen=True, slots=True)
class FindMissingBlobsWire:
    instance_name: str
    batch: DigestBatch
    """Made with ``DigestBatch.of_delimited``: its ``delimited`` column is the request's own."""

    @classmethod
    def parse(cls, body: bytes) -> FindMissingBlobsWire | None:
        """The request in ``body``, or ``None`` when it is not in the shape read here."""
        start, instance_name = _instance_name(body)
        if instance_name is None:
            return None
        end = len(body) - 2 if body.endswith(_SHA256_TRAILERS) else len(body)
        if end < start:  # the "trailer" lies inside the instance name
            return None
        region = body[start:end]
        if not region:
            return cls(instance_name, DigestBatch(DigestFunction.SHA256, [], []))
        if not _ENTRIES.fullmatch(region):
            return None
        delimited = _cut_at_tags(region)
        if delimited is None:
            return None
        # The hashes must be hex; this also proves the cut right (see ``_cut_at_tags``).
        hashes_text = b"\n".join(map(_HASH, delimited))
        if not is_hash_column(hashes_text, len(delimited), 64):
            return None
        batch = DigestBatch.of_delimited(
            DigestFunction.SHA256, delimited, hashes_text.decode("ascii")
        )
        return cls(instance_name, batch)

    def answer(self, missing_mask: bytes) -> bytes:
        """FindMissingBlobsResponse naming the digests flagged in ``missing_mask``."""
        missing = _TAG.join(compress(self.batch.delimited, missing_mask))
        return _TAG + missing if missing else b""


def _cut_at_tags(region: bytes) -> list[bytes] | None:
    """The delimited digests of a region of well-formed entries, cut apart at 0x12 bytes.

    0x12 is each entry's tag, and appears nowhere else but as the last byte of a size's varint,
    which then stands right before the next tag (or at the end): cutting there leaves an empty
    piece after the varint's piece, which gets its 0x12 back. A hash holding 0x12 bytes (not
    hex, so the request is rejected) leaves a piece with fewer than 64 characters where its hash
    should be, or with 0x12 among them, which the caller's hex check finds.
    """
    pieces = region.split(_TAG)  # the region starts with a tag: pieces[0] is empty
    del pieces[0]
    if b"" not in pieces:
        return pieces
    joined: list[bytes] = []
    start = 0
    while True:
        try:
            empty = pieces.index(b"", start)
        except ValueError:
            joined += pieces[start:]
            return joined
        if empty == start:  # two tags in a row: only a malformed hash does that
            return None
        joined += pieces[start : empty - 1]
        joined.append(pieces[empty - 1] + _TAG)
        start = empty + 1


def _instance_name(body: bytes) -> tuple[int, str | None]:
    """Where field 1 (instance_name) ends, and its value; ``None`` if it is malformed."""
    if not body.startswith(b"\x0a"):
        return 0, ""
    length, position = varint.decode(body, 1, 5)
    if length is None or position + length > len(body):
        return 0, None
    try:
        name = body[position : position + length].decode("utf-8")
    except UnicodeDecodeError:
        return 0, None
    return position + length, name


ReadResult: TypeAlias = tuple[re_pb2.Digest, bytes | None, CasError | None, int]
"""A digest of a BatchReadBlobs request with its data, or the error in its place, and the
``Compressor`` value the data is in (0: identity)."""
UpdateResult: TypeAlias = tuple[re_pb2.Digest, CasError | None]
"""A digest of a BatchUpdateBlobs request with its error, or None: stored."""


def encode_batch_read_response(results: Iterable[ReadResult]) -> bytes:
    """A BatchReadBlobsResponse, byte for byte what protobuf would write, built by one join:
    each blob's data is copied once, into the answer, and no message is made per blob.
    """
    pieces: list[bytes] = []
    for message, data, error, compressor in results:
        digest = message.SerializeToString()
        # Response: digest (field 1), data (field 2), status (field 3), compressor (field 4).
        if data is None or error is not None:
            data = b""
        data_head = b"\x12" + varint.encode(len(data)) if data else b""
        status = _status_field(b"\x1a", error)
        compressor_field = b"\x20" + varint.encode(compressor) if compressor else b""
        digest_head = b"\x0a" + varint.encode(len(digest))
        length = (len(digest_head) + len(digest) + len(data_head) + len(data) + len(status)
                  + len(compressor_field))  # fmt: skip
        # BatchReadBlobsResponse.responses is field 1.
        pieces += (b"\x0a", varint.encode(length), digest_head, digest, data_head, data, status,
                   compressor_field)  # fmt: skip
    return b"".join(pieces)


def encode_batch_update_response(results: Iterable[UpdateResult]) -> bytes:
    """A BatchUpdateBlobsResponse, byte for byte what protobuf would write."""
    pieces: list[bytes] = []
    for message, error in results:
        digest = message.SerializeToString()
        # Response: digest (field 1), status (field 2).
        status = _status_field(b"\x12", error)
        digest_head = b"\x0a" + varint.encode(len(digest))
        length = len(digest_head) + len(digest) + len(status)
        # BatchUpdateBlobsResponse.responses is field 1.
        pieces += (b"\x0a", varint.encode(length), digest_head, digest, status)
    return b"".join(pieces)


def _status_field(tag: bytes, error: CasError | None) -> bytes:
    """A per-blob google.rpc.Status field: empty for OK (code 0 is the default)."""
    if error is None:
        return _OK_STATUS[tag]
    encoded: bytes = rpc_status(error).SerializeToString()
    return tag + varint.encode(len(encoded)) + encoded


_OK_STATUS: Final[dict[bytes, bytes]] = {tag: tag + b"\x00" for tag in (b"\x12", b"\x1a")}
