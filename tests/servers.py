"""Servers that several test modules start the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.memory import MemoryStorage


@asynccontextmanager
async def memory_server(**options: Any) -> AsyncIterator[CasServer]:
    """A CasServer on memory storage and a free loopback port, with ``options``."""
    async with CasServer(
        MemoryStorage(64 << 20), MemoryActionCache(), address="127.0.0.1:0", **options
    ) as server:
        yield server
