"""Action results kept by another REAPI server: a proxy's ActionCache, so that every proxy in
front of one upstream shares its results (and a build through any of them hits)."""

from __future__ import annotations

import time
from collections import OrderedDict
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
    instance rule, retries and timeouts. Results are passed as the remote stores them.

    With ``hit_ttl``, a result found (or stored) is answered from memory for that many
    seconds: a warm build asks for every action's result, and without this each of those
    went upstream (half of a warm proxy's upstream calls). Only hits are kept: a miss is
    asked again, since another client may store the result any moment. A result kept a
    little after the upstream replaced it is still a valid answer, as any stored result is;
    one the server finds unusable (its outputs gone) is dropped at once (``delete``).
    """

    def __init__(
        self, remote: RemoteStorage, *, hit_ttl: float = 0.0, max_hits: int = 100_000
    ) -> None:
        if hit_ttl < 0 or max_hits <= 0:
            raise ValueError("hit_ttl must be 0 or more and max_hits positive")
        self.remote = remote
        self.hit_ttl = hit_ttl
        self.max_hits = max_hits
        self._hits: OrderedDict[tuple[str, Digest], tuple[float, bytes]] = OrderedDict()

    def _remember(self, instance_name: str, action: Digest, result: bytes) -> None:
        if not self.hit_ttl:
            return
        key = (instance_name, action)
        self._hits[key] = (time.monotonic() + self.hit_ttl, result)
        self._hits.move_to_end(key)
        while len(self._hits) > self.max_hits:
            self._hits.popitem(last=False)

    def _remembered(self, instance_name: str, action: Digest) -> bytes | None:
        kept = self._hits.get((instance_name, action))
        if kept is None:
            return None
        expires, result = kept
        if expires <= time.monotonic():
            del self._hits[instance_name, action]
            return None
        return result

    async def start(self) -> None:
        await self.remote.start()
        self._stub = re_grpc.ActionCacheStub(self.remote.channel)

    async def stop(self) -> None:
        await self.remote.stop()

    async def get(self, instance_name: str, action: Digest) -> bytes | None:
        kept = self._remembered(instance_name, action)
        if kept is not None:
            return kept
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
        data = result.SerializeToString()
        self._remember(instance_name, action, data)
        return data

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
        self._remember(instance_name, action, result)

    async def delete(self, instance_name: str, action: Digest) -> None:
        """REAPI has no call to delete a result: an unusable one stays for the remote to
        replace (this server already treats it as a miss); the copy kept here goes."""
        self._hits.pop((instance_name, action), None)
