"""asynccas: an asyncio-native REAPI v2 remote cache (CAS, ByteStream, ActionCache, Capabilities).

The names below are imported when first used, so that a program using only part of asynccas
(the client, a storage) does not load the rest: ``import asynccas.client`` loads no server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from asynccas.storage.action_cache import ActionCacheStore, MemoryActionCache, SqliteActionCache
    from asynccas.storage.base import BlobWriter, Storage
    from asynccas.storage.disk import DiskStorage
    from asynccas.storage.memory import MemoryStorage

_MODULES = {
    "ActionCacheStore": "asynccas.storage.action_cache",
    "MemoryActionCache": "asynccas.storage.action_cache",
    "SqliteActionCache": "asynccas.storage.action_cache",
    "Digest": "asynccas.digest",
    "DigestFunction": "asynccas.digest",
    "BackendUnavailable": "asynccas.errors",
    "BlobNotFound": "asynccas.errors",
    "CasError": "asynccas.errors",
    "DigestMismatch": "asynccas.errors",
    "InvalidArgument": "asynccas.errors",
    "InvalidDigest": "asynccas.errors",
    "NotFound": "asynccas.errors",
    "StorageFull": "asynccas.errors",
    "StorageIndex": "asynccas.index.base",
    "SqliteIndex": "asynccas.index.sqlite",
    "CasServer": "asynccas.server.app",
    "BlobWriter": "asynccas.storage.base",
    "Storage": "asynccas.storage.base",
    "DiskStorage": "asynccas.storage.disk",
    "MemoryStorage": "asynccas.storage.memory",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'asynccas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
