"""A least-recently-used map bounded by the total size of its values (``len`` of each): blobs
by bytes in the memory storage and the read cache, chunk lists by chunks in SplitBlob's cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sized
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Sized)


class SizedLru(Generic[K, V]):
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.entries: OrderedDict[K, V] = OrderedDict()
        self.total = 0
        self.removals = 0  # dropped for room or popped: what a deletion marker counts

    def __contains__(self, key: K) -> bool:
        return key in self.entries

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def add(self, key: K, value: V) -> None:
        """Keep ``value`` as the most recently used, dropping the least recently used beyond
        the bound; a value larger than the whole bound is not kept (it would empty the map)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if len(value) > self.max_size:
            return
        self.entries[key] = value
        self.total += len(value)
        while self.total > self.max_size:
            _, dropped = self.entries.popitem(last=False)
            self.total -= len(dropped)
            self.removals += 1

    def pop(self, key: K) -> V | None:
        value = self.entries.pop(key, None)
        if value is not None:
            self.total -= len(value)
            self.removals += 1
        return value
