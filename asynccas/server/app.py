"""One grpc.aio server carrying every service, on the caller's event loop."""

from __future__ import annotations

from types import TracebackType
from typing import Final, Self

import anyio
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asynccas import metrics
from asynccas.auth import AccessPolicy
from asynccas.server.action_cache import ActionCacheService
from asynccas.server.bytestream import ByteStreamService
from asynccas.server.calls import CallObserver
from asynccas.server.capabilities import CapabilitiesService
from asynccas.server.cas import ContentAddressableStorageService, response_limit
from asynccas.server.uploads import UploadSessions
from asynccas.storage.action_cache import ActionCacheStore
from asynccas.storage.base import Storage
from asynccas.threads import in_thread
from asynccas.transport import TRANSPORT_OPTIONS, ServerTls

DEFAULT_MAX_BATCH_BYTES: Final = 4 * 1024 * 1024
SERVICE_NAMES: Final = (
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "google.bytestream.ByteStream",
)


class CasServer:
    """Serves ``storage`` and ``action_cache``; ``async with`` starts it and stops it."""

    def __init__(
        self,
        storage: Storage,
        action_cache: ActionCacheStore,
        *,
        address: str = "127.0.0.1:50051",
        max_batch_total_size_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        allow_action_cache_updates: bool = True,
        check_action_results: bool = True,
        upload_idle_timeout: float = 600.0,
        stream_idle_timeout: float = 120.0,
        max_active_uploads: int = 1000,
        tls: ServerTls | None = None,
        access: AccessPolicy | None = None,
        count_metrics: bool = False,
        access_log: bool = False,
        reuse_port: bool = False,
        max_blob_size: int = 0,
    ) -> None:
        """``upload_idle_timeout``: seconds a parked upload (a stream that ended early) is kept
        for a resume; ``stream_idle_timeout``: seconds a Write stream may send nothing before
        its upload is abandoned; ``max_active_uploads``: Write streams at once, beyond which
        new ones get RESOURCE_EXHAUSTED (reads are not limited by it).

        ``tls``: serve TLS (mutual TLS if it names a client CA); ``access``: check callers'
        credentials and rights; ``count_metrics``: count calls in ``asynccas.metrics``;
        ``access_log``: log one line per call on the ``asynccas.access`` logger;
        ``reuse_port``: let other processes listen on the same port (``--workers``; off, a
        second server on a port in use fails instead of silently sharing it);
        ``max_blob_size``: the largest blob taken, advertised as ``max_cas_blob_size_bytes``
        (0: no limit)."""
        self.storage = storage
        self.action_cache = action_cache
        self.address = address
        self.max_batch_total_size_bytes = max_batch_total_size_bytes
        self.uploads = UploadSessions(
            storage, idle_timeout=upload_idle_timeout, max_active=max_active_uploads
        )
        # gRPC's own message limit must sit above the batch limit (plus per-blob framing)
        # so that an oversized batch meets our clear INVALID_ARGUMENT, not a transport error.
        message_limit = response_limit(max_batch_total_size_bytes)
        self.tls = tls
        self.access = access
        observer = None
        if access is not None or count_metrics or access_log:
            observer = CallObserver(
                policy=access,
                metrics=metrics.enable() if count_metrics else None,
                access_log=access_log,
            )
        self._server = grpc.aio.server(
            interceptors=[observer] if observer is not None else None,
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                ("grpc.so_reuseport", int(reuse_port)),
                *TRANSPORT_OPTIONS,
            ],
        )
        CapabilitiesService(
            max_batch_total_size_bytes=max_batch_total_size_bytes,
            allow_action_cache_updates=allow_action_cache_updates,
            max_blob_size=max_blob_size,
        ).add_to_server(self._server)
        ContentAddressableStorageService(
            storage,
            max_batch_total_size_bytes=max_batch_total_size_bytes,
            max_response_bytes=message_limit,
            max_blob_size=max_blob_size,
        ).add_to_server(self._server)
        ByteStreamService(
            storage,
            self.uploads,
            stream_idle_timeout=stream_idle_timeout,
            max_blob_size=max_blob_size,
        ).add_to_server(self._server)
        ActionCacheService(
            action_cache,
            storage,
            allow_updates=allow_action_cache_updates,
            check_completeness=check_action_results,
        ).add_to_server(self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port = 0
        self._task_group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        credentials = await in_thread(self.tls.credentials) if self.tls is not None else None
        if self.access is not None:
            await in_thread(self.access.load)
        await self.storage.start()
        await self.action_cache.start()
        try:
            try:
                if credentials is not None:
                    self.port = self._server.add_secure_port(self.address, credentials)
                else:
                    self.port = self._server.add_insecure_port(self.address)
            except RuntimeError as exc:  # grpc's way of saying the bind failed
                raise OSError(
                    f"could not listen on {self.address}: the address is in use or not"
                    " this machine's"
                ) from exc
            await self._server.start()
            for name in ("", *SERVICE_NAMES):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            self._task_group.start_soon(self.uploads.run_expiry)
            if self.access is not None:
                self._task_group.start_soon(self.access.watch)
        except BaseException:
            await self.action_cache.stop()
            await self.storage.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
            self._task_group = None
        with anyio.CancelScope(shield=True):
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace=5.0)
            await self.uploads.close()
            await self.action_cache.stop()
            await self.storage.stop()

    @property
    def target(self) -> str:
        """Where clients should connect, e.g. ``127.0.0.1:41234``."""
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"
