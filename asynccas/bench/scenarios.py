"""The load scenarios of ``asynccas bench``. Each prepares its payloads before timing starts
(``setup``) and then performs one operation per ``run_once``, recording what it measured.

Fresh blobs for write scenarios cost no hashing during the run: every blob is a shared random
body (hashed once, in setup) plus a unique 8-byte suffix, digested from a copy of the body's
hasher.
"""

from __future__ import annotations

import contextlib
import random
import struct
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import grpc

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.bench.stats import OpStats
from asynccas.client.cas import CHUNK_SIZE, CasClient
from asynccas.digest import Digest
from asynccas.errors import BlobNotFound, CasError, DigestMismatch

SIZE_MIX_BAZEL: Sequence[tuple[int, int, float]] = (
    # (smallest, largest, share of blobs): mostly small sources and objects, a few big outputs
    (1024, 64 * 1024, 0.90),
    (64 * 1024, 1024 * 1024, 0.09),
    (1024 * 1024, 8 * 1024 * 1024, 0.01),
)


@dataclass
class Settings:
    blob_size: int = 4096
    batch: int = 100
    size_mix: Sequence[tuple[int, int, float]] | None = None
    worker: int = 0
    seed: int = 0
    present: float = 0.5
    """fmb: the share of the digests that are uploaded before timing starts."""
    chunk_size: int = 16 * 1024
    """Data per ByteStream WriteRequest: 16 KiB, as Bazel's ``Chunker`` sends."""
    compressor: str | None = None
    """``"zstd"``: ByteStream data moves zstd-compressed."""
    compressible: bool = False
    """Blobs of 3 bits of entropy per byte (ByteStream scenarios, and the outputs of
    bazel-like and bazel-download), which zstd shrinks to about 40% as it does build
    outputs, instead of random bytes."""


def fresh_seed() -> int:
    """A seed no earlier run is likely to have used: a run that met its own blobs already
    stored would measure the server's answer to duplicates, not its uploads."""
    return random.SystemRandom().randrange(1 << 31)


