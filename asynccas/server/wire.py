"""The hottest RPCs read and answered as wire bytes, without building protobuf messages.

FindMissingBlobs, both ways. A build asks FindMissingBlobs about thousands of digests before
every step, so this is the server's hottest request, and message objects (one per digest, in and out) were most of its
cost. Protobuf serializers write known fields in field-number order, as the encoding guide
asks (upb does, and so does protobuf-java: all of Bazel 4.2.3's requests took this path), which
gives every digest entry a fixed shape. So a request is read here with a handful of C-level
passes over its bytes, and the answer reuses the request's own digest entries:
``FindMissingBlobsResponse.missing_blob_digests`` has the same field number (2) as
``FindMissingBlobsRequest.blob_digests``.

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
from typing import Final, TypeAlias, cast

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import DigestBatch, DigestFunction, is_hash_column
from asynccas.errors import CasError
from asynccas.server.errors import rpc_status

# One entry of field 2: its tag, its length, then a Digest of a SHA-256 hash (field 1: 64
# characters) and a size (field 2: a varint of at most 5 bytes, so below 32 GiB; absent when 0).
# One alternative per varint length ties the entry's length byte to what follows it.
# The bytes are decoded as Latin-1, so each character is one byte. No groups: findall then
# returns plain strings, which unlike tuples cost the garbage collector nothing.
_ENTRY: Final = re.compile(
    "\x12(?:"
    "\x42\x0a\x40.{64}|"
    "\x44\x0a\x40.{64}\x10[\x00-\x7f]|"
    "\x45\x0a\x40.{64}\x10[\x80-\xff][\x00-\x7f]|"
    "\x46\x0a\x40.{64}\x10[\x80-\xff]{2}[\x00-\x7f]|"
    "\x47\x0a\x40.{64}\x10[\x80-\xff]{3}[\x00-\x7f]|"
    "\x48\x0a\x40.{64}\x10[\x80-\xff]{4}[\x00-\x7f])",
    re.DOTALL,
)
_HASH: Final = itemgetter(slice(4, 68))
_VARINT: Final = itemgetter(slice(69, None))
# Field 3, digest_function, last: absent, UNKNOWN or SHA256.
_SHA256_TRAILERS: Final = ("\x18\x00", "\x18\x01")
_MAX_CACHED_SIZES: Final = 1 << 16

_sizes: dict[str, int] = {"": 0}  # varint text -> value; builds reuse few thousand sizes


@dataclass(frozen=True, slots=True)
class FindMissingBlobsWire:
    instance_name: str
    batch: DigestBatch
    entries: list[str]
    """Each digest's field-2 entry, as Latin-1 text, in request order."""

    @classmethod
    def parse(cls, body: bytes) -> FindMissingBlobsWire | None:
        """The request in ``body``, or ``None`` when it is not in the shape read here."""
        text = body.decode("latin-1")
        start, instance_name = _instance_name(text)
        if instance_name is None:
            return None
        end = len(text) - 2 if text.endswith(_SHA256_TRAILERS) else len(text)
        if end < start:  # the "trailer" lies inside the instance name
            return None
        region = text[start:end]
        entries = _ENTRY.findall(region)
        if not entries:
            if region:
                return None
            return cls(instance_name, DigestBatch(DigestFunction.SHA256, [], []), [])
        # The matches must tile the region: nothing skipped between them.
        if sum(map(len, entries)) != len(region):
            return None
        varints = list(map(_VARINT, entries))
        hashes = list(map(_HASH, entries))
        hashes_text = "\n".join(hashes)
        if not is_hash_column(hashes_text, len(hashes), 64):
            return None
        sizes = list(map(_sizes.get, varints))  # C-level; a miss decodes them all
        if None in sizes:
            sizes = [_size(varint) for varint in varints]
        batch = DigestBatch(DigestFunction.SHA256, hashes, cast("list[int]", sizes), hashes_text)
        return cls(instance_name, batch, entries)

    def answer(self, missing_mask: bytes) -> bytes:
        """FindMissingBlobsResponse naming the digests flagged in ``missing_mask``."""
        return "".join(compress(self.entries, missing_mask)).encode("latin-1")


