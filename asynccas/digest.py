"""The one value type for blob addresses: a digest function, a hash and a size, validated on construction.

Nothing below the service layer handles an unvalidated hash, so storage paths and
database keys derived from a ``Digest`` cannot be steered by a client.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import blake3
from google.protobuf.message import DecodeError

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.errors import InvalidDigest, UnsupportedFeature
from asynccas.wire import varint
from asynccas.wire.digests import (
    SizeOffset,
    delimited_digest,
    is_hash_column,
    sizes_of_delimited,
)

if TYPE_CHECKING:
    from hashlib import _Hash

MAX_SIZE: Final = 2**63 - 1  # Digest.size_bytes is an int64 on the wire
_HEX = re.compile(r"[0-9a-f]+")


class DigestFunction(enum.Enum):
    """The digest functions asynccas supports, with REAPI's enum value and hex length.

    The legacy functions (SHA256, SHA1, MD5, SHA384, SHA512) each have a distinct hex length,
    which is how REAPI lets a server infer one when a request leaves ``digest_function`` unset
    and a resource name has no function segment. Newer ones (BLAKE3) share a length with a
    legacy function, so requests must name them, and a blob's identity (keys, paths, index
    members) always includes its function: a BLAKE3 and a SHA256 digest with the same 64 hex
    characters are different blobs.
    """

    SHA256 = (re_pb2.DigestFunction.SHA256, 64)
    SHA1 = (re_pb2.DigestFunction.SHA1, 40)
    MD5 = (re_pb2.DigestFunction.MD5, 32)
    SHA384 = (re_pb2.DigestFunction.SHA384, 96)
    SHA512 = (re_pb2.DigestFunction.SHA512, 128)
    BLAKE3 = (re_pb2.DigestFunction.BLAKE3, 64)

    lower_name: str
    """The spelling used in resource names and storage paths, e.g. ``sha256``."""
    new_hasher: Callable[[], _Hash]
    """A fresh hash object (hashlib's own constructor: ``hashlib.new`` costs more per blob)."""

    def __init__(self, proto_value: int, hex_length: int) -> None:
        self.proto_value = proto_value
        self.hex_length = hex_length

    @property
    def is_legacy(self) -> bool:
        """Whether REAPI infers this function from a hash's length (no segment, no field)."""
        return self in LEGACY_FUNCTIONS

    @classmethod
    def from_proto(cls, value: int) -> DigestFunction:
        function = _BY_PROTO.get(value)
        if function is None:
            name = _PROTO_NAMES.get(value, str(value))
            raise UnsupportedFeature(f"digest function {name} is not supported by this server")
        return function

    @classmethod
    def from_name(cls, name: str) -> DigestFunction:
        try:
            return cls[name.upper()] if name == name.lower() else _raise_unknown(name)
        except KeyError:
            return _raise_unknown(name)

    @classmethod
    def for_hex_length(cls, length: int) -> DigestFunction:
        """The legacy function with hashes of ``length`` characters."""
        function = _BY_LENGTH.get(length)
        if function is None:
            raise InvalidDigest(f"no supported digest function has {length}-character hashes")
        return function


for _function in DigestFunction:
    _function.lower_name = _function.name.lower()
    _function.new_hasher = getattr(hashlib, _function.lower_name, None)  # type: ignore[assignment]
DigestFunction.BLAKE3.new_hasher = blake3.blake3  # type: ignore[assignment]  # hashlib's API
LEGACY_FUNCTIONS: Final = frozenset(f for f in DigestFunction if f is not DigestFunction.BLAKE3)
_BY_PROTO: Final = {f.proto_value: f for f in DigestFunction}
_BY_LENGTH: Final = {f.hex_length: f for f in LEGACY_FUNCTIONS}


_PROTO_NAMES: Final = {
    value.number: value.name
    for value in re_pb2.DESCRIPTOR.message_types_by_name["DigestFunction"].enum_types[0].values
}


def _raise_unknown(name: str) -> DigestFunction:
    if name.upper() in _PROTO_NAMES.values() and name == name.lower():
        raise UnsupportedFeature(f"digest function {name} is not supported by this server")
    raise InvalidDigest(f"unknown digest function {name!r}")


DEFAULT_FUNCTION: Final = DigestFunction.SHA256


class Digest(tuple[str, int, DigestFunction, str]):
    """A validated blob address: ``Digest(hash, size_bytes, function=SHA256)``.

    Immutable and hashable. A tuple underneath, so building one is a single C call:
    large requests build thousands. Equality and hashing go through ``key``, whose
    hash Python caches.
    """

    __slots__ = ()

    def __new__(
        cls, hash: str, size_bytes: int, function: DigestFunction = DEFAULT_FUNCTION
    ) -> Digest:
        if not isinstance(hash, str) or not _HEX.fullmatch(hash):
            raise InvalidDigest(f"hash {hash!r} is not lower-case hexadecimal")
        if len(hash) != function.hex_length:
            raise InvalidDigest(
                f"hash {hash!r} has {len(hash)} characters; "
                f"{function.lower_name} hashes have {function.hex_length}"
            )
        if type(size_bytes) is not int or not 0 <= size_bytes <= MAX_SIZE:
            raise InvalidDigest(f"size {size_bytes!r} is not an integer in [0, 2^63-1]")
        return cls._trusted(hash, size_bytes, function)

    @classmethod
    def _trusted(cls, hash: str, size_bytes: int, function: DigestFunction) -> Digest:
        """Build without checks: only for values already validated (``DigestBatch``)."""
        key = f"{function.lower_name}:{hash}:{size_bytes}"
        return tuple.__new__(cls, (hash, size_bytes, function, key))

    @property
    def hash(self) -> str:
        return self[0]

    @property
    def size_bytes(self) -> int:
        return self[1]

    @property
    def function(self) -> DigestFunction:
        return self[2]

    @property
    def key(self) -> str:
        """A unique, path- and key-safe string, e.g. ``sha256:ab12...:42``."""
        return self[3]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self[3] == other[3]

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self[3] != other[3]

    def __hash__(self) -> int:
        return hash_of(self[3])

    def __repr__(self) -> str:
        return f"Digest({self[0]!r}, {self[1]}, DigestFunction.{self[2].name})"

    def __getnewargs__(self) -> tuple[str, int, DigestFunction]:
        return (self[0], self[1], self[2])

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
    def is_empty(self) -> bool:
        return self.size_bytes == 0 and self.hash == _EMPTY_HASHES[self.function]

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size_bytes)

    @property
    def delimited(self) -> bytes:
        """The digest as a request carries it: its ``Digest`` message as protobuf writes it (the
        hash, then the size unless 0), after the message's length as a varint. Two functions
        with hashes of one length (SHA256, BLAKE3) share this form: see ``member``."""
        return delimited_digest(self[0], self[1])

    @property
    def member(self) -> bytes:
        """The digest as an index stores it (``RedisIndex``): ``delimited``, after a prefix
        naming the function for the functions that are not legacy ones. A legacy digest is
        just its ``delimited`` form, so a FindMissingBlobs request's own bytes are looked up
        without being decoded, and indexes written before BLAKE3 stay valid as they are."""
        return _MEMBER_PREFIXES.get(self[2], b"") + delimited_digest(self[0], self[1])

    @classmethod
    def from_member(cls, data: bytes) -> Digest:
        """Inverse of ``member``; only the exact bytes ``member`` writes are accepted."""
        function = None
        if data[:1] == b"\x00":  # a delimited Digest starts with its length, never 0
            name, separator, data = data[1:].partition(b"\x00")
            if not separator:
                raise InvalidDigest(f"{data!r} is not an index member")
            function = DigestFunction.from_name(name.decode("ascii", "replace"))
        length, start = varint.decode(data, 0, 2)
        if length is None or start + length != len(data):
            raise InvalidDigest(f"{data!r} is not a length-delimited Digest")
        try:
            message = re_pb2.Digest.FromString(data[start:])
        except DecodeError:
            raise InvalidDigest(f"{data!r} is not a length-delimited Digest") from None
        digest = cls(
            message.hash,
            message.size_bytes,
            function or DigestFunction.for_hex_length(len(message.hash)),
        )
        if digest.delimited != data:
            raise InvalidDigest(f"{data!r} is not a Digest as protobuf writes it")
        return digest

    def __str__(self) -> str:
        return f"{self.hash}/{self.size_bytes}"


