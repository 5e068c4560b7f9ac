"""Who is calling, and what they may do: bearer tokens and JWTs mapped to per-instance rights.

A caller presents ``authorization: Bearer <token>`` (Bazel: ``--remote_header=Authorization=
Bearer ...``). The token is either listed, by its SHA-256, in a tokens file, or a JWT signed by
a key of a JWKS file. Either way it maps to an ``Identity``: a name for logs and the instance
names it may read and write. Rights are instance-name patterns: ``""`` (the default instance),
``"team/ci"``, ``"team/*"`` (anything under ``team/``) or ``"*"`` (every instance). A right to
write includes the right to read: a client uploads what FindMissingBlobs calls missing.

Both files are re-read by ``AccessPolicy.watch`` when they change, so that tokens can be added
and revoked without a restart; a file that turns unreadable or invalid keeps the last good
version in force, and says so in the log.

The tokens file is TOML; it holds no token, only each one's SHA-256
(``asynccas token hash`` prints it)::

    [[token]]
    name = "ci"                        # who: for the access log and error messages
    sha256 = "9f86d081884c7d65..."     # hex SHA-256 of the token
    write = ["*"]                      # instance patterns it may write (and so read)

    [[token]]
    name = "developers"
    sha256 = "60303ae22b998861..."
    read = ["*"]

A JWT's rights are in its ``asynccas`` claim: ``{"read": [...], "write": [...]}``, with its
``sub`` as the name; ``iss``, ``aud`` and ``exp`` are checked when configured and present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final

import anyio

from asynccas.errors import PermissionDenied, Unauthenticated
from asynccas.threads import in_thread

logger = logging.getLogger(__name__)

RELOAD_INTERVAL: Final = 2.0
"""Seconds between checks whether a tokens or JWKS file changed."""
_JWT_CACHE_ENTRIES: Final = 10_000
"""Verified JWTs remembered, so that a client's every RPC does not re-check a signature."""


class Access(Enum):
    READ = "read"
    WRITE = "write"


def _matches(pattern: str, instance: str) -> bool:
    if pattern.endswith("*"):
        return instance.startswith(pattern[:-1])
    return pattern == instance


@dataclass(frozen=True)
class Identity:
    """A caller: ``name`` for logs, and the instance patterns it may read and write."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def may(self, access: Access, instance: str) -> bool:
        patterns = self.write if access is Access.WRITE else self.read + self.write
        return any(_matches(pattern, instance) for pattern in patterns)


EVERYONE: Final = Identity("", read=("*",), write=("*",))
"""The caller when a server checks no credentials: anyone may do anything."""
ANONYMOUS: Final = Identity("anonymous")


def token_hash(token: str) -> str:
    """What a tokens file holds for ``token``: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(name: str, read: list[str], write: list[str]) -> tuple[str, str]:
    """A fresh random token and the tokens-file entry that grants it ``read`` and ``write``."""
    token = secrets.token_urlsafe(32)
    entry = "\n".join(
        [
            "[[token]]",
            f"name = {json.dumps(name)}",
            f'sha256 = "{token_hash(token)}"',
            *([f"read = {json.dumps(read)}"] if read else []),
            *([f"write = {json.dumps(write)}"] if write else []),
        ]
    )
    return token, "\n" + entry + "\n"  # a blank line apart from the entry before