def _instance_name(text: str) -> tuple[int, str | None]:
    """Where field 1 (instance_name) ends, and its value; ``None`` if it is malformed."""
    if not text.startswith("\x0a"):
        return 0, ""
    length, position = _varint(text, 1)
    if length is None or position + length > len(text):
        return 0, None
    try:
        name = text[position : position + length].encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return 0, None
    return position + length, name


def _varint(text: str, position: int) -> tuple[int | None, int]:
    value = shift = 0
    for offset in range(position, min(position + 5, len(text))):
        byte = ord(text[offset])
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset + 1
        shift += 7
    return None, position


def _size(varint: str) -> int:
    size = _sizes.get(varint)
    if size is None:
        size = 0
        for shift, character in enumerate(varint):
            size |= (ord(character) & 0x7F) << (7 * shift)
        if len(_sizes) < _MAX_CACHED_SIZES:
            _sizes[varint] = size
    return size


ReadResult: TypeAlias = tuple[re_pb2.Digest, bytes | None, CasError | None]
"""A digest of a BatchReadBlobs request with its data, or the error in its place."""
UpdateResult: TypeAlias = tuple[re_pb2.Digest, CasError | None]
"""A digest of a BatchUpdateBlobs request with its error, or None: stored."""


def encode_batch_read_response(results: Iterable[ReadResult]) -> bytes:
    """A BatchReadBlobsResponse, byte for byte what protobuf would write, built by one join:
    each blob's data is copied once, into the answer, and no message is made per blob.
    """
    pieces: list[bytes] = []
    for message, data, error in results:
        digest = message.SerializeToString()
        # Response: digest (field 1), data (field 2), status (field 3).
        if data is None or error is not None:
            data = b""
        data_head = b"\x12" + _encode_varint(len(data)) if data else b""
        status = _status_field(b"\x1a", error)
        digest_head = b"\x0a" + _encode_varint(len(digest))
        length = len(digest_head) + len(digest) + len(data_head) + len(data) + len(status)
        # BatchReadBlobsResponse.responses is field 1.
        pieces += (b"\x0a", _encode_varint(length), digest_head, digest, data_head, data, status)
    return b"".join(pieces)


def encode_batch_update_response(results: Iterable[UpdateResult]) -> bytes:
    """A BatchUpdateBlobsResponse, byte for byte what protobuf would write."""
    pieces: list[bytes] = []
    for message, error in results:
        digest = message.SerializeToString()
        # Response: digest (field 1), status (field 2).
        status = _status_field(b"\x12", error)
        digest_head = b"\x0a" + _encode_varint(len(digest))
        length = len(digest_head) + len(digest) + len(status)
        # BatchUpdateBlobsResponse.responses is field 1.
        pieces += (b"\x0a", _encode_varint(length), digest_head, digest, status)
    return b"".join(pieces)


def _status_field(tag: bytes, error: CasError | None) -> bytes:
    """A per-blob google.rpc.Status field: empty for OK (code 0 is the default)."""
    if error is None:
        return _OK_STATUS[tag]
    encoded: bytes = rpc_status(error).SerializeToString()
    return tag + _encode_varint(len(encoded)) + encoded


_OK_STATUS: Final[dict[bytes, bytes]] = {tag: tag + b"\x00" for tag in (b"\x12", b"\x1a")}


def _encode_varint(value: int) -> bytes:
    encoded = _VARINTS.get(value)
    if encoded is None:
        digits = bytearray()
        rest = value
        while rest >= 0x80:
            digits.append(rest & 0x7F | 0x80)
            rest >>= 7
        digits.append(rest)
        encoded = bytes(digits)
        if len(_VARINTS) < _MAX_CACHED_SIZES:  # lengths repeat: blob sizes, digest lengths
            _VARINTS[value] = encoded
    return encoded


_VARINTS: dict[int, bytes] = {value: bytes([value]) for value in range(0x80)}
