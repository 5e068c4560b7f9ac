"""The benchmarks' files floor (``benchmarks.floor --durable``) does the work it is said to do:
a blob is acknowledged only once its hash is checked and its file is in place, so its rate
is a fair floor for a server that loses nothing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from benchmarks.bazel_traffic import floor_server

CHUNK = 16 * 1024


def _write(address: str, resource_name: str, data: bytes) -> int:
    def requests() -> Iterator[bs_pb2.WriteRequest]:
        for start in range(0, len(data), CHUNK):
            yield bs_pb2.WriteRequest(
                resource_name=resource_name if start == 0 else "",
                write_offset=start,
                data=data[start : start + CHUNK],
                finish_write=start + CHUNK >= len(data),
            )

    with grpc.insecure_channel(address) as channel:
        response = bs_grpc.ByteStreamStub(channel).Write(requests(), timeout=30)
    return int(response.committed_size)


@pytest.mark.parametrize("fsync", [True, False])
def test_the_files_floor_keeps_a_checked_blob_in_a_file(tmp_path: Path, fsync: bool) -> None:
    data = os.urandom(300_000)
    hash_ = hashlib.sha256(data).hexdigest()
    root = tmp_path / "files"
    with floor_server(tmp_path, files=root, fsync=fsync) as target:
        name = f"uploads/0d4c7c8e-0000-4000-8000-000000000000/blobs/{hash_}/{len(data)}"
        assert _write(target.address, name, data) == len(data)
        assert (root / hash_[:2] / hash_).read_bytes() == data
        assert list((root / "tmp").iterdir()) == []  # the temp file was linked, then removed

        wrong = f"uploads/0d4c7c8e-0000-4000-8000-000000000001/blobs/{'0' * 64}/{len(data)}"
        with pytest.raises(grpc.RpcError) as refused:
            _write(target.address, wrong, data)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not (root / "00").exists()
