"""The floor of a grpc.aio server on this machine: ByteStream handlers that do no work behind a
real Capabilities service, on uvloop, with asynccas's transport settings. Write counts the
bytes it receives (and keeps blobs of up to 64 KiB in a dict, so that there is something to
read); Read answers from that dict. Whatever a real server does per message comes on top of
this; ``bazel-traffic`` measures it beside the others.

Run as ``python -m benchmarks.floor PORT``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.server.capabilities import CapabilitiesService
from asynccas.transport import TRANSPORT_OPTIONS

Context = grpc.aio.ServicerContext[Any, Any]


_KEPT_UP_TO = 64 * 1024


def _blob_key(resource_name: str) -> str:
    """``.../blobs/HASH/SIZE``: the last two segments, whatever comes before them."""
    return "/".join(resource_name.rsplit("/", 2)[-2:])


class CountingByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self) -> None:
        self.small_blobs: dict[str, bytes] = {}

    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        received = 0
        name = ""
        parts: list[bytes] = []
        async for request in request_iterator:
            name = name or request.resource_name
            received += len(request.data)
            if received <= _KEPT_UP_TO:
                parts.append(request.data)
        if received <= _KEPT_UP_TO:
            self.small_blobs[_blob_key(name)] = b"".join(parts)
        return bs_pb2.WriteResponse(committed_size=received)

    async def Read(
        self, request: bs_pb2.ReadRequest, context: Context
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        data = self.small_blobs.get(_blob_key(request.resource_name))
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "the floor server keeps small blobs")
        yield bs_pb2.ReadResponse(data=data)

    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Context
    ) -> bs_pb2.QueryWriteStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor server keeps nothing")
        raise AssertionError("abort returned")


async def serve(port: int) -> None:
    server = grpc.aio.server(options=TRANSPORT_OPTIONS)
    re_grpc.add_CapabilitiesServicer_to_server(
        CapabilitiesService(max_batch_total_size_bytes=4 << 20, allow_action_cache_updates=True),
        server,
    )
    bs_grpc.add_ByteStreamServicer_to_server(CountingByteStream(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
