"""Trees GetTree has already walked, kept in RAM so a repeated GetTree reads no Directory blobs.

Content is immutable, so an entry never goes stale; it can only go missing from the CAS,
which the service checks with one batched existence query before answering from here.
Besides the walked Directory messages, the finished responses of a first-page request are
kept per page size: the common repeat (same client, same page size) is then sent as is.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import Digest

_OVERHEAD = 100  # rough bytes of bookkeeping per cached Directory


@dataclass
class CachedTree:
    entries: list[tuple[Digest, bytes]]  # every Directory under the root, in walk order
    marker: int | None  # the storage's deletion marker when every entry was last seen present
    pages: dict[int, list[re_pb2.GetTreeResponse]] = field(default_factory=dict)
    size: int = 0


class GetTreeCache:
    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._trees: OrderedDict[Digest, CachedTree] = OrderedDict()
        self._total = 0

    def get(self, root: Digest) -> CachedTree | None:
        tree = self._trees.get(root)
        if tree is not None:
            self._trees.move_to_end(root)
        return tree

    def put(self, root: Digest, entries: list[tuple[Digest, bytes]], marker: int | None) -> None:
        size = sum(len(data) + _OVERHEAD for _, data in entries)
        if size > self.max_bytes or root in self._trees:
            return
        self._trees[root] = CachedTree(entries, marker, size=size)
        self._grow(size)

    def add_pages(self, root: Digest, page_size: int, pages: list[re_pb2.GetTreeResponse]) -> None:
        tree = self._trees.get(root)
        if tree is None or page_size in tree.pages:
            return
        size = sum(page.ByteSize() for page in pages) + _OVERHEAD * len(tree.entries)
        tree.pages[page_size] = pages
        tree.size += size
        self._grow(size)

    def forget(self, root: Digest) -> None:
        tree = self._trees.pop(root, None)
        if tree is not None:
            self._total -= tree.size

    def _grow(self, size: int) -> None:
        self._total += size
        while self._total > self.max_bytes and self._trees:
            _, evicted = self._trees.popitem(last=False)
            self._total -= evicted.size
