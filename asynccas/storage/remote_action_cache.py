"""Action results kept by another REAPI server: a proxy's ActionCache, so that every proxy in
front of one upstream shares its results (and a build through any of them hits)."""

from __future__ import annotations

from functools import partial

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.client.channel import function_field
from asynccas.digest import Digest
from asynccas.errors import NotFound
from asynccas.storage.action_cache import ActionCacheStore
from asynccas.storage.context import RequestContext
from asynccas.storage.remote import RemoteStorage


class RemoteActionCache(ActionCacheStore):
    """Forwards GetActionResult and UpdateActionResult through ``remote``'s channel, with its
    instance rule, retries and timeouts. Results are passed as the remote stores them."""

    def __init__(self, remote: RemoteStorage) -> None:
        self.remote = remote

    async def start(self) -> None:
        await self.remote.start()
        self._stub = re_grpc.ActionCacheStub(self.remote.channel)

    async def stop(self) -> None:
        await self.remote.stop()

    async def get(self, instance_name: str, action: Digest) -> bytes | None:
        ctx = RequestContext(instance_name=instance_name)
        request = re_pb2.GetActionResultRequest(
            instance_name=self.remote.instance(ctx),
            action_digest=action.to_proto(),
            digest_function=function_field([action]),
        )
        try:
            result = await self.remote.call(
                ctx, "GetActionResult", partial(self._stub.GetActionResult, request)
            )
        except NotFound:
            return None
        return result.SerializeToString()

    async def put(self, instance_name: str, action: Digest, result: bytes) -> None:
        ctx = RequestContext(instance_name=instance_name)
        request = re_pb2.UpdateActionResultRequest(
            instance_name=self.remote.instance(ctx),
            action_digest=action.to_proto(),
            action_result=re_pb2.ActionResult.FromString(result),
            digest_function=function_field([action]),
        )
        await self.remote.call(
            ctx, "UpdateActionResult", partial(self._stub.UpdateActionResult, request)
        )

    async def delete(self, instance_name: str, action: Digest) -> None:
        """REAPI has no call to delete a result: an unusable one stays for the remote to
        replace (this server already treats it as a miss)."""