hash_of = hash  # the builtin, which the parameter named `hash` shadows inside methods


_MEMBER_PREFIXES: Final = {
    f: b"\x00" + f.lower_name.encode() + b"\x00" for f in DigestFunction if not f.is_legacy
}
_EMPTY_HASHES: Final = {f: f.new_hasher().hexdigest() for f in DigestFunction}
_EMPTY_DELIMITED: Final = {f: delimited_digest(h, 0) for f, h in _EMPTY_HASHES.items()}


_SIZES_AFTER: Final = {f: SizeOffset(f.hex_length) for f in DigestFunction}


class DigestBatch:
    """The digests of one request, of one digest function, held as columns.

    Large requests (a FindMissingBlobs of thousands of digests) are validated in a few C-level
    passes over all hashes at once, and a backend that can answer from the columns never has
    ``Digest`` objects built: ``digests`` makes them only when first asked for.
    """

    __slots__ = ("_delimited", "_digests", "_hashes", "_hashes_text", "_sizes", "function")

    def __init__(
        self,
        function: DigestFunction,
        hashes: list[str],
        sizes: list[int],
        hashes_text: str | None = None,
    ) -> None:
        """Trusted: callers pass values already validated (``from_protos``, ``of``)."""
        self.function = function
        self._hashes: list[str] | None = hashes
        self._sizes: list[int] | None = sizes
        self._hashes_text = hashes_text
        self._delimited: list[bytes] | None = None
        self._digests: list[Digest] | None = None

    @classmethod
    def of_delimited(
        cls, function: DigestFunction, delimited: list[bytes], hashes_text: str
    ) -> DigestBatch:
        """Trusted, like the constructor: digests in their ``Digest.delimited`` form, each as
        protobuf writes it, and ``hashes_text`` their hashes, validated. The other columns are
        derived when first asked for: an index keyed by this form never needs them.
        """
        batch = cls(function, [], [], hashes_text)
        batch._hashes = batch._sizes = None
        batch._delimited = delimited
        return batch

    @classmethod
    def of(cls, function: DigestFunction, digests: Sequence[Digest]) -> DigestBatch:
        """A batch of digests already validated, all of ``function``."""
        batch = cls(function, [d[0] for d in digests], [d[1] for d in digests])
        batch._digests = list(digests)
        return batch

    @classmethod
    def from_protos(cls, messages: Sequence[re_pb2.Digest], function_value: int = 0) -> DigestBatch:
        """Validate a request's digests; an unset ``function_value`` is inferred from the hashes.

        REAPI requires one digest function per request, so the common case is checked in bulk;
        anything unusual goes one digest at a time, for the precise error message.
        """
        function = DigestFunction.from_proto(function_value) if function_value else None
        if not messages:
            return cls(function or DEFAULT_FUNCTION, [], [])
        hashes = [m.hash for m in messages]
        sizes = [m.size_bytes for m in messages]
        function = function or _BY_LENGTH.get(len(hashes[0]))
        if function is not None and min(sizes) >= 0:
            text = "\n".join(hashes)
            if is_hash_column(text, len(hashes), function.hex_length):
                return cls(function, hashes, sizes, text)
        digests = [Digest.from_proto(m, function_value) for m in messages]  # raises the error
        functions = {d.function for d in digests}
        if len(functions) > 1:
            names = " and ".join(sorted(f.lower_name for f in functions))
            raise InvalidDigest(
                f"a request's digests must all use one digest function, not {names}"
            )
        return cls.of(digests[0].function, digests)

    def __len__(self) -> int:
        return len(self._delimited) if self._delimited is not None else len(self.hashes)

    @property
    def hashes(self) -> list[str]:
        if self._hashes is None:
            self._hashes = self.hashes_text.split("\n") if len(self) else []
        return self._hashes

    @property
    def sizes(self) -> list[int]:
        if self._sizes is None:
            assert self._delimited is not None
            self._sizes = sizes_of_delimited(_SIZES_AFTER[self.function], self._delimited)
        return self._sizes

    @property
    def delimited(self) -> list[bytes]:
        """Each digest's ``Digest.delimited`` form."""
        if self._delimited is None:
            self._delimited = list(map(delimited_digest, self.hashes, self.sizes))
        return self._delimited

    @property
    def members(self) -> list[bytes]:
        """Each digest's ``Digest.member`` form: for a legacy function, ``delimited`` itself."""
        prefix = _MEMBER_PREFIXES.get(self.function)
        if prefix is None:
            return self.delimited
        return [prefix + each for each in self.delimited]

    @property
    def hashes_text(self) -> str:
        """The hashes joined by newlines: one string for a backend to send on."""
        if self._hashes_text is None:
            self._hashes_text = "\n".join(self.hashes)
        return self._hashes_text

    @property
    def digests(self) -> list[Digest]:
        if self._digests is None:
            new, function, name = tuple.__new__, self.function, self.function.lower_name
            self._digests = [  # Digest._trusted, inlined: thousands per request
                new(Digest, (h, n, function, f"{name}:{h}:{n}"))
                for h, n in zip(self.hashes, self.sizes, strict=True)
            ]
        return self._digests

    def unique(self) -> tuple[DigestBatch, list[int]] | None:
        """None when no digest repeats; else the distinct digests and where each first appears."""
        # The common case, checked in C, on whichever column is at hand.
        column = self.hashes if self._delimited is None else self._delimited
        if len(set(column)) == len(column):
            return None
        first: dict[tuple[str, int], int] = {}
        for position, pair in enumerate(zip(self.hashes, self.sizes, strict=True)):
            first.setdefault(pair, position)
        if len(first) == len(self.hashes):  # one hash with several sizes
            return None
        distinct = DigestBatch(self.function, [h for h, _ in first], [n for _, n in first])
        return distinct, list(first.values())

    def empty_positions(self) -> list[int]:
        """Where the batch holds the empty blob, which REAPI says always exists."""
        if self._delimited is not None:
            empty_blob = _EMPTY_DELIMITED[self.function]
            if empty_blob not in self._delimited:  # a C-level scan
                return []
            return [i for i, d in enumerate(self._delimited) if d == empty_blob]
        if 0 not in self.sizes:
            return []
        empty = _EMPTY_HASHES[self.function]
        return [
            i
            for i, (h, n) in enumerate(zip(self.hashes, self.sizes, strict=True))
            if n == 0 and h == empty
        ]
