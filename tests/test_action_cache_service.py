"""ActionCache over a real grpc.aio server, including completeness checking."""

from __future__ import annotations

import grpc
import pytest

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas.digest import Digest
from asynccas.server.app import CasServer
from asynccas.testing import blob
from tests.test_cas_service import upload

pytestmark = pytest.mark.anyio


async def test_get_unknown_action_is_not_found(channel: grpc.aio.Channel) -> None:
    ac = re_grpc.ActionCacheStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ac.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=blob(50, 1)[0].to_proto())
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_update_then_get_with_complete_outputs(channel: grpc.aio.Channel) -> None:
    ac = re_grpc.ActionCacheStub(channel)
    action = blob(50, 2)[0]
    output, stdout = blob(2000, 3), blob(30, 4)
    tree_file = blob(100, 5)
    tree = re_pb2.Tree(
        root=re_pb2.Directory(files=[re_pb2.FileNode(name="a", digest=tree_file[0].to_proto())])
    )
    tree_data = tree.SerializeToString()
    tree_digest = Digest.of(tree_data)
    await upload(channel, output, stdout, tree_file, (tree_digest, tree_data))
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/x", digest=output[0].to_proto())],
        output_directories=[
            re_pb2.OutputDirectory(path="out/d", tree_digest=tree_digest.to_proto())
        ],
        stdout_digest=stdout[0].to_proto(),
        exit_code=0,
    )
    stored = await ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            instance_name="main", action_digest=action.to_proto(), action_result=result
        )
    )
    assert stored == result
    got = await ac.GetActionResult(
        re_pb2.GetActionResultRequest(instance_name="main", action_digest=action.to_proto())
    )
    assert got == result
    # Results are per instance.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("missing_part", ["output", "tree_file", "stderr"])
async def test_results_with_missing_blobs_are_misses(
    server: CasServer, channel: grpc.aio.Channel, missing_part: str
) -> None:
    ac = re_grpc.ActionCacheStub(channel)
    action = blob(50, 6)[0]
    parts = {"output": blob(2000, 7), "tree_file": blob(100, 8), "stderr": blob(20, 9)}
    tree = re_pb2.Tree(
        root=re_pb2.Directory(),
        children=[
            re_pb2.Directory(
                files=[re_pb2.FileNode(name="f", digest=parts["tree_file"][0].to_proto())]
            )
        ],
    )
    tree_blob = (Digest.of(tree.SerializeToString()), tree.SerializeToString())
    await upload(channel, tree_blob, *(p for name, p in parts.items() if name != missing_part))
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="o", digest=parts["output"][0].to_proto())],
        output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=tree_blob[0].to_proto())],
        stderr_digest=parts["stderr"][0].to_proto(),
    )
    await ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action.to_proto(), action_result=result)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert str(parts[missing_part][0]) in (caught.value.details() or "")
    # Once the blob is back, the entry is a hit again.
    await upload(channel, parts[missing_part])
    got = await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
    assert got == result


async def test_update_rejects_bad_input(channel: grpc.aio.Channel) -> None:
    ac = re_grpc.ActionCacheStub(channel)
    bad_output = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="o", digest=re_pb2.Digest(hash="../x", size_bytes=1))]
    )
    for request in [
        re_pb2.UpdateActionResultRequest(
            action_digest=re_pb2.Digest(hash="nothex", size_bytes=1),
            action_result=re_pb2.ActionResult(),
        ),
        re_pb2.UpdateActionResultRequest(action_digest=blob(5, 1)[0].to_proto()),
        re_pb2.UpdateActionResultRequest(
            action_digest=blob(5, 1)[0].to_proto(), action_result=bad_output
        ),
        re_pb2.UpdateActionResultRequest(
            instance_name="x/actionResults",
            action_digest=blob(5, 1)[0].to_proto(),
            action_result=re_pb2.ActionResult(),
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ac.UpdateActionResult(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
