"""asynccas: an asyncio-native REAPI v2 remote cache (CAS, ByteStream, ActionCache, Capabilities)."""

from asynccas.action_cache import ActionCacheStore, MemoryActionCache, SqliteActionCache
from asynccas.digest import Digest, DigestFunction
from asynccas.errors import (
    BackendUnavailable,
    BlobNotFound,
    CasError,
    DigestMismatch,
    InvalidArgument,
    InvalidDigest,
    NotFound,
    StorageFull,
)
from asynccas.index.base import StorageIndex
from asynccas.index.sqlite import SqliteIndex
from asynccas.server.app import CasServer
from asynccas.storage.base import BlobWriter, Storage
from asynccas.storage.disk import DiskStorage
from asynccas.storage.memory import MemoryStorage

__all__ = [
    "ActionCacheStore",
    "BackendUnavailable",
    "BlobNotFound",
    "BlobWriter",
    "CasError",
    "CasServer",
    "Digest",
    "DigestFunction",
    "DigestMismatch",
    "DiskStorage",
    "InvalidArgument",
    "InvalidDigest",
    "MemoryActionCache",
    "MemoryStorage",
    "NotFound",
    "SqliteActionCache",
    "SqliteIndex",
    "Storage",
    "StorageFull",
    "StorageIndex",
]
