"""Digests in the form requests carry them: a ``Digest`` message after its length as a varint
(``Digest.delimited``), and columns of hashes checked in bulk. Functions of plain values (hash
text, sizes, hex widths), so that ``asynccas.digest`` builds on them without a cycle."""

from __future__ import annotations

from operator import itemgetter
from typing import Final

from asynccas.wire import varint

_MAX_SIZE: Final = 2**63 - 1  # Digest.size_bytes is an int64 on the wire
_HEX_DIGITS: Final = b"0123456789abcdef"


def delimited_digest(hash: str, size_bytes: int) -> bytes:
    """``Digest.delimited`` of a hash and size already validated: the hash field, the size field
    unless 0 (as protobuf writes them), after the message's length."""
    message = b"\x0a" + varint.encode(len(hash)) + hash.encode("ascii")
    if size_bytes:
        message += b"\x10" + varint.encode(size_bytes)
    return varint.encode(len(message)) + message


class SizeOffset:
    """Where the size's varint starts in a delimited digest whose hash has ``hex_length``
    characters, as a C-level slicer."""

    def __init__(self, hex_length: int) -> None:
        hash_field = 1 + len(varint.encode(hex_length)) + hex_length
        # The message's own length takes as many bytes at any size: below 128 up to SHA-384,
        # from 128 on for SHA-512.
        shortest, longest = hash_field, hash_field + 1 + len(varint.encode(_MAX_SIZE))
        length_bytes = len(varint.encode(shortest))
        assert length_bytes == len(varint.encode(longest))
        self.offset = length_bytes + hash_field + 1
        self.slicer = itemgetter(slice(self.offset, None))


_MAX_CACHED_SIZES: Final = 1 << 16
_sizes_by_varint: dict[bytes, int] = {b"": 0}  # builds reuse a few thousand sizes


def sizes_of_delimited(offset: SizeOffset, delimited: list[bytes]) -> list[int]:
    """The sizes of delimited digests whose hashes all have the width ``offset`` was made for."""
    varints = list(map(offset.slicer, delimited))
    sizes = list(map(_sizes_by_varint.get, varints))  # C-level; a miss decodes them all
    if None not in sizes:
        return sizes  # type: ignore[return-value]
    decoded = []
    for encoded in varints:
        size = _sizes_by_varint.get(encoded)
        if size is None:
            size = varint.decode(encoded)[0] or 0
            if len(_sizes_by_varint) < _MAX_CACHED_SIZES:
                _sizes_by_varint[encoded] = size
        decoded.append(size)
    return decoded


def is_hash_column(text: str | bytes, count: int, width: int) -> bool:
    """Whether ``text`` is ``count`` lower-case hex hashes of ``width``, newline-separated.

    With the length right and a newline after every ``width`` characters, deleting the hex
    digits must leave exactly those newlines: no character can be anything else.
    """
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            return False
    if len(text) != count * (width + 1) - 1 or text[width :: width + 1] != b"\n" * (count - 1):
        return False
    return len(text.translate(None, _HEX_DIGITS)) == count - 1
