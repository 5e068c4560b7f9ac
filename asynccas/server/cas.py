"""The ContentAddressableStorage service: FindMissingBlobs, the batch RPCs and GetTree."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from itertools import compress
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from asynccas import compression, metrics
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.auth import Access
from asynccas.chunking import FastCdcParams
from asynccas.digest import Digest, DigestBatch
from asynccas.errors import (
    BatchTooLarge,
    BlobNotFound,
    CasError,
    DigestMismatch,
    InvalidArgument,
    UnsupportedFeature,
)
from asynccas.hashing import THREAD_THRESHOLD
from asynccas.resource_names import validate_instance_name
from asynccas.server.blobs import check_blob_size, read_small_blobs
from asynccas.server.calls import authorize
from asynccas.server.errors import Context, rpc_status, streaming_rpc, unary_rpc
from asynccas.server.get_tree_cache import CachedTree, GetTreeCache
from asynccas.server.registration import register, server_streaming, unary
from asynccas.server.split_splice import SPLIT_CACHE_CHUNKS, SplitCache, splice_blob, split_blob
from asynccas.storage.base import CHUNK_SIZE, Storage, deletion_marker, missing_digests
from asynccas.storage.context import RequestContext
from asynccas.threads import in_thread
from asynccas.wire.messages import (
    FindMissingBlobsWire,
    ReadResult,
    UpdateResult,
    encode_batch_read_response,
    encode_batch_update_response,
)

_SERVICE: Final = "build.bazel.remote.execution.v2.ContentAddressableStorage"
DEFAULT_TREE_PAGE_SIZE: Final = 1000
MAX_TREE_PAGE_SIZE: Final = 10_000
_TREE_READ_BATCH: Final = 1000


def batch_update_response(results: Iterable[UpdateResult]) -> re_pb2.BatchUpdateBlobsResponse:
    """The response message for ``results``: what ``encode_batch_update_response``, which the
    server sends, must equal byte for byte (the property tests' reference)."""
    return re_pb2.BatchUpdateBlobsResponse(
        responses=[
            re_pb2.BatchUpdateBlobsResponse.Response(digest=message, status=rpc_status(error))
            for message, error in results
        ]
    )


def _enum_name(enum: Any, value: int) -> str:
    """A protobuf enum value's name, or its number for one this server does not know (a
    client may send any number; ``Name`` would raise)."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return f"value {value}"


def _inflated(compressor: int, data: bytes, digest: Digest) -> bytes:
    if compressor != re_pb2.Compressor.ZSTD:
        name = _enum_name(re_pb2.Compressor.Value, compressor).lower()
        raise UnsupportedFeature(f"compressor {name} is not supported by this server")
    return compression.decompress(data, digest)


def _read_results(
    messages: Sequence[re_pb2.Digest],
    parsed: Sequence[Digest | CasError],
    found: Mapping[Digest, bytes],
    compressed: Mapping[Digest, bytes],
) -> list[ReadResult]:
    results: list[ReadResult] = []
    for message, digest in zip(messages, parsed, strict=True):
        if isinstance(digest, CasError):
            results.append((message, None, digest, 0))
        elif digest in compressed:
            results.append((message, compressed[digest], None, re_pb2.Compressor.ZSTD))
        else:
            data = found.get(digest)
            error = None if data is not None else BlobNotFound(digest)
            results.append((message, data, error, 0))
    return results


def _compressed_results(
    messages: Sequence[re_pb2.Digest],
    parsed: Sequence[Digest | CasError],
    found: Mapping[Digest, bytes],
) -> list[ReadResult]:
    """The results for a client that accepts zstd: each blob compressed where that makes it
    smaller (identity is always acceptable, and tiny or random blobs only grow)."""
    compressed = {}
    for digest, data in found.items():
        if len(data) >= _COMPRESS_FROM:
            packed = compression.compress(data)
            if len(packed) < len(data):
                compressed[digest] = packed
    return _read_results(messages, parsed, found, compressed)


_SPLITS_WITH: Final = (re_pb2.ChunkingFunction.UNKNOWN, re_pb2.ChunkingFunction.FAST_CDC_2020)
"""What SplitBlob takes: its own choice (UNKNOWN) is FastCDC 2020 too."""
_COMPRESS_FROM: Final = 256
"""Blobs smaller than this go uncompressed: a zstd frame's own bytes eat what it saves."""


def batch_read_response(results: Iterable[ReadResult]) -> re_pb2.BatchReadBlobsResponse:
    """The response message for ``results``: what ``encode_batch_read_response``, which the
    server sends, must equal byte for byte (the property tests' reference)."""
    responses = []
    for message, data, error, compressor in results:
        response = re_pb2.BatchReadBlobsResponse.Response(digest=message)
        if data is not None and error is None:
            response.data = data
        response.status.CopyFrom(rpc_status(error))
        response.compressor = compressor  # type: ignore[assignment]
        responses.append(response)
    return re_pb2.BatchReadBlobsResponse(responses=responses)


# Each entry of a BatchReadBlobsResponse beside its data: the digest (up to ~140 bytes for
# SHA-512) and a status, whose NOT_FOUND message names the digest again.
_RESPONSE_BYTES_PER_ENTRY: Final = 512


def response_limit(max_batch_total_size_bytes: int) -> int:
    """The gRPC message limit a server sets for a batch limit: above it (the blobs' data plus
    per-entry framing), so that an oversized batch meets a clear INVALID_ARGUMENT rather than
    a transport error."""
    return 2 * max(max_batch_total_size_bytes, CHUNK_SIZE) + (1 << 20)


class ContentAddressableStorageService:
    """FindMissingBlobs and the batch RPCs as wire bytes (``wire``), and GetTree; registered
    by ``add_to_server``, not through the generated servicer, whose methods take messages."""

    def __init__(
        self,
        storage: Storage,
        *,
        max_batch_total_size_bytes: int,
        tree_cache: GetTreeCache | None = None,
        max_response_bytes: int | None = None,
        max_blob_size: int = 0,
        fast_cdc: FastCdcParams | None = None,
    ) -> None:
        """``max_response_bytes``: the server's gRPC send limit (by default what
        ``response_limit`` gives for the batch limit); a batch whose answer would exceed it
        is refused before anything is read."""
        self.storage = storage
        self.max_blob_size = max_blob_size
        self.fast_cdc = fast_cdc or FastCdcParams()
        self.split_cache = SplitCache(SPLIT_CACHE_CHUNKS)
        self.max_batch_total_size_bytes = max_batch_total_size_bytes
        self.max_response_bytes = max_response_bytes or response_limit(max_batch_total_size_bytes)
        self.tree_cache = tree_cache if tree_cache is not None else GetTreeCache()

    @unary_rpc
    async def find_missing_blobs_wire(self, body: bytes, context: Context) -> bytes:
        """FindMissingBlobs as the server registers it: wire bytes in and out (see ``wire``)."""
        request = FindMissingBlobsWire.parse(body)
        if request is None:  # not in the shape the wire reader takes: the protobuf path
            try:
                message = re_pb2.FindMissingBlobsRequest.FromString(body)
            except DecodeError as exc:
                raise InvalidArgument(f"FindMissingBlobsRequest is malformed: {exc}") from None
            return (await self._find_missing_blobs(message, context)).SerializeToString()
        validate_instance_name(request.instance_name)
        batch = request.batch
        ctx = authorize(Access.READ, request.instance_name, context, batch.function)
        return request.answer(await self._missing_mask(ctx, batch))

    async def _find_missing_blobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: Context
    ) -> re_pb2.FindMissingBlobsResponse:
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.READ, request.instance_name, context, request.digest_function)
        # No per-digest status exists in the response, so one bad digest fails the request.
        batch = DigestBatch.from_protos(request.blob_digests, request.digest_function)
        mask = await self._missing_mask(ctx, batch)
        if not any(mask):
            return re_pb2.FindMissingBlobsResponse()
        # Answer with the request's own messages: cheaper than building new ones.
        return re_pb2.FindMissingBlobsResponse(
            missing_blob_digests=list(compress(request.blob_digests, mask))
        )

    async def _missing_mask(self, ctx: RequestContext, batch: DigestBatch) -> bytes:
        mask = await self.storage.find_missing(ctx, batch)
        counting = metrics.active()
        if counting is not None:  # per distinct digest: a repeat is answered at its first place
            unique = batch.unique()
            missing = mask.count(1)
            counting.find_missing.labels("missing").inc(missing)
            counting.find_missing.labels("present").inc(
                len(unique[0] if unique is not None else batch) - missing
            )
        empty = batch.empty_positions()
        if empty:
            editable = bytearray(mask)
            for position in empty:
                editable[position] = 0  # REAPI: the empty blob always exists
            mask = bytes(editable)
        return mask

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the service as grpc's generated code would, except that FindMissingBlobs
        takes and returns wire bytes, the batch RPCs return them, and malformed requests are
        INVALID_ARGUMENT (``registration``)."""
        register(
            server,
            _SERVICE,
            {
                "FindMissingBlobs": grpc.unary_unary_rpc_method_handler(
                    self.find_missing_blobs_wire
                ),
                "BatchUpdateBlobs": unary(
                    self.batch_update_blobs_wire, re_pb2.BatchUpdateBlobsRequest
                ),
                "BatchReadBlobs": unary(self.batch_read_blobs_wire, re_pb2.BatchReadBlobsRequest),
                "GetTree": server_streaming(
                    self.GetTree, re_pb2.GetTreeRequest, re_pb2.GetTreeResponse
                ),
                "SplitBlob": unary(
                    self.SplitBlob, re_pb2.SplitBlobRequest, re_pb2.SplitBlobResponse
                ),
                "SpliceBlob": unary(
                    self.SpliceBlob, re_pb2.SpliceBlobRequest, re_pb2.SpliceBlobResponse
                ),
            },
        )

    def _check_batch_size(self, total: int, verb: str) -> None:
        limit = self.max_batch_total_size_bytes
        if limit and total > limit:
            raise BatchTooLarge(
                f"batch would {verb} {total} bytes, over max_batch_total_size_bytes={limit};"
                " split it or use ByteStream"
            )

    @unary_rpc
    async def batch_update_blobs_wire(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: Context
    ) -> bytes:
        """BatchUpdateBlobs as the server registers it: the response encoded here (``wire``)."""
        return encode_batch_update_response(await self._update_batch(request, context))

    async def _update_batch(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: Context | None = None
    ) -> list[UpdateResult]:
        """Store the request's blobs; each one's digest with its error, or None if stored."""
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.WRITE, request.instance_name, context, request.digest_function)
        entries = list(request.requests)
        messages = [entry.digest for entry in entries]
        datas = [entry.data for entry in entries]  # each access copies the bytes out
        self._check_batch_size(sum(map(len, datas)), "upload")
        parsed = _parse_digests(messages, request.digest_function)
        # Compressed blobs are inflated in memory: their uncompressed sizes count too.
        inflated = sum(
            d.size_bytes
            for entry, d in zip(entries, parsed, strict=True)
            if entry.compressor and isinstance(d, Digest)
        )
        if inflated:
            self._check_batch_size(inflated, "upload, uncompressed,")
        results: list[CasError | None] = []
        to_store: list[tuple[Digest, bytes]] = []
        stored_at: list[int] = []
        for position, (entry, data, digest) in enumerate(zip(entries, datas, parsed, strict=True)):
            if isinstance(digest, CasError):
                results.append(digest)
                continue
            try:
                check_blob_size(digest, self.max_blob_size)
            except CasError as exc:
                results.append(exc)
                continue
            if entry.compressor != re_pb2.Compressor.IDENTITY:
                try:
                    data = _inflated(entry.compressor, data, digest)
                except CasError as exc:
                    results.append(exc)
                    continue
            if digest.is_empty:  # always present; only check the data agrees
                results.append(DigestMismatch("empty digest with data") if data else None)
                continue
            results.append(None)
            to_store.append((digest, data))
            stored_at.append(position)
        for position, error in zip(
            stored_at, await self.storage.bulk_update(ctx, to_store), strict=True
        ):
            results[position] = error
        return list(zip(messages, results, strict=True))

    @unary_rpc
    async def batch_read_blobs_wire(
        self, request: re_pb2.BatchReadBlobsRequest, context: Context
    ) -> bytes:
        """BatchReadBlobs as the server registers it: the response encoded here, without a
        message per blob (which cost more than reading the blobs; see ``wire``)."""
        return encode_batch_read_response(await self._read_batch(request, context))

    async def _read_batch(
        self, request: re_pb2.BatchReadBlobsRequest, context: Context | None = None
    ) -> list[ReadResult]:
        """Each requested digest with its data, or the error that stands in for it."""
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.READ, request.instance_name, context, request.digest_function)
        parsed = _parse_digests(request.digests, request.digest_function)
        valid = [d for d in parsed if isinstance(d, Digest)]
        # Every entry counts, repeats too: the answer carries the data once per entry (250
        # repeats of a 4 MiB blob once took a server from 233 MB to 2.2 GB).
        total = sum(d.size_bytes for d in valid)
        self._check_batch_size(total, "read")
        answer = total + len(parsed) * _RESPONSE_BYTES_PER_ENTRY
        if answer > self.max_response_bytes:
            raise BatchTooLarge(
                f"the answer to {len(parsed)} digests would take about {answer} bytes, over"
                f" this server's {self.max_response_bytes}-byte message limit; ask for fewer"
            )
        found = await read_small_blobs(self.storage, ctx, valid)
        if re_pb2.Compressor.ZSTD in request.acceptable_compressors and found:
            if total < THREAD_THRESHOLD:
                return _compressed_results(request.digests, parsed, found)
            return await in_thread(_compressed_results, request.digests, parsed, found)
        return _read_results(request.digests, parsed, found, {})

    @unary_rpc
    async def SplitBlob(
        self, request: re_pb2.SplitBlobRequest, context: Context
    ) -> re_pb2.SplitBlobResponse:
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.READ, request.instance_name, context, request.digest_function)
        digest = Digest.from_proto(request.blob_digest, request.digest_function)
        if request.chunking_function not in _SPLITS_WITH:
            name = _enum_name(re_pb2.ChunkingFunction.Value, request.chunking_function)
            raise UnsupportedFeature(
                f"chunking function {name} is not supported by this server (FAST_CDC_2020 is)"
            )
        chunks = await split_blob(self.storage, ctx, digest, self.fast_cdc, self.split_cache)
        return re_pb2.SplitBlobResponse(
            chunk_digests=[d.to_proto() for d in chunks],
            chunking_function=re_pb2.ChunkingFunction.FAST_CDC_2020,
        )

    @unary_rpc
    async def SpliceBlob(
        self, request: re_pb2.SpliceBlobRequest, context: Context
    ) -> re_pb2.SpliceBlobResponse:
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.WRITE, request.instance_name, context, request.digest_function)
        digest = Digest.from_proto(request.blob_digest, request.digest_function)
        check_blob_size(digest, self.max_blob_size)
        chunks = [
            Digest.from_proto(d, request.digest_function or digest.function.proto_value)
            for d in request.chunk_digests
        ]
        await splice_blob(self.storage, ctx, digest, chunks)
        return re_pb2.SpliceBlobResponse(blob_digest=request.blob_digest)

    @streaming_rpc
    async def GetTree(
        self, request: re_pb2.GetTreeRequest, context: Context
    ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        validate_instance_name(request.instance_name)
        ctx = authorize(Access.READ, request.instance_name, context, request.digest_function)
        root = Digest.from_proto(request.root_digest, request.digest_function)
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        page_size = min(request.page_size or DEFAULT_TREE_PAGE_SIZE, MAX_TREE_PAGE_SIZE)
        skip = _parse_page_token(request.page_token)
        # Pages are also capped in bytes so that a response fits gRPC's message limit.
        byte_budget = max(self.max_batch_total_size_bytes, 1 << 20)
        cached = self.tree_cache.get(root)
        if cached is not None and skip == 0 and page_size in cached.pages:
            if await self._still_stored(ctx, cached):
                for response in cached.pages[page_size]:
                    yield response
                return
            self.tree_cache.forget(root)
        sent: list[re_pb2.GetTreeResponse] = []
        position = 0
        page: list[re_pb2.Directory] = []
        page_bytes = 0
        async for directory, size in self._directories(ctx, root):
            position += 1
            if position <= skip:
                continue
            if page and (len(page) >= page_size or page_bytes + size > byte_budget):
                response = re_pb2.GetTreeResponse(
                    directories=page, next_page_token=str(position - 1)
                )
                sent.append(response)
                yield response
                page, page_bytes = [], 0
            page.append(directory)
            page_bytes += size
        if position < skip:
            raise InvalidArgument(f"page_token {request.page_token!r} is past the end of the tree")
        last = re_pb2.GetTreeResponse(directories=page)
        sent.append(last)
        yield last
        if skip == 0:  # kept only if the walk was complete (the tree cache then has the root)
            self.tree_cache.add_pages(root, page_size, sent)

    async def _still_stored(self, ctx: RequestContext, tree: CachedTree) -> bool:
        """Whether every Directory of a cached tree is still in the CAS."""
        marker = await deletion_marker(self.storage)
        if marker is not None and marker == tree.marker:
            return True  # nothing was deleted since they were all present
        present = not await missing_digests(
            self.storage, ctx, [d for d, _ in tree.entries if d.size_bytes or not d.is_empty]
        )
        if present:
            tree.marker = marker
        return present

    async def _directories(
        self, ctx: RequestContext, root: Digest
    ) -> AsyncIterator[tuple[re_pb2.Directory, int]]:
        """The tree from the cache if every Directory in it is still stored, else walked."""
        cached = self.tree_cache.get(root)
        if cached is not None:
            if await self._still_stored(ctx, cached):
                for _, data in cached.entries:
                    yield re_pb2.Directory.FromString(data), len(data)
                return
            self.tree_cache.forget(root)
        # Read before the walk: a deletion during it must not be hidden by a later marker.
        marker = await deletion_marker(self.storage)
        walked: list[tuple[Digest, bytes]] = []
        complete = True
        async for digest, directory, data in self._walk(ctx, root):
            if directory is None:
                complete = False  # a subtree is missing: the answer may change, do not keep it
                continue
            walked.append((digest, data))
            yield directory, len(data)
        if complete:
            self.tree_cache.put(root, walked, marker)

    async def _walk(
        self, ctx: RequestContext, root: Digest
    ) -> AsyncIterator[tuple[Digest, re_pb2.Directory | None, bytes]]:
        """Breadth first, each directory once, children in the order their parents list them.

        The order depends only on the tree's content, which is what lets a page token
        be a plain count of directories already sent.
        """
        seen = {root}
        level = [root]
        while level:
            blobs: dict[Digest, bytes] = {}
            for start in range(0, len(level), _TREE_READ_BATCH):
                blobs.update(
                    await read_small_blobs(
                        self.storage, ctx, level[start : start + _TREE_READ_BATCH]
                    )
                )
            next_level = []
            for digest in level:
                data = blobs.get(digest)
                if data is None:
                    if digest == root:
                        raise BlobNotFound(root)
                    yield digest, None, b""  # REAPI: missing subtrees are left out
                    continue
                try:
                    directory = re_pb2.Directory.FromString(data)
                except DecodeError:
                    if digest == root:
                        raise InvalidArgument(f"root {root} is not a Directory message") from None
                    yield digest, None, b""
                    continue
                yield digest, directory, data
                for child in directory.directories:
                    try:
                        child_digest = Digest.from_proto(child.digest, root.function.proto_value)
                    except CasError:
                        continue
                    if child_digest not in seen:
                        seen.add(child_digest)
                        next_level.append(child_digest)
            level = next_level


def _parse_digests(
    messages: Sequence[re_pb2.Digest], function_value: int
) -> Sequence[Digest | CasError]:
    """Each digest of a batch request, or the error that stands in for it: checked in bulk
    when all are valid (the common case), else one by one for per-blob statuses."""
    try:
        return DigestBatch.from_protos(messages, function_value).digests
    except CasError:
        parsed: list[Digest | CasError] = []
        for message in messages:
            try:
                parsed.append(Digest.from_proto(message, function_value))
            except CasError as exc:
                parsed.append(exc)
        return parsed


def _parse_page_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or not token.isascii() or len(token) > 12:
        raise InvalidArgument(f"page_token {token!r} was not issued by this server")
    return int(token)
