"""FastCDC 2020 content-defined chunking, as REAPI's SplitBlob and SpliceBlob specify it:
normalization level 2, min = avg / 4, max = avg * 4, the C reference's gear and masks tables,
a seed XORed into the gear table.

The cutting is pyfastcdc's (Cython over the reference algorithm, several GB/s), chosen over a
Python loop after it reproduced REAPI's test vectors for both seeds byte for byte
(tests/test_split_splice.py). Chunk boundaries depend only on the data, so the same bytes cut
the same way on every client and server: an edit in the middle of a large file changes the
chunks around it, and every other chunk is one the cache already holds.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio.to_thread
from pyfastcdc import FastCDC

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

DEFAULT_AVG_CHUNK_SIZE: Final = 512 * 1024  # REAPI's recommendation
CUT_IN_THREAD_FROM: Final = 1024 * 1024
"""Buffers this large are cut in a worker thread (about a millisecond a megabyte)."""


@dataclass(frozen=True)
class FastCdcParams:
    avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1024 <= self.avg_chunk_size <= 1024 * 1024:
            raise ValueError(
                f"the average chunk size must be 1 KiB to 1 MiB, not {self.avg_chunk_size}"
            )
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"the seed must be a 32-bit unsigned number, not {self.seed}")

    @property
    def min_size(self) -> int:
        return self.avg_chunk_size // 4

    @property
    def max_size(self) -> int:
        return self.avg_chunk_size * 4

    def chunker(self) -> FastCDC:
        return FastCDC(
            self.avg_chunk_size,
            min_size=self.min_size,
            max_size=self.max_size,
            normalized_chunking=2,
            seed=self.seed,
        )

    def to_proto(self) -> re_pb2.FastCdc2020Params:
        return re_pb2.FastCdc2020Params(avg_chunk_size_bytes=self.avg_chunk_size, seed=self.seed)

    @classmethod
    def from_proto(cls, params: re_pb2.FastCdc2020Params) -> FastCdcParams:
        return cls(params.avg_chunk_size_bytes, params.seed)


def _cuts(chunker: FastCDC, buffer: bytes, max_size: int, final: bool) -> list[int]:
    """The lengths of the chunks at the start of ``buffer`` that no later data can change:
    a cut is settled once the ``max_size`` bytes after the chunk's start are known (or the
    buffer is the blob's end, ``final``)."""
    lengths = []
    for chunk in chunker.cut_buf(buffer):
        if not final and chunk.offset + max_size > len(buffer):
            break
        lengths.append(chunk.length)
    return lengths


async def chunks_of(data: AsyncIterable[bytes], params: FastCdcParams) -> AsyncGenerator[bytes]:
    """The FastCDC chunks of a blob arriving in pieces, holding at most a few megabytes."""
    chunker = params.chunker()
    window = max(4 * params.max_size, 4 * 1024 * 1024)
    pending = b""
    async for piece in data:
        pending += piece
        if len(pending) < window:
            continue
        start = 0
        for length in await _cut(chunker, pending, params.max_size, final=False):
            yield pending[start : start + length]
            start += length
        pending = pending[start:]
    start = 0
    for length in await _cut(chunker, pending, params.max_size, final=True):
        yield pending[start : start + length]
        start += length


async def _cut(chunker: FastCDC, buffer: bytes, max_size: int, *, final: bool) -> list[int]:
    if len(buffer) < CUT_IN_THREAD_FROM:
        return _cuts(chunker, buffer, max_size, final)
    return await anyio.to_thread.run_sync(_cuts, chunker, buffer, max_size, final)


def file_chunks(path: Path, params: FastCdcParams) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a file, read through a memory map (blocking)."""
    return [(c.offset, c.length) for c in params.chunker().cut_file(str(path))]
