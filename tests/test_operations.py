"""What an operator sees: /metrics scraped over HTTP, an access log line per RPC, backends
going away and coming back in the log, grpc health checking and server reflection."""

from __future__ import annotations

import logging
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from asynccas import metrics
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from asynccas.digest import Digest
from asynccas.errors import BackendUnavailable
from asynccas.index.redis import RedisIndex
from asynccas.redis_provider import RedisProvider
from asynccas.resource_names import format_write_name
from asynccas.server.app import SERVICE_NAMES
from asynccas.storage.disk import DiskStorage
from asynccas.testing import blob
from tests.servers import memory_server
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def metrics_port() -> Iterator[int]:
    server, port = metrics.start_http_server("127.0.0.1", 0)
    yield port
    server.shutdown()
    server.server_close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_what_the_server_does(metrics_port: int) -> None:
    async with (
        memory_server(count_metrics=True) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        before = await anyio.to_thread.run_sync(scrape, metrics_port)
        cas = re_grpc.ContentAddressableStorageStub(ch)
        present, present_data = blob(1000, 1)
        absent, _ = blob(1000, 2)
        name = format_write_name("", str(uuid.uuid4()), present)
        await bs_grpc.ByteStreamStub(ch).Write(
            iter([bs_pb2.WriteRequest(resource_name=name, data=present_data, finish_write=True)])
        )
        await cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                blob_digests=[present.to_proto(), absent.to_proto(), absent.to_proto()]
            )
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="../x"))
        ac = re_grpc.ActionCacheStub(ch)
        action = Digest.of(b"action")
        with pytest.raises(grpc.aio.AioRpcError):
            await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
        await ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                action_digest=action.to_proto(), action_result=re_pb2.ActionResult()
            )
        )
        await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
        after = await anyio.to_thread.run_sync(scrape, metrics_port)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("asynccas_rpcs_total", method="FindMissingBlobs", code="OK") == 1
    assert moved("asynccas_rpcs_total", method="FindMissingBlobs", code="INVALID_ARGUMENT") == 1
    assert moved("asynccas_rpcs_total", method="Write", code="OK") == 1
    assert moved("asynccas_rpcs_total", method="GetActionResult", code="NOT_FOUND") == 1
    assert moved("asynccas_rpc_duration_seconds_count", method="GetActionResult") == 2
    assert moved("asynccas_received_bytes_total", method="Write") > 1000
    assert moved("asynccas_find_missing_digests_total", result="present") == 1
    assert moved("asynccas_find_missing_digests_total", result="missing") == 1  # asked twice
    assert moved("asynccas_action_cache_lookups_total", result="hit") == 1
    assert moved("asynccas_action_cache_lookups_total", result="miss") == 1
    assert ("asynccas_uploads_in_flight", ()) in after


async def test_the_access_log_has_a_line_per_rpc(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asynccas.access")
    async with (
        memory_server(access_log=True) as server,
        grpc.aio.insecure_channel(server.target) as ch,
    ):
        await re_grpc.CapabilitiesStub(ch).GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name="team/a")
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await re_grpc.ActionCacheStub(ch).GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=Digest.of(b"a").to_proto())
            )
    lines = [r.getMessage() for r in caplog.records if r.name == "asynccas.access"]
    assert len(lines) == 2, lines
    assert "instance='team/a' GetCapabilities OK" in lines[0]
    assert lines[0].startswith("ipv4:127.0.0.1:")
    assert "GetActionResult NOT_FOUND" in lines[1]


async def test_health_and_reflection_list_the_services() -> None:
    async with memory_server() as server:

        def ask() -> tuple[list[str], list[str], int]:
            with grpc.insecure_channel(server.target) as channel:
                services = ProtoReflectionDescriptorDatabase(channel).get_services()
                from google.protobuf.descriptor_pool import DescriptorPool

                pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
                cas = pool.FindServiceByName(SERVICE_NAMES[0])
                stub: Any = health_pb2_grpc.HealthStub(channel)
                health = stub.Check(
                    health_pb2.HealthCheckRequest(service="google.bytestream.ByteStream")
                )
                return list(services), [m.name for m in cas.methods], health.status

        services, methods, status = await anyio.to_thread.run_sync(ask)
    assert set(SERVICE_NAMES) | {"grpc.health.v1.Health"} <= set(services)
    assert methods == ["FindMissingBlobs", "BatchUpdateBlobs", "BatchReadBlobs", "GetTree",
                       "SplitBlob", "SpliceBlob"]  # fmt: skip
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_redis_going_away_and_coming_back_is_logged_once_each_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis")
    await anyio.to_thread.run_sync(server.start)
    try:
        index = RedisIndex(
            DiskStorage(tmp_path / "data", fsync=False),
            RedisProvider(server.url, connect_timeout=1.0),
            prefix="outage",
        )
        digest, data = blob(100, 1)
        async with index:
            await index.bulk_update_blobs([(digest, data)])
            await anyio.to_thread.run_sync(server.stop)
            for _ in range(3):
                with pytest.raises(BackendUnavailable):
                    await index.get_total_size()
            await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(30):
                while True:
                    try:
                        await index.get_total_size()
                        break
                    except BackendUnavailable:
                        await anyio.sleep(0.1)
    finally:
        await anyio.to_thread.run_sync(server.stop)
    lines = [r.getMessage() for r in caplog.records if r.name == "asynccas.outages"]
    assert len(lines) == 2, lines
    assert "went away" in lines[0]
    assert "is back after" in lines[1]
