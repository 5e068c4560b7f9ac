"""The one value type for blob addresses: a digest function, a hash and a size, validated on construction.

Nothing below the service layer handles an unvalidated hash, so storage paths and
database keys derived from a ``Digest`` cannot be steered by a client.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.errors import InvalidDigest, UnsupportedFeature

if TYPE_CHECKING:
    from hashlib import _Hash

MAX_SIZE: Final = 2**63 - 1  # Digest.size_bytes is an int64 on the wire
_HEX = re.compile(r"[0-9a-f]+")


class DigestFunction(enum.Enum):
    """The digest functions asynccas supports, with REAPI's enum value and hex length.

    Each has a distinct hex length, which is how REAPI lets a server infer the
    function when a request leaves ``digest_function`` unset.
    """

    SHA256 = (re_pb2.DigestFunction.SHA256, 64)
    SHA1 = (re_pb2.DigestFunction.SHA1, 40)
    MD5 = (re_pb2.DigestFunction.MD5, 32)
    SHA384 = (re_pb2.DigestFunction.SHA384, 96)
    SHA512 = (re_pb2.DigestFunction.SHA512, 128)

    def __init__(self, proto_value: int, hex_length: int) -> None:
        self.proto_value = proto_value
        self.hex_length = hex_length

    @property
    def lower_name(self) -> str:
        """The spelling used in resource names and storage paths, e.g. ``sha256``."""
        return self.name.lower()

    def new_hasher(self) -> _Hash:
        return hashlib.new(self.lower_name)

    @classmethod
    def from_proto(cls, value: int) -> DigestFunction:
        for function in cls:
            if function.proto_value == value:
                return function
        name = _PROTO_NAMES.get(value, str(value))
        raise UnsupportedFeature(f"digest function {name} is not supported by this server")

    @classmethod
    def from_name(cls, name: str) -> DigestFunction:
        try:
            return cls[name.upper()] if name == name.lower() else _raise_unknown(name)
        except KeyError:
            return _raise_unknown(name)

    @classmethod
    def for_hex_length(cls, length: int) -> DigestFunction:
        for function in cls:
            if function.hex_length == length:
                return function
        raise InvalidDigest(f"no supported digest function has {length}-character hashes")


_PROTO_NAMES: Final = {
    value.number: value.name
    for value in re_pb2.DESCRIPTOR.message_types_by_name["DigestFunction"].enum_types[0].values
}


def _raise_unknown(name: str) -> DigestFunction:
    if name.upper() in _PROTO_NAMES.values() and name == name.lower():
        raise UnsupportedFeature(f"digest function {name} is not supported by this server")
    raise InvalidDigest(f"unknown digest function {name!r}")


DEFAULT_FUNCTION: Final = DigestFunction.SHA256


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated blob address. Construct with keywords or the ``from_*``/``of`` helpers."""

    hash: str
    size_bytes: int
    function: DigestFunction = DEFAULT_FUNCTION

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HEX.fullmatch(self.hash):
            raise InvalidDigest(f"hash {self.hash!r} is not lower-case hexadecimal")
        if len(self.hash) != self.function.hex_length:
            raise InvalidDigest(
                f"hash {self.hash!r} has {len(self.hash)} characters; "
                f"{self.function.lower_name} hashes have {self.function.hex_length}"
            )
        if type(self.size_bytes) is not int or not 0 <= self.size_bytes <= MAX_SIZE:
            raise InvalidDigest(f"size {self.size_bytes!r} is not an integer in [0, 2^63-1]")

    @classmethod
    def of(cls, data: bytes, function: DigestFunction = DEFAULT_FUNCTION) -> Digest:
        """The digest of ``data``."""
        hasher = function.new_hasher()
        hasher.update(data)
        return cls(hasher.hexdigest(), len(data), function)

    @classmethod
    def empty(cls, function: DigestFunction = DEFAULT_FUNCTION) -> Digest:
        return cls.of(b"", function)

    @classmethod
    def from_proto(cls, message: re_pb2.Digest, function_value: int = 0) -> Digest:
        """Validate a wire digest; an unset ``function_value`` is inferred from the hash length."""
        function = (
            DigestFunction.from_proto(function_value)
            if function_value
            else DigestFunction.for_hex_length(len(message.hash))
        )
        return cls(message.hash, message.size_bytes, function)

    @classmethod
    def parse(cls, text: str, function: DigestFunction | None = None) -> Digest:
        """Parse ``HASH/SIZE`` (the form used on command lines and in logs)."""
        hash_, sep, size = text.partition("/")
        if not sep or not size.isdigit() or not size.isascii():
            raise InvalidDigest(f"{text!r} is not of the form HASH/SIZE")
        return cls(hash_, int(size), function or DigestFunction.for_hex_length(len(hash_)))

    @classmethod
    def from_key(cls, key: str) -> Digest:
        """Inverse of ``key``."""
        name, hash_, size = key.split(":")
        return cls(hash_, int(size), DigestFunction.from_name(name))

    @property
    def key(self) -> str:
        """A unique, path- and key-safe string, e.g. ``sha256:ab12...:42``."""
        return f"{self.function.lower_name}:{self.hash}:{self.size_bytes}"

    @property
    def is_empty(self) -> bool:
        return self.size_bytes == 0 and self.hash == _EMPTY_HASHES[self.function]

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size_bytes)

    def __str__(self) -> str:
        return f"{self.hash}/{self.size_bytes}"


_EMPTY_HASHES: Final = {f: f.new_hasher().hexdigest() for f in DigestFunction}
