"""Protobuf's base-128 varints, for the few places that read or write wire bytes by hand."""

from __future__ import annotations

from typing import Final

_CACHE_LIMIT: Final = 1 << 16
_encoded: dict[int, bytes] = {value: bytes([value]) for value in range(0x80)}


def encode(value: int) -> bytes:
    """``value`` (at least 0) as protobuf writes it: the shortest form."""
    encoded = _encoded.get(value)
    if encoded is None:
        digits = bytearray()
        rest = value
        while rest >= 0x80:
            digits.append(rest & 0x7F | 0x80)
            rest >>= 7
        digits.append(rest)
        encoded = bytes(digits)
        if len(_encoded) < _CACHE_LIMIT:  # values repeat: blob sizes, message lengths
            _encoded[value] = encoded
    return encoded


def decode(data: bytes, position: int = 0, max_bytes: int = 10) -> tuple[int | None, int]:
    """The varint at ``position`` and where it ends; ``(None, position)`` if there is none
    within ``max_bytes``."""
    value = shift = 0
    for offset in range(position, min(position + max_bytes, len(data))):
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset + 1
        shift += 7
    return None, position
