"""The Capabilities service: what this server offers, so clients configure themselves."""

from __future__ import annotations

import grpc

from asynccas import compression
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from asynccas._proto.build.bazel.semver import semver_pb2
from asynccas.chunking import FastCdcParams
from asynccas.digest import DigestFunction
from asynccas.resource_names import validate_instance_name
from asynccas.server.calls import record_instance
from asynccas.server.errors import Context, unary_rpc
from asynccas.server.registration import register, unary


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    def __init__(
        self,
        *,
        max_batch_total_size_bytes: int,
        allow_action_cache_updates: bool,
        max_blob_size: int = 0,
        fast_cdc: FastCdcParams | None = None,
    ) -> None:
        self._capabilities = re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                # SHA256 first: clients that take the first entry get the common default.
                digest_functions=[
                    re_pb2.DigestFunction.Value.ValueType(f.proto_value) for f in DigestFunction
                ],
                action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                    update_enabled=allow_action_cache_updates
                ),
                cache_priority_capabilities=re_pb2.PriorityCapabilities(
                    priorities=[re_pb2.PriorityCapabilities.PriorityRange()]
                ),
                max_batch_total_size_bytes=max_batch_total_size_bytes,
                # A cache stores symlink targets verbatim; it has no root to escape.
                symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
                supported_compressors=compression.SUPPORTED,
                supported_batch_update_compressors=compression.SUPPORTED,
                max_cas_blob_size_bytes=max_blob_size,
                split_blob_support=True,
                splice_blob_support=True,
                fast_cdc_2020_params=(fast_cdc or FastCdcParams()).to_proto(),
            ),
            deprecated_api_version=semver_pb2.SemVer(major=2),
            low_api_version=semver_pb2.SemVer(major=2),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        register(
            server,
            "build.bazel.remote.execution.v2.Capabilities",
            {
                "GetCapabilities": unary(
                    self.GetCapabilities, re_pb2.GetCapabilitiesRequest, re_pb2.ServerCapabilities
                )
            },
        )

    @unary_rpc
    async def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: Context
    ) -> re_pb2.ServerCapabilities:
        validate_instance_name(request.instance_name)
        # Open to every caller: the answer holds nothing but this server's settings, and
        # Bazel before 3 sends no --remote_header on this call (nor on ByteStream), so
        # requiring a token here would lock such clients out of reads they may make.
        record_instance(request.instance_name)
        return self._capabilities
