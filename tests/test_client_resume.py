"""CasClient resumes an interrupted ByteStream upload at the offset the server reports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc
import pytest

from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas.client import CasClient
from asynccas.digest import Digest
from asynccas.server.bytestream import ByteStreamService
from asynccas.server.errors import Context
from asynccas.server.uploads import UploadSessions
from asynccas.storage.base import contains
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.memory import MemoryStorage
from tests.conftest import serve_with_bytestream

pytestmark = pytest.mark.anyio


class DroppingByteStream(ByteStreamService):
    """The real ByteStream service, except that the first attempt at each upload stops after
    ``cut_after`` bytes: what arrived is kept for resumption, then the call fails UNAVAILABLE."""

    def __init__(self, *args: object, cut_after: int) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.cut_after = cut_after
        self.first_offsets: list[int] = []

    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        first = await anext(request_iterator)
        self.first_offsets.append(first.write_offset)

        async def replay(limit: int | None) -> AsyncIterator[bs_pb2.WriteRequest]:
            yield first
            received = len(first.data)
            async for request in request_iterator:
                if limit is not None and received >= limit:
                    return  # ends the stream early, as a half-close would
                yield request
                received += len(request.data)

        if len(self.first_offsets) > 1:
            return await super().Write(replay(None), context)
        await super().Write(replay(self.cut_after), context)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped (test)")
        raise AssertionError("unreachable")


async def test_upload_resumes_where_the_server_stopped(tmp_path: Path) -> None:
    storage = MemoryStorage()
    bytestream = DroppingByteStream(storage, UploadSessions(storage), cut_after=1024 * 1024)
    async with serve_with_bytestream(storage, bytestream) as port:
        source = tmp_path / "big.bin"
        # Under four average chunks (2 MiB), so that it streams whole rather than by chunks.
        data = os.urandom(2 * 1024 * 1024 - 100_000)
        await anyio.Path(source).write_bytes(data)
        async with CasClient(f"grpc://127.0.0.1:{port}", backoff=0.01) as cas:
            digest = await cas.upload_file(source)
        assert digest == Digest.of(data)
        assert await contains(storage, NO_CONTEXT, digest)
        assert len(bytestream.first_offsets) == 2
        assert bytestream.first_offsets[0] == 0
        assert bytestream.first_offsets[1] >= 1024 * 1024, "the retry resumed, not restarted"