class Recorder:
    """Collects OpStats per label for one worker process."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.ops: dict[str, OpStats] = {}

    def record(self, label: str, began: float, *, size: int = 0, items: int = 1,
               error: str | None = None, corrupt: bool = False) -> None:  # fmt: skip
        now = time.perf_counter()
        stats = self.ops.setdefault(label, OpStats())
        if error is not None:
            stats.errors[error] += 1
        elif corrupt:
            stats.corruptions += 1
        else:
            stats.histogram.add(now - began)
            stats.bytes += size
            stats.items += items
        stats.per_second[int(now - self.started)] += 1


FAILED: Final = object()
"""What ``measured`` returns for a call that failed (a successful one may return None)."""


async def measured(
    recorder: Recorder, label: str, call: object, *, size: int = 0, items: int = 1
) -> object:
    """Await ``call``, recording its latency, or its gRPC status, or a corruption; return its
    result, or ``FAILED``."""
    began = time.perf_counter()
    try:
        result = await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        recorder.record(label, began, error=exc.code().name)
        return FAILED
    except DigestMismatch:
        recorder.record(label, began, corrupt=True)
        return FAILED
    except BlobNotFound:
        recorder.record(label, began, error="NOT_FOUND")
        return FAILED
    except CasError as exc:
        recorder.record(label, began, error=type(exc).__name__)
        return FAILED
    recorder.record(label, began, size=size, items=items)
    return result


_EIGHT_LETTERS: Final = bytes(b"abcdefgh"[i % 8] for i in range(256))


class FreshBlobs:
    """An endless supply of distinct blobs of one size, cheap to make and to digest."""

    def __init__(
        self, size: int, rng: random.Random, tag: int, *, compressible: bool = False
    ) -> None:
        self.size = max(size, 8)
        # Large bodies repeat one random block: randbytes() cannot make gigabytes at once.
        block = rng.randbytes(min(self.size - 8, 64 * 1024 * 1024))
        if compressible:  # eight letters: 3 bits of entropy per byte
            block = block.translate(_EIGHT_LETTERS)
        repeats, rest = divmod(self.size - 8, max(len(block), 1))
        self.body = block * repeats + block[:rest]
        self._hasher = Digest.empty().function.new_hasher()
        self._hasher.update(self.body)
        self._tag = tag
        self._counter = 0

    def next(self) -> tuple[Digest, bytes]:
        self._counter += 1
        suffix = struct.pack(">HxxI", self._tag & 0xFFFF, self._counter & 0xFFFFFFFF)
        hasher = self._hasher.copy()
        hasher.update(suffix)
        digest = Digest(hasher.hexdigest(), self.size)
        return digest, self.body + suffix if self.size <= 1024 * 1024 else suffix

    def chunks(self, suffix: bytes) -> ChunkSource:
        return ChunkSource(self.body, suffix)


class ChunkSource:
    """The bytes of body + suffix from any offset, in bounded chunks, without concatenating."""

    def __init__(self, body: bytes, suffix: bytes) -> None:
        self.body = memoryview(body)
        self.suffix = suffix

    async def __call__(self, offset: int) -> AsyncGenerator[bytes]:
        for start in range(offset, len(self.body), CHUNK_SIZE):
            yield bytes(self.body[start : start + CHUNK_SIZE])
        tail_from = max(0, offset - len(self.body))
        yield self.suffix[tail_from:]


class Scenario(Protocol):
    async def setup(self, cas: CasClient) -> None: ...

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None: ...


class FindMissing:
    """FindMissingBlobs of ``batch`` digests, the ``present`` share of them stored."""

    def __init__(self, settings: Settings) -> None:
        rng = random.Random(settings.seed)
        fresh = FreshBlobs(64, rng, settings.worker)
        stored = round(settings.batch * settings.present)
        self.present = [fresh.next() for _ in range(stored)]
        self.absent = [fresh.next()[0] for _ in range(settings.batch - stored)]
        self.digests = [d for d, _ in self.present] + self.absent

    async def setup(self, cas: CasClient) -> None:
        await cas.upload_blobs(self.present)

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        began = time.perf_counter()
        try:
            missing = await cas.find_missing(self.digests)
        except grpc.aio.AioRpcError as exc:
            recorder.record("FindMissingBlobs", began, error=exc.code().name)
            return
        wrong = set(missing) != set(self.absent)
        recorder.record("FindMissingBlobs", began, items=len(self.digests), corrupt=wrong)


class BatchUpdate:
    def __init__(self, settings: Settings) -> None:
        self.fresh = FreshBlobs(settings.blob_size, random.Random(settings.seed), settings.worker)
        self.batch = settings.batch

    async def setup(self, cas: CasClient) -> None:
        pass

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        blobs = [self.fresh.next() for _ in range(self.batch)]
        size = sum(d.size_bytes for d, _ in blobs)
        await measured(recorder, "BatchUpdateBlobs", cas.batch_update_blobs(blobs),
                       size=size, items=len(blobs))  # fmt: skip


class BatchRead:
    def __init__(self, settings: Settings) -> None:
        fresh = FreshBlobs(settings.blob_size, random.Random(settings.seed), settings.worker)
        self.pool = [fresh.next() for _ in range(settings.batch * 10)]
        self.batch = settings.batch
        self.rng = random.Random(settings.seed + 1)

    async def setup(self, cas: CasClient) -> None:
        await cas.upload_blobs(self.pool)

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        chosen = [d for d, _ in self.rng.sample(self.pool, self.batch)]
        size = sum(d.size_bytes for d in chosen)
        await measured(recorder, "BatchReadBlobs", cas.batch_read_blobs(chosen),
                       size=size, items=len(chosen))  # fmt: skip


class ByteStreamWrite:
    def __init__(self, settings: Settings) -> None:
        self.fresh = FreshBlobs(settings.blob_size, random.Random(settings.seed), settings.worker,
                                compressible=settings.compressible)  # fmt: skip

    async def setup(self, cas: CasClient) -> None:
        pass

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        digest, data = self.fresh.next()
        if len(data) == digest.size_bytes:
            call = cas.write_blob(digest, data)
        else:  # large: stream the shared body plus this blob's suffix
            call = cas.write_stream(digest, self.fresh.chunks(data))
        await measured(recorder, "ByteStream.Write", call, size=digest.size_bytes)


class ByteStreamRead:
    def __init__(self, settings: Settings) -> None:
        self.fresh = FreshBlobs(settings.blob_size, random.Random(settings.seed), settings.worker,
                                compressible=settings.compressible)  # fmt: skip
        # A few blobs to read in turn, but never more than 1 GiB to upload first.
        count = max(1, min(4, (1 << 30) // max(settings.blob_size, 1)))
        self.pool = [self.fresh.next() for _ in range(count)]
        self.rng = random.Random(settings.seed + 1)

    async def setup(self, cas: CasClient) -> None:
        for digest, data in self.pool:
            if len(data) == digest.size_bytes:
                await cas.write_blob(digest, data)
            else:
                await cas.write_stream(digest, self.fresh.chunks(data))
            # Read each once before timing: the timed reads then measure serving a blob,
            # not the first fill of the server's page cache, whatever way it wrote the blob.
            with contextlib.suppress(DigestMismatch):  # the timed reads count corruption
                async for _ in cas.read_blob(digest):
                    pass

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        digest, _ = self.rng.choice(self.pool)

        async def read_all() -> None:
            async for _ in cas.read_blob(digest):  # verified against the digest at the end
                pass

        await measured(recorder, "ByteStream.Read", read_all(), size=digest.size_bytes)


class GetTree:
    """GetTree of a tree of ``batch`` directories."""

    def __init__(self, settings: Settings) -> None:
        self.blobs: dict[Digest, bytes] = {}
        count = max(1, settings.batch)
        made = [
            re_pb2.Directory(files=[re_pb2.FileNode(name=f"w{settings.worker}-{i}")])
            for i in range(count)
        ]
        # Build bottom-up: directory i's children are 2i+1 and 2i+2, as in a binary heap.
        digests: list[Digest | None] = [None] * count
        for i in reversed(range(count)):
            for child in (2 * i + 1, 2 * i + 2):
                if child < count and digests[child] is not None:
                    made[i].directories.add(name=f"d{child}", digest=digests[child].to_proto())  # type: ignore[union-attr]
            data = made[i].SerializeToString()
            digests[i] = Digest.of(data)
            self.blobs[digests[i]] = data  # type: ignore[index]
        self.root = digests[0]
        self.count = count

    async def setup(self, cas: CasClient) -> None:
        await cas.upload_blobs(self.blobs)

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        began = time.perf_counter()
        try:
            directories = await cas.get_tree(self.root)  # type: ignore[arg-type]
        except grpc.aio.AioRpcError as exc:
            recorder.record("GetTree", began, error=exc.code().name)
            return
        size = sum(d.ByteSize() for d in directories)
        recorder.record("GetTree", began, size=size, items=len(directories),
                        corrupt=len(directories) != self.count)  # fmt: skip


class BatchClient:
    """What a batch-RPC client (BuildStream, recc) does per action: FindMissingBlobs of ~200
    inputs, upload of the missing ones (batches, large ones by ByteStream), a few output
    reads, an action cache lookup and update."""

    def __init__(self, settings: Settings) -> None:
        self.rng = random.Random(settings.seed)
        self.outputs = _ActionOutputs(settings, self.rng)
        self.actions = self.outputs.actions
        self.shared = [self._fresh() for _ in range(400)]  # inputs most actions have in common

    def _fresh(self) -> tuple[Digest, bytes]:
        """A new blob with its whole payload (large ones are a shared body plus a suffix)."""
        supply, digest, data = self.outputs.fresh()
        return digest, data if len(data) == digest.size_bytes else supply.body + data

    async def setup(self, cas: CasClient) -> None:
        await cas.upload_blobs(dict(self.shared))

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        began = time.perf_counter()
        inputs = self.rng.sample(self.shared, 160) + [self._fresh() for _ in range(40)]
        by_digest = dict(inputs)
        missing = await measured(
            recorder, "FindMissingBlobs", cas.find_missing(by_digest), items=len(inputs)
        )
        if missing is FAILED:
            recorder.record("action", began, error="FAILED_STEP")
            return
        blobs = {d: by_digest[d] for d in missing}  # type: ignore[attr-defined]
        sent = sum(len(b) for b in blobs.values())
        if (
            await measured(recorder, "upload", cas.upload_blobs(blobs), size=sent, items=len(blobs))
            is FAILED
        ):
            recorder.record("action", began, error="FAILED_STEP")
            return
        outputs = [d for d, _ in self.rng.sample(inputs, 3)]
        size = sum(d.size_bytes for d in outputs)
        await measured(recorder, "download", cas.download_blobs(outputs), size=size, items=3)
        action, _ = self.actions.next()
        await measured(recorder, "GetActionResult", cas.get_action_result(action))
        result = re_pb2.ActionResult(
            output_files=[
                re_pb2.OutputFile(path=f"out/{i}", digest=d.to_proto())
                for i, d in enumerate(outputs)
            ]
        )
        await measured(recorder, "UpdateActionResult", cas.update_action_result(action, result))
        recorder.record("action", began, size=sent + size)


class _ActionOutputs:
    """Supplies of fresh blobs in a size mix, and ActionResults naming them."""

    def __init__(self, settings: Settings, rng: random.Random) -> None:
        self.rng = rng
        mix = settings.size_mix or SIZE_MIX_BAZEL
        # Eight sizes per range, spread log-uniformly, each with its own supply of blobs.
        self.supplies = [
            (
                FreshBlobs(int(low * (high / low) ** rng.random()), rng,
                           settings.worker * 64 + i * 8 + j, compressible=settings.compressible),
                share / 8,
            )
            for i, (low, high, share) in enumerate(mix)
            for j in range(8)
        ]  # fmt: skip
        self.actions = FreshBlobs(200, rng, 1000 + settings.worker)

    def fresh(self) -> tuple[FreshBlobs, Digest, bytes]:
        pick = self.rng.random()
        for supply, share in self.supplies:
            if pick < share:
                return (supply, *supply.next())
            pick -= share
        supply = self.supplies[0][0]
        return (supply, *supply.next())

    @staticmethod
    def result(outputs: Sequence[Digest]) -> re_pb2.ActionResult:
        return re_pb2.ActionResult(
            output_files=[
                re_pb2.OutputFile(path=f"out/{i}", digest=d.to_proto())
                for i, d in enumerate(outputs)
            ]
        )


async def _upload_by_bytestream(cas: CasClient, supply: FreshBlobs, digest: Digest,
                                 data: bytes) -> None:  # fmt: skip
    if len(data) == digest.size_bytes:
        await cas.write_blob(digest, data)
    else:  # large: the shared body plus this blob's suffix, streamed
        await cas.write_stream(digest, supply.chunks(data))


class BazelLike:
    """Bazel 4.2.3's own sequence per action of an uploading build, from its gRPC log: one
    GetActionResult (a miss), one FindMissingBlobs of a few digests (the action, its command
    and its outputs), each missing blob uploaded with ByteStream.Write in ``chunk_size``
    messages (16 KiB, as Bazel), one UpdateActionResult. No batch RPCs."""

    def __init__(self, settings: Settings) -> None:
        self.outputs = _ActionOutputs(settings, random.Random(settings.seed))

    async def setup(self, cas: CasClient) -> None:
        pass

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        began = time.perf_counter()
        action, action_data = self.outputs.actions.next()
        await measured(recorder, "GetActionResult", cas.get_action_result(action))
        blobs = [self.outputs.fresh() for _ in range(2)]  # the command and one output
        action_supply = self.outputs.actions
        blobs.append((action_supply, action, action_data))
        missing = await measured(
            recorder, "FindMissingBlobs", cas.find_missing([d for _, d, _ in blobs]),
            items=len(blobs),
        )  # fmt: skip
        if missing is FAILED:
            recorder.record("action", began, error="FAILED_STEP")
            return
        sent = 0
        for supply, digest, data in blobs:
            if digest in missing:  # type: ignore[operator]
                call = _upload_by_bytestream(cas, supply, digest, data)
                if (
                    await measured(recorder, "ByteStream.Write", call, size=digest.size_bytes)
                    is FAILED
                ):
                    recorder.record("action", began, error="FAILED_STEP")
                    return
                sent += digest.size_bytes
        result = self.outputs.result([blobs[1][1]])
        await measured(recorder, "UpdateActionResult", cas.update_action_result(action, result))
        recorder.record("action", began, size=sent)


class BazelDownload:
    """Bazel's sequence per action of a build that downloads everything from a warm cache:
    one GetActionResult (a hit) and one ByteStream.Read per output. The actions and their
    outputs (three each, in the size mix) are uploaded before timing."""

    def __init__(self, settings: Settings) -> None:
        self.outputs = _ActionOutputs(settings, random.Random(settings.seed))
        self.rng = random.Random(settings.seed + 1)
        self.actions: list[tuple[Digest, list[Digest]]] = []
        self.blobs: dict[Digest, tuple[FreshBlobs, bytes]] = {}
        for _ in range(max(1, settings.batch)):
            action, _ = self.outputs.actions.next()
            made = [self.outputs.fresh() for _ in range(3)]
            self.actions.append((action, [d for _, d, _ in made]))
            self.blobs.update({d: (supply, data) for supply, d, data in made})

    async def setup(self, cas: CasClient) -> None:
        for digest, (supply, data) in self.blobs.items():
            await _upload_by_bytestream(cas, supply, digest, data)
        for action, outputs in self.actions:
            await cas.update_action_result(action, self.outputs.result(outputs))

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        began = time.perf_counter()
        action, outputs = self.rng.choice(self.actions)
        result = await measured(recorder, "GetActionResult", cas.get_action_result(action))
        if result is None or result is FAILED:  # a miss fails this scenario too
            recorder.record("action", began, error="FAILED_STEP")
            return
        size = 0
        for digest in outputs:

            async def read_all(digest: Digest = digest) -> None:
                async for _ in cas.read_blob(digest):  # verified against the digest
                    pass

            if await measured(recorder, "ByteStream.Read", read_all(),
                              size=digest.size_bytes) is FAILED:  # fmt: skip
                recorder.record("action", began, error="FAILED_STEP")
                return
            size += digest.size_bytes
        recorder.record("action", began, size=size)


class ActionCache:
    """GetActionResult and UpdateActionResult in turn over ``batch`` actions: half the gets
    of actions updated before timing (hits), half of fresh ones (misses)."""

    def __init__(self, settings: Settings) -> None:
        self.outputs = _ActionOutputs(settings, random.Random(settings.seed))
        self.rng = random.Random(settings.seed + 1)
        self.known = [self.outputs.actions.next()[0] for _ in range(max(1, settings.batch))]
        self.result = self.outputs.result([])  # no outputs: nothing for the server to check
        self.result.exit_code = 0
        self.result.stdout_raw = b"ok\n"
        self.turn = 0

    async def setup(self, cas: CasClient) -> None:
        for action in self.known:
            await cas.update_action_result(action, self.result)

    async def run_once(self, cas: CasClient, recorder: Recorder) -> None:
        self.turn += 1
        if self.turn % 2:
            action = self.rng.choice(self.known)
            await measured(recorder, "GetActionResult", cas.get_action_result(action))
        else:
            action = self.outputs.actions.next()[0]
            await measured(recorder, "UpdateActionResult",
                           cas.update_action_result(action, self.result))  # fmt: skip


SCENARIOS: dict[str, Callable[[Settings], Scenario]] = {
    "fmb": FindMissing,
    "batch-update": BatchUpdate,
    "batch-read": BatchRead,
    "bytestream-write": ByteStreamWrite,
    "bytestream-read": ByteStreamRead,
    "get-tree": GetTree,
    "bazel-like": BazelLike,
    "bazel-download": BazelDownload,
    "batch-client": BatchClient,
    "action-cache": ActionCache,
}
