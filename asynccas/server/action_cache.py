"""The ActionCache service. A result is only served while every blob it names is in the CAS.

REAPI asks caches not to hand out results whose outputs are gone; Bazel fails the
build on such a hit instead of re-running the action. So GetActionResult checks
output files, stdout/stderr and every file inside output directory trees, and
answers NOT_FOUND (a miss) when any is missing.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from asynccas import metrics
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.auth import Access
from asynccas.digest import Digest, DigestFunction
from asynccas.errors import ActionResultNotFound, CasError, InvalidArgument, UnsupportedFeature
from asynccas.resource_names import validate_instance_name
from asynccas.server.blobs import read_small_blobs
from asynccas.server.calls import authorize
from asynccas.server.errors import Context, unary_rpc
from asynccas.server.registration import register, unary
from asynccas.storage.action_cache import ActionCacheStore
from asynccas.storage.base import Storage, missing_digests
from asynccas.storage.context import RequestContext

logger = logging.getLogger(__name__)


def referenced_blobs(result: re_pb2.ActionResult, function: DigestFunction) -> list[Digest]:
    """Digests an ActionResult names directly (trees are listed, not opened)."""
    messages = [f.digest for f in result.output_files]
    messages += [d.tree_digest for d in result.output_directories if d.HasField("tree_digest")]
    messages += [
        d.root_directory_digest
        for d in result.output_directories
        if d.HasField("root_directory_digest")
    ]
    for name in ("stdout_digest", "stderr_digest"):
        if result.HasField(name):
            messages.append(getattr(result, name))
    return [Digest.from_proto(m, function.proto_value) for m in messages]


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(
        self,
        store: ActionCacheStore,
        storage: Storage,
        *,
        allow_updates: bool = True,
        check_completeness: bool = True,
    ) -> None:
        self.store = store
        self.storage = storage
        self.allow_updates = allow_updates
        self.check_completeness = check_completeness

    def add_to_server(self, server: grpc.aio.Server) -> None:
        register(
            server,
            "build.bazel.remote.execution.v2.ActionCache",
            {
                "GetActionResult": unary(
                    self.GetActionResult, re_pb2.GetActionResultRequest, re_pb2.ActionResult
                ),
                "UpdateActionResult": unary(
                    self.UpdateActionResult, re_pb2.UpdateActionResultRequest, re_pb2.ActionResult
                ),
            },
        )

    @unary_rpc
    async def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        counting = metrics.active()
        if counting is None:
            return await self._lookup(request, context)
        try:
            result = await self._lookup(request, context)
        except ActionResultNotFound:
            counting.action_cache.labels("miss").inc()
            raise
        counting.action_cache.labels("hit").inc()
        return result

    async def _lookup(
        self, request: re_pb2.GetActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.READ, request.instance_name, context, request.digest_function)
        action = Digest.from_proto(request.action_digest, request.digest_function)
        data = await self.store.get(request.instance_name, action)
        if data is None:
            raise ActionResultNotFound(f"no cached result for action {action}")
        try:
            result = re_pb2.ActionResult.FromString(data)
        except DecodeError:
            logger.warning("dropping undecodable action cache entry for %s", action)
            await self.store.delete(request.instance_name, action)
            raise ActionResultNotFound(f"no cached result for action {action}") from None
        if self.check_completeness:
            missing = await self._missing_outputs(ctx, result, action.function)
            if missing:
                raise ActionResultNotFound(
                    f"cached result for action {action} refers to {len(missing)} blob(s) no"
                    f" longer in the CAS, e.g. {missing[0]}; treating it as a miss"
                )
        return result

    async def _missing_outputs(
        self, ctx: RequestContext, result: re_pb2.ActionResult, function: DigestFunction
    ) -> list[Digest]:
        wanted = referenced_blobs(result, function)
        trees = [
            Digest.from_proto(d.tree_digest, function.proto_value)
            for d in result.output_directories
            if d.HasField("tree_digest")
        ]
        found = await read_small_blobs(self.storage, ctx, trees) if trees else {}
        for tree_digest in trees:
            data = found.get(tree_digest)
            if data is None:
                continue  # reported as missing below
            try:
                tree = re_pb2.Tree.FromString(data)
            except DecodeError:
                return [tree_digest]
            try:
                for directory in [tree.root, *tree.children]:
                    wanted += [
                        Digest.from_proto(f.digest, function.proto_value) for f in directory.files
                    ]
            except CasError:
                # A tree naming a malformed digest makes the result unusable: a miss, not an
                # INVALID_ARGUMENT on every later Get (which poisoned the entry for good).
                return [tree_digest]
        wanted = [d for d in wanted if not d.is_empty]
        # Most results name a few outputs; one with none costs no lookup at all.
        return await missing_digests(self.storage, ctx, wanted) if wanted else []

    @unary_rpc
    async def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        validate_instance_name(request.instance_name)
        authorize(Access.WRITE, request.instance_name, context, request.digest_function)
        if not self.allow_updates:
            raise UnsupportedFeature("this server does not accept action cache updates")
        action = Digest.from_proto(request.action_digest, request.digest_function)
        if not request.HasField("action_result"):
            raise InvalidArgument("UpdateActionResult carries no action_result")
        # Reject results naming malformed digests now rather than failing every later Get.
        referenced_blobs(request.action_result, action.function)
        await self.store.put(
            request.instance_name, action, request.action_result.SerializeToString()
        )
        return request.action_result
