"""S3Storage against a real SeaweedFS (no S3 mocks): the storage contract, under a Redis index,
multipart uploads that stay invisible until verified, bounded buffers, the config file, and
the object store going away and coming back under a running server."""

from __future__ import annotations

import re
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from asynccas.client import CasClient
from asynccas.config import build
from asynccas.digest import Digest, DigestBatch
from asynccas.errors import BackendUnavailable, ConfigurationError, DigestMismatch
from asynccas.index.redis import RedisIndex
from asynccas.redis_provider import RedisProvider
from asynccas.server.app import CasServer
from asynccas.storage.action_cache import MemoryActionCache
from asynccas.storage.base import contains, put_chunks, read_all
from asynccas.storage.context import NO_CONTEXT
from asynccas.storage.s3 import MIN_PART_SIZE, S3Storage
from asynccas.testing import blob, check_index, check_storage
from tests.support.redis_servers import RedisServer
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

pytestmark = pytest.mark.anyio

README = Path(__file__).parent.parent / "README.md"


def s3(store: SeaweedFS, **options: Any) -> S3Storage:
    """A storage on a bucket of its own, so tests never see each other's blobs."""
    options.setdefault("create_bucket", True)
    return S3Storage(
        f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=store.endpoint,
        region="us-east-1",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        **options,
    )


