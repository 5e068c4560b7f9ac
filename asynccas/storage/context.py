"""The request context every storage call carries: who asks, for which instance, with which
digest function, and until when (bb-storage's ``context.Context`` plus its instance name).

Backends that keep one namespace ignore the instance; wrappers use what they need: an
authorizing or per-instance wrapper the instance and identity, a remote one the deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from asynccas.digest import DEFAULT_FUNCTION, DigestFunction

if TYPE_CHECKING:
    from asynccas.auth import Identity


@dataclass(frozen=True, slots=True)
class RequestContext:
    instance_name: str = ""
    digest_function: DigestFunction = DEFAULT_FUNCTION
    deadline: float | None = None
    """``time.monotonic()`` value after which the caller no longer waits; None: no deadline."""
    identity: Identity | None = None
    """The authenticated caller; None where nothing is checked (a library call, no auth)."""

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def bounded(self, seconds: float) -> float:
        """``seconds``, or less if the deadline comes first: how long a wait may last."""
        remaining = self.time_remaining()
        return seconds if remaining is None else min(seconds, remaining)

    def detached(self) -> RequestContext:
        """This context for work that outlives the request (a shared fill, a background
        copy): the same caller and instance, no deadline."""
        return RequestContext(self.instance_name, self.digest_function, None, self.identity)


NO_CONTEXT: Final = RequestContext()
"""For calls made outside any request: background work, tools, library users' own calls."""
