"""Parse and format ByteStream resource names for CAS blobs.

Forms (REAPI, ``remote_execution.proto``)::

    read:  {instance}/blobs/{function/}{hash}/{size}
           {instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}
    write: {instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}
           {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{function/}{hash}/{size}{/metadata}

The instance may span several segments but none may be a reserved word. The
function segment is optional and is always lower case; a hash is hex, so the
two never look alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import LEGACY_FUNCTIONS, MAX_SIZE, Digest, DigestFunction
from asynccas.errors import InvalidDigest, InvalidResourceName

RESERVED_SEGMENTS: Final = frozenset(
    {
        "blobs",
        "uploads",
        "compressed-blobs",
        "actions",
        "actionResults",
        "operations",
        "capabilities",
    }
)


def _enum_names(message: str) -> frozenset[str]:
    """Lower-case names of the ``Value`` enum nested in a REAPI message, as used in paths."""
    values = re_pb2.DESCRIPTOR.message_types_by_name[message].enum_types[0].values
    return frozenset(v.name.lower() for v in values if v.number != 0)


COMPRESSORS: Final = _enum_names("Compressor")  # identity (0) is never named in a path
_FUNCTION_NAMES: Final = _enum_names("DigestFunction")
# Functions whose segment REAPI says to omit: the server infers them from hash length.
_IMPLIED_FUNCTIONS: Final = LEGACY_FUNCTIONS
_SEGMENT = re.compile(r"[\x21-\x7e\u00a0-\U0010ffff]+")  # printable, no spaces or controls
_UUID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True, slots=True)
class BlobResource:
    """A parsed read name (``upload_id`` empty) or write name."""

    instance_name: str
    digest: Digest
    compressor: str | None = None
    upload_id: str = ""
    metadata: str = ""


MAX_INSTANCE_NAME_CHARS: Final = 1024
"""Longer instance names are refused: names are keys in every store, and REAPI servers in use
keep them short (a 1 MB name was accepted before)."""


def validate_instance_name(instance_name: str) -> str:
    """Return the name if it is usable, else raise InvalidResourceName naming the problem."""
    if instance_name == "":
        return instance_name
    _check_instance(instance_name.split("/"))
    return instance_name


def _check_instance(segments: Sequence[str]) -> None:
    length = sum(map(len, segments)) + max(len(segments) - 1, 0)
    if length > MAX_INSTANCE_NAME_CHARS:
        raise InvalidResourceName(
            f"instance name has {length} characters; at most {MAX_INSTANCE_NAME_CHARS} are accepted"
        )
    for segment in segments:
        if segment in RESERVED_SEGMENTS:
            raise InvalidResourceName(f"instance name may not contain the segment {segment!r}")
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidResourceName(f"instance name segment {segment!r} is empty or unprintable")


def parse_read_name(name: str) -> BlobResource:
    segments = _split(name)
    start = _find(segments, ("blobs", "compressed-blobs"), name)
    _check_instance(segments[:start])
    compressor, digest, rest = _parse_blob_part(segments[start:], name)
    if rest:
        raise InvalidResourceName(f"unexpected segments after the size in {name!r}")
    return BlobResource("/".join(segments[:start]), digest, compressor)


def parse_write_name(name: str) -> BlobResource:
    segments = _split(name)
    start = _find(segments, ("uploads",), name)
    _check_instance(segments[:start])
    if (
        len(segments) < start + 2
        or not _UUID.fullmatch(segments[start + 1])
        or segments[start + 1] in (".", "..")
    ):
        raise InvalidResourceName(f"missing or malformed upload id in {name!r}")
    compressor, digest, rest = _parse_blob_part(segments[start + 2 :], name)
    return BlobResource(
        "/".join(segments[:start]), digest, compressor, segments[start + 1], "/".join(rest)
    )


def format_read_name(instance_name: str, digest: Digest, compressor: str | None = None) -> str:
    return _join(instance_name, _blob_part(digest, compressor))


def format_write_name(
    instance_name: str, upload_id: str, digest: Digest, compressor: str | None = None
) -> str:
    return _join(instance_name, f"uploads/{upload_id}/{_blob_part(digest, compressor)}")


def _blob_part(digest: Digest, compressor: str | None) -> str:
    function = "" if digest.function in _IMPLIED_FUNCTIONS else f"{digest.function.lower_name}/"
    kind = f"compressed-blobs/{compressor}" if compressor else "blobs"
    return f"{kind}/{function}{digest.hash}/{digest.size_bytes}"


def _join(instance_name: str, rest: str) -> str:
    return f"{instance_name}/{rest}" if instance_name else rest


def _split(name: str) -> list[str]:
    if not isinstance(name, str) or not name:
        raise InvalidResourceName("resource name is empty")
    if "\x00" in name:
        raise InvalidResourceName("resource name contains a NUL character")
    return name.split("/")


def _find(segments: list[str], words: tuple[str, ...], name: str) -> int:
    for index, segment in enumerate(segments):
        if segment in words:
            return index
    raise InvalidResourceName(f"resource name {name!r} has no {' or '.join(words)} segment")


def _parse_blob_part(segments: list[str], name: str) -> tuple[str | None, Digest, list[str]]:
    """Parse ``blobs/...`` or ``compressed-blobs/{c}/...``; return the segments after the size."""
    if not segments or segments[0] not in ("blobs", "compressed-blobs"):
        raise InvalidResourceName(f"expected blobs or compressed-blobs in {name!r}")
    position = 1
    compressor = None
    if segments[0] == "compressed-blobs":
        if len(segments) < 2 or segments[1] not in COMPRESSORS:
            got = segments[1] if len(segments) > 1 else ""
            raise InvalidResourceName(f"unknown compressor {got!r} in {name!r}")
        compressor = segments[1]
        position = 2
    function = None
    if position < len(segments) and segments[position] in _FUNCTION_NAMES:
        function = DigestFunction.from_name(segments[position])
        position += 1
    if len(segments) < position + 2:
        raise InvalidResourceName(f"resource name {name!r} lacks a hash and size")
    hash_, size = segments[position], segments[position + 1]
    if not _SIZE.fullmatch(size) or int(size) > MAX_SIZE:
        raise InvalidResourceName(f"size {size!r} in {name!r} is not a canonical integer")
    try:
        function = function or DigestFunction.for_hex_length(len(hash_))
        digest = Digest(hash_, int(size), function)
    except InvalidDigest as exc:
        raise InvalidResourceName(f"bad digest in {name!r}: {exc}") from exc
    return compressor, digest, segments[position + 2 :]
