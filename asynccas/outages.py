"""Backends going away and coming back: one log line each way, not one per failed call.

Each backend boundary (Redis, the disk, a SQLite file) reports its calls here: a failure
while the backend was working logs "went away", the first success after failures logs "is
back" with how long it was gone. Every failure is also counted in ``asynccas_backend_errors``.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from asynccas import metrics

logger = logging.getLogger(__name__)


class Outages:
    """The state of one backend, ``kind`` (redis, disk, sqlite) at ``where``."""

    __slots__ = ("down_since", "failures", "kind", "where")

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where
        self.down_since: float | None = None
        self.failures = 0

    def failed(self, error: BaseException) -> None:
        counting = metrics.active()
        if counting is not None:
            counting.backend_errors.labels(self.kind).inc()
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning("%s at %s went away: %s", self.kind, self.where, error)

    def succeeded(self) -> None:
        if self.down_since is not None:  # the only cost on the hot path: one attribute test
            gone = time.monotonic() - self.down_since
            logger.warning(
                "%s at %s is back after %.1f s (%d failed calls)",
                self.kind, self.where, gone, self.failures,
            )  # fmt: skip
            self.down_since, self.failures = None, 0


_known: Final[dict[tuple[str, str], Outages]] = {}


def outages(kind: str, where: str) -> Outages:
    """The one record for backend ``kind`` at ``where`` in this process."""
    record = _known.get((kind, where))
    if record is None:
        record = _known[kind, where] = Outages(kind, where)
    return record