def _patterns(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: {key} must be a list of instance names or patterns")
    return tuple(value)


class TokenFile:
    """A TOML file of hashed bearer tokens and the rights of each (see the module's help)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, Identity] = {}
        self._version: tuple[int, int] | None = None

    def load(self) -> None:
        """Read the file (blocking: at start-up, or in a thread); raises ValueError if it is
        not a valid tokens file."""
        stat = os.stat(self.path)
        with open(self.path, "rb") as file:
            try:
                document = tomllib.load(file)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{self.path} is not valid TOML: {exc}") from None
        entries = document.get("token", [])
        if not isinstance(entries, list):
            raise ValueError(f"{self.path}: expected [[token]] tables")
        by_hash: dict[str, Identity] = {}
        for number, entry in enumerate(entries, start=1):
            where = f"{self.path}, token {number}"
            digest = str(entry.get("sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where}: sha256 must be 64 hex digits (a token's SHA-256)")
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: every token needs a name")
            by_hash[digest] = Identity(
                name, _patterns(entry, "read", where), _patterns(entry, "write", where)
            )
        self._by_hash = by_hash
        self._version = (stat.st_mtime_ns, stat.st_size)

    def changed(self) -> bool:
        """Whether the file differs from the version loaded (blocking: call in a thread)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False  # gone for a moment (an editor's rename): keep what is loaded
        return (stat.st_mtime_ns, stat.st_size) != self._version

    def identify(self, token: str) -> Identity | None:
        # Looked up by hash: timing can at most tell a caller about hashes, not tokens.
        return self._by_hash.get(token_hash(token))


class JwtVerifier:
    """JWTs signed by a key of a JWKS file, with rights in their ``asynccas`` claim."""

    def __init__(
        self,
        jwks_path: Path,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        claim: str = "asynccas",
    ) -> None:
        import jwt  # only servers that verify JWTs need pyjwt's cryptography

        self._jwt = jwt
        self.path = jwks_path
        self.issuer = issuer
        self.audience = audience
        self.claim = claim
        self._keys: dict[str | None, Any] = {}
        self._version: tuple[int, int] | None = None
        self._verified: dict[str, tuple[Identity, float]] = {}

    def load(self) -> None:
        stat = os.stat(self.path)
        try:
            keys = self._jwt.PyJWKSet.from_json(self.path.read_text()).keys
        except (self._jwt.PyJWKSetError, self._jwt.InvalidKeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path} is not a usable JWKS file: {exc}") from None
        by_id: dict[str | None, Any] = {key.key_id: key for key in keys}
        if len(keys) == 1:
            by_id[None] = keys[0]  # a token without "kid" is meant for the only key
        self._keys = by_id
        self._verified.clear()
        self._version = (stat.st_mtime_ns, stat.st_size)

    def changed(self) -> bool:
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_mtime_ns, stat.st_size) != self._version

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        return token.count(".") == 2

    def identify(self, token: str, now: float) -> Identity:
        """The token's identity; raises Unauthenticated saying why it does not verify."""
        cached = self._verified.get(token)
        if cached is not None and (cached[1] == 0 or now < cached[1]):
            return cached[0]
        jwt = self._jwt
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys.get(kid)
            if key is None:
                raise Unauthenticated(f"the token's signing key {kid!r} is not a trusted key")
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token does not verify: {exc}") from None
        rights = claims.get(self.claim, {})
        where = f"the token's {self.claim!r} claim"
        if not isinstance(rights, dict):
            raise Unauthenticated(f"{where} must be an object with read and write lists")
        try:
            identity = Identity(
                str(claims.get("sub") or "jwt"),
                _patterns(rights, "read", where),
                _patterns(rights, "write", where),
            )
        except ValueError as exc:
            raise Unauthenticated(str(exc)) from None
        if len(self._verified) >= _JWT_CACHE_ENTRIES:
            self._verified.clear()
        self._verified[token] = (identity, float(claims["exp"]))
        return identity


class AccessPolicy:
    """Turns a call's metadata into an ``Identity`` and decides what it may do.

    ``anonymous_reads``: callers without a token may read every instance (but not write).
    """

    def __init__(
        self,
        *,
        tokens: TokenFile | None = None,
        jwt: JwtVerifier | None = None,
        anonymous_reads: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tokens = tokens
        self.jwt = jwt
        self.anonymous = Identity("anonymous", read=("*",)) if anonymous_reads else ANONYMOUS
        self._clock = clock

    def load(self) -> None:
        """Read the files (blocking: once, at start-up); raises ValueError for a bad one."""
        for source in self._sources():
            source.load()

    def _sources(self) -> list[TokenFile | JwtVerifier]:
        return [source for source in (self.tokens, self.jwt) if source is not None]

    async def watch(self) -> None:
        """Re-read a file when it changes, for as long as the server runs."""
        while True:
            await anyio.sleep(RELOAD_INTERVAL)
            for source in self._sources():
                try:
                    if await in_thread(source.changed):
                        await in_thread(source.load)
                        logger.info("reloaded %s", source.path)
                except (OSError, ValueError) as exc:
                    logger.error("kept the previous version of %s: %s", source.path, exc)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
        token = _bearer_token(metadata or ())
        if token is None:
            return self.anonymous
        if self.jwt is not None and JwtVerifier.looks_like_jwt(token):
            return self.jwt.identify(token, self._clock())
        found = self.tokens.identify(token) if self.tokens is not None else None
        if found is None:
            raise Unauthenticated("the bearer token is not one this server knows")
        return found

    def authorize(self, identity: Identity, access: Access, instance: str) -> None:
        if identity.may(access, instance):
            return
        what = f"{access.value} instance {instance!r}" if instance else f"{access.value}"
        if identity.name == "anonymous":
            raise Unauthenticated(
                f"this server needs a bearer token to {what}"
                " (Bazel: --remote_header=Authorization=Bearer TOKEN)"
            )
        raise PermissionDenied(f"{identity.name!r} may not {what}")


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header is not 'Bearer TOKEN'")
            return token.strip()
    return None
