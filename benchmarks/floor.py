"""The floor of a grpc.aio server on this machine: ByteStream handlers that do no work behind a
real Capabilities service, on uvloop, with asynccas's transport settings. Write counts the
bytes it receives (and keeps blobs of up to 64 KiB in a dict, so that there is something to
read); Read answers from that dict. Whatever a real server does per message comes on top of
this; ``bazel-traffic`` measures it beside the others.

With ``--keep-all`` it is the least a cache Bazel can build against must do: every blob is kept
in a dict (nothing hashed or checked), FindMissingBlobs answers from it, and the action cache
is a dict too. ``bazel-build`` times Bazel against it, as the floor of a build's remote part.

With ``--durable DIR`` Write does the least a cache that loses nothing it acknowledged must do
for each blob, and nothing more: check the data's SHA-256 against the resource name, write it
to a new file, fsync it and link it into place, in one worker-thread hop at the end of the
stream (no index, no upload sessions, no limits); ``--no-fsync`` leaves out the fsync, as
asynccas's ``--no-fsync`` does. ``bazel-traffic`` measures the writes on it, so that the cost of
the work itself is told apart from what asynccas adds to it.

Run as ``python -m benchmarks.floor PORT [--keep-all | --durable DIR [--no-fsync]]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from itertools import count
from pathlib import Path
from typing import Any

import grpc
import uvloop

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.server.capabilities import CapabilitiesService
from asynccas.transport import TRANSPORT_OPTIONS

Context = grpc.aio.ServicerContext[Any, Any]


_KEPT_UP_TO = 64 * 1024
_READ_CHUNK = 1024 * 1024


def _blob_key(resource_name: str) -> str:
    """``.../blobs/HASH/SIZE``: the last two segments, whatever comes before them."""
    return "/".join(resource_name.rsplit("/", 2)[-2:])


class CountingByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, keep_up_to: int = _KEPT_UP_TO) -> None:
        self.small_blobs: dict[str, bytes] = {}
        self.keep_up_to = keep_up_to

    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        received = 0
        name = ""
        parts: list[bytes] = []
        async for request in request_iterator:
            name = name or request.resource_name
            received += len(request.data)
            if received <= self.keep_up_to:
                parts.append(request.data)
        if received <= self.keep_up_to:
            self.small_blobs[_blob_key(name)] = b"".join(parts)
        return bs_pb2.WriteResponse(committed_size=received)

    async def Read(
        self, request: bs_pb2.ReadRequest, context: Context
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        data = self.small_blobs.get(_blob_key(request.resource_name))
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "the floor server keeps small blobs")
        for start in range(0, len(data), _READ_CHUNK):
            yield bs_pb2.ReadResponse(data=data[start : start + _READ_CHUNK])

    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Context
    ) -> bs_pb2.QueryWriteStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor server keeps nothing")
        raise AssertionError("abort returned")


class DurableByteStream(CountingByteStream):
    """Write as a durable cache must at least: hash, write, fsync and link each blob."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        super().__init__()
        self.root = root
        self.fsync = fsync
        self.temp_names = count()
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        name = ""
        parts: list[bytes] = []
        async for request in request_iterator:
            name = name or request.resource_name
            parts.append(request.data)
        key = _blob_key(name)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._store, key, parts):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"data is not {key}")
        return bs_pb2.WriteResponse(committed_size=sum(len(part) for part in parts))

    def _store(self, key: str, parts: list[bytes]) -> bool:
        data = b"".join(parts)
        hash_, _ = key.split("/")
        if hashlib.sha256(data).hexdigest() != hash_:
            return False
        temp = self.root / "tmp" / str(next(self.temp_names))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        final = self.root / hash_[:2] / hash_
        final.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileExistsError):  # stored already: keep that copy
            os.link(temp, final)
        os.unlink(temp)
        if len(data) <= self.keep_up_to:
            self.small_blobs[key] = data
        return True


def _digest_key(digest: re_pb2.Digest) -> str:
    return f"{digest.hash}/{digest.size_bytes}"


class DictCas(re_grpc.ContentAddressableStorageServicer):
    """FindMissingBlobs against the blobs ByteStream kept; no batch RPCs (Bazel sends none)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: Context
    ) -> re_pb2.FindMissingBlobsResponse:
        missing = [d for d in request.blob_digests if _digest_key(d) not in self.blobs]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)


class DictActionCache(re_grpc.ActionCacheServicer):
    def __init__(self) -> None:
        self.results: dict[str, re_pb2.ActionResult] = {}

    async def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        result = self.results.get(_digest_key(request.action_digest))
        if result is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such action result")
        assert result is not None
        return result

    async def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        self.results[_digest_key(request.action_digest)] = request.action_result
        return request.action_result


async def serve(port: int, keep_all: bool, durable: Path | None, fsync: bool) -> None:
    server = grpc.aio.server(options=TRANSPORT_OPTIONS)
    re_grpc.add_CapabilitiesServicer_to_server(
        CapabilitiesService(max_batch_total_size_bytes=4 << 20, allow_action_cache_updates=True),
        server,
    )
    if durable is not None:
        bytestream: CountingByteStream = DurableByteStream(durable, fsync=fsync)
    else:
        bytestream = CountingByteStream(keep_up_to=1 << 62 if keep_all else _KEPT_UP_TO)
    bs_grpc.add_ByteStreamServicer_to_server(bytestream, server)
    if keep_all:
        # Only what Bazel sends is implemented; grpc answers the rest UNIMPLEMENTED.
        cas = DictCas(bytestream.small_blobs)  # type: ignore[abstract]
        re_grpc.add_ContentAddressableStorageServicer_to_server(cas, server)
        re_grpc.add_ActionCacheServicer_to_server(DictActionCache(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    options = sys.argv[2:]
    durable_root = Path(options[options.index("--durable") + 1]) if "--durable" in options else None
    uvloop.run(
        serve(int(sys.argv[1]), "--keep-all" in options, durable_root, "--no-fsync" not in options)
    )
