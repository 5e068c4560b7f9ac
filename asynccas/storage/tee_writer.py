"""One upload written to several storages at once: the slow and fast stores of a cache, the
two sides of a mirror. Each writer below checks the hash itself; what happens when one fails
is the caller's rule: a ``required`` writer's failure fails the upload, any other writer is
dropped from it (logged) while at least one writer is left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from asynccas.digest import Digest
from asynccas.errors import CasError, DigestMismatch
from asynccas.storage.base import BlobWriter

logger = logging.getLogger(__name__)


class TeeWriter(BlobWriter):
    def __init__(
        self, digest: Digest, writers: Sequence[BlobWriter], *, required: BlobWriter | None = None
    ) -> None:
        super().__init__(digest)
        self._writers = list(writers)
        self._required = required

    async def _each(self, step: str) -> None:
        """Run ``step`` (a BlobWriter method) on every writer side by side, dropping those
        that fail where the rule allows."""
        writers = list(self._writers)
        outcomes = await asyncio.gather(
            *(getattr(w, step)() for w in writers), return_exceptions=True
        )
        for writer, outcome in zip(writers, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                await self._failed(writer, outcome)

    async def _failed(self, writer: BlobWriter, error: BaseException) -> None:
        if (
            not isinstance(error, CasError)
            or isinstance(error, DigestMismatch)  # wrong data is wrong everywhere
            or writer is self._required
            or len(self._writers) == 1
        ):
            raise error
        logger.warning("%s dropped from the upload of %s: %s", type(writer).__name__,
                       self.digest, error)  # fmt: skip
        self._writers.remove(writer)
        await writer.abort()

    async def write(self, data: bytes) -> None:
        # No gathering here: each writer below gathers for itself.
        if self.committed_size + len(data) > self.digest.size_bytes:
            raise DigestMismatch(
                f"received more than the {self.digest.size_bytes} bytes of digest {self.digest}"
            )
        self.committed_size += len(data)
        for writer in list(self._writers):
            try:
                await writer.write(data)
            except BaseException as exc:
                await self._failed(writer, exc)

    async def flush(self) -> None:
        await self._each("flush")

    async def verify(self) -> None:
        self.check_size()
        await self._each("verify")
        self._verified = True

    async def _write(self, parts: list[bytes]) -> None:
        raise AssertionError("write() hands data on directly")

    async def _publish(self) -> None:
        await self._each("publish")

    async def _abort(self) -> None:
        for writer in self._writers:
            await writer.abort()
