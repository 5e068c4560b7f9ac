"""Trees GetTree has already walked, kept in RAM so a repeated GetTree reads no Directory blobs.

Content is immutable, so an entry never goes stale; it can only go missing from the CAS,
which the service checks with one batched existence query before answering from here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from asynccas.digest import Digest

WalkedTree = Sequence[tuple[Digest, bytes]]  # every Directory under a root, in walk order


class TreeCache:
    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._trees: OrderedDict[Digest, WalkedTree] = OrderedDict()
        self._sizes: dict[Digest, int] = {}
        self._total = 0

    def get(self, root: Digest) -> WalkedTree | None:
        tree = self._trees.get(root)
        if tree is not None:
            self._trees.move_to_end(root)
        return tree

    def put(self, root: Digest, tree: WalkedTree) -> None:
        size = sum(len(data) + 100 for _, data in tree)  # ~100 bytes of bookkeeping each
        if size > self.max_bytes or root in self._trees:
            return
        self._trees[root] = tree
        self._sizes[root] = size
        self._total += size
        while self._total > self.max_bytes:
            evicted, _ = self._trees.popitem(last=False)
            self._total -= self._sizes.pop(evicted)

    def forget(self, root: Digest) -> None:
        if root in self._trees:
            del self._trees[root]
            self._total -= self._sizes.pop(root)