async def chunks(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_storage_conformance(seaweedfs: SeaweedFS) -> None:
    async with s3(seaweedfs, prefix="cas/") as storage:
        await check_storage(storage)


async def test_under_a_redis_index_eviction_deletes_the_objects(
    seaweedfs: SeaweedFS, redis_server: RedisServer
) -> None:
    objects = s3(seaweedfs)
    async with RedisIndex(
        objects, RedisProvider(redis_server.url), prefix=f"s3-{uuid.uuid4().hex[:8]}"
    ) as index:
        await check_index(index)
        digest, data = blob(10_000, 7)
        await put_chunks(index, NO_CONTEXT, digest, chunks(data))
        assert await objects._exists(digest)
        assert await index.delete_n_bytes(1) >= len(data)
        assert not await objects._exists(digest), "an evicted blob stayed in the bucket"


async def test_a_large_blob_is_a_multipart_upload_invisible_until_its_hash_checked(
    seaweedfs: SeaweedFS,
) -> None:
    async with s3(seaweedfs, part_size=MIN_PART_SIZE) as storage:
        digest, data = blob(3 * MIN_PART_SIZE + 12345, 1)
        writer = await storage.put(NO_CONTEXT, digest)
        async for chunk in chunks(data[: 2 * MIN_PART_SIZE + 100]):
            await writer.write(chunk)
        await writer.flush()
        client = storage._connected()
        uploads = await client.list_multipart_uploads(Bucket=storage.bucket)
        assert [u["Key"] for u in uploads.get("Uploads", [])] == [storage.key(digest)]
        assert not await contains(storage, NO_CONTEXT, digest), "parts became visible"
        async for chunk in chunks(data[2 * MIN_PART_SIZE + 100 :]):
            await writer.write(chunk)
        await writer.commit()
        assert await read_all(storage, NO_CONTEXT, digest) == data
        assert (
            b"".join([c async for c in storage.get(NO_CONTEXT, digest, MIN_PART_SIZE - 5, 10)])
            == data[MIN_PART_SIZE - 5 : MIN_PART_SIZE + 5]
        )

        # A wrong upload of the same size is aborted: no object, no parts left behind.
        other, other_data = blob(len(data), 2)
        corrupt = other_data[:-1] + bytes([other_data[-1] ^ 1])
        with pytest.raises(DigestMismatch):
            await put_chunks(storage, NO_CONTEXT, other, chunks(corrupt))
        assert not await contains(storage, NO_CONTEXT, other)
        uploads = await client.list_multipart_uploads(Bucket=storage.bucket)
        assert uploads.get("Uploads", []) == [], "an aborted upload left its parts"


async def test_writers_wait_for_buffer_room_rather_than_exceed_it(seaweedfs: SeaweedFS) -> None:
    async with s3(seaweedfs, part_size=MIN_PART_SIZE, buffer_bytes=4 * MIN_PART_SIZE) as storage:
        big = [blob(MIN_PART_SIZE + 1, seed) for seed in range(3)]
        first = await storage.put(NO_CONTEXT, big[0][0])
        second = await storage.put(NO_CONTEXT, big[1][0])
        assert storage.buffers.in_use == 4 * MIN_PART_SIZE  # each: a part, and its body
        with anyio.move_on_after(0.5) as waited:
            await storage.put(NO_CONTEXT, big[2][0])
        assert waited.cancelled_caught, "a third writer got room past the budget"
        await first.abort()
        third = await storage.put(NO_CONTEXT, big[2][0])  # room again
        for writer, (_, data) in zip((second, third), big[1:], strict=True):
            await writer.write(data)
            await writer.commit()
        assert storage.buffers.in_use == 0, "a finished writer kept its reservation"


async def test_a_missing_bucket_is_a_configuration_error_naming_it(seaweedfs: SeaweedFS) -> None:
    storage = s3(seaweedfs, create_bucket=False)
    with pytest.raises(ConfigurationError, match=f"bucket '{storage.bucket}' does not exist"):
        await storage.start()


async def test_from_a_config_file_with_credentials_from_the_environment(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    bucket = f"cfg-{uuid.uuid4().hex[:12]}"
    config: dict[str, Any] = {
        "cas": "objects",
        "storage": {
            "objects": {
                "type": "s3",
                "bucket": bucket,
                "endpoint": seaweedfs.endpoint,
                "region": "us-east-1",
                "prefix": "blobs/",
                "create_bucket": True,
                "part_size": "5M",
                "max_requests": 8,
            }
        },
    }
    deployment = build(config, tmp_path)
    assert isinstance(deployment.cas, S3Storage)
    assert f"s3://{bucket}/blobs/" in deployment.description
    async with deployment.cas as storage:
        digest, data = blob(1000, 3)
        assert await storage.bulk_update(NO_CONTEXT, [(digest, data)]) == [None]
        assert storage.key(digest).startswith("blobs/sha256/")
        assert await read_all(storage, NO_CONTEXT, digest) == data
    for wrong, message in (("part_size", "under S3's smallest part"), ("bucket", "bucket")):
        bad = {**config["storage"]["objects"], wrong: "1K" if wrong == "part_size" else ""}
        with pytest.raises(ConfigurationError, match=message):
            build({"cas": "objects", "storage": {"objects": bad}}, tmp_path)


async def test_the_object_store_going_away_is_unavailable_and_its_return_needs_no_restart(
    tmp_path: Path,
) -> None:
    store = SeaweedFS(tmp_path / "seaweedfs")
    await anyio.to_thread.run_sync(store.start)
    try:
        storage = s3(store, attempts=1, request_timeout=5)
        async with (
            CasServer(storage, MemoryActionCache(), address="127.0.0.1:0") as server,
            CasClient(f"grpc://{server.target}", max_attempts=1) as client,
        ):

            async def read(digest: Digest) -> bytes:
                return b"".join([chunk async for chunk in client.read_blob(digest)])

            kept = [blob(size, seed) for seed, size in enumerate((100, 70_000, 2_000_000))]
            for digest, data in kept:
                await client.write_blob(digest, data)
                assert await read(digest) == data

            await anyio.to_thread.run_sync(store.kill)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await read(kept[0][0])
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "object store" in (failed.value.details() or "")
            assert storage.where.split(" at ")[0] in (failed.value.details() or "")
            with pytest.raises(BackendUnavailable):
                await storage.find_missing(
                    NO_CONTEXT, DigestBatch.of(kept[0][0].function, [kept[0][0]])
                )

            await anyio.to_thread.run_sync(store.start)
            for digest, data in kept:  # nothing acknowledged was lost
                assert await read(digest) == data
            late, late_data = blob(300_000, 9)
            await client.write_blob(late, late_data)
            assert await read(late) == late_data
    finally:
        await anyio.to_thread.run_sync(store.stop)


async def test_the_readme_scale_out_example_builds_a_working_cas(
    seaweedfs: SeaweedFS, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's frontend configuration, its addresses moved to this test's engines."""
    text = await anyio.Path(README).read_text()
    section = text[text.index("### Scale-out") :]
    (example,) = re.findall(r"```toml\n(.*?)```", section[: section.index("\n### ", 1)], re.DOTALL)
    bucket = f"readme-{uuid.uuid4().hex[:8]}"
    example = (
        example.replace("redis://redis.internal:6379/0", f"redis://127.0.0.1:{redis_server.port}/4")
        .replace("http://seaweedfs.internal:8333", seaweedfs.endpoint)
        .replace('bucket = "asynccas"', f'bucket = "{bucket}"\ncreate_bucket = true')
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    deployment = build(tomllib.loads(example), tmp_path)
    assert deployment.index is deployment.cas
    assert deployment.eviction is not None
    assert deployment.eviction.max_bytes == 10 << 30
    async with deployment.cas as cas:
        assert isinstance(cas, RedisIndex)
        await check_index(cas)
