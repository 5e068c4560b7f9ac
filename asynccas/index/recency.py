"""Recency kept to an interval: an index refreshes a blob's last use at most once per interval,
so a hot blob is not rewritten on every hit, and each process remembers what it refreshed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import compress
from operator import not_


def recency_window(now: float, interval: float) -> float:
    """The start of the interval ``now`` falls in: the score a refresh writes. Scores only rise
    (an upload writes its exact time), so within one window a refresh changes an entry once."""
    return math.floor(now / interval) * interval if interval > 0 else now


class TouchedThisInterval:
    """The index entries this process has raised to the current window's score, by name (a
    hash or a delimited digest).

    Their score is at least that window's start until they are deleted (refreshes never lower
    a score, and a re-upload writes the present time), so refreshing them again before the
    window ends would change nothing. Bounded: when full it forgets, which only costs
    refreshes that would have changed nothing.
    """

    def __init__(self, limit: int = 1 << 17) -> None:
        self._limit = limit
        self._window: float | None = None
        self._names: set[str | bytes] = set()

    def untouched(self, window: float, names: Sequence[str | bytes]) -> list[int] | None:
        """Positions of the ``names`` not yet touched in ``window``; ``None`` for all."""
        if window != self._window or not self._names:
            return None
        if self._names.issuperset(names):  # the steady state, answered in C without a list
            return []
        return list(compress(range(len(names)), map(not_, map(self._names.__contains__, names))))

    def add(self, window: float, names: Sequence[str | bytes]) -> None:
        if window != self._window:
            self._names.clear()
            self._window = window
        if len(self._names) + len(names) > self._limit:
            self._names.clear()
        self._names.update(names)
