"""One grpc.aio server carrying every service, on the caller's event loop."""

from __future__ import annotations

from types import TracebackType
from typing import Final, Self

import anyio
import grpc

from asynccas.action_cache import ActionCacheStore
from asynccas.server.action_cache import ActionCacheService
from asynccas.server.bytestream import ByteStreamService
from asynccas.server.capabilities import CapabilitiesService
from asynccas.server.cas import ContentAddressableStorageService, response_limit
from asynccas.server.uploads import UploadSessions
from asynccas.storage.base import Storage
from asynccas.transport import TRANSPORT_OPTIONS

DEFAULT_MAX_BATCH_BYTES: Final = 4 * 1024 * 1024


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
    ) -> None:
        """``upload_idle_timeout``: seconds a parked upload (a stream that ended early) is kept
        for a resume; ``stream_idle_timeout``: seconds a Write stream may send nothing before
        its upload is abandoned; ``max_active_uploads``: Write streams at once, beyond which
        new ones get RESOURCE_EXHAUSTED (reads are not limited by it)."""
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
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                *TRANSPORT_OPTIONS,
            ]
        )
        CapabilitiesService(
            max_batch_total_size_bytes=max_batch_total_size_bytes,
            allow_action_cache_updates=allow_action_cache_updates,
        ).add_to_server(self._server)
        ContentAddressableStorageService(
            storage,
            max_batch_total_size_bytes=max_batch_total_size_bytes,
            max_response_bytes=message_limit,
        ).add_to_server(self._server)
        ByteStreamService(
            storage, self.uploads, stream_idle_timeout=stream_idle_timeout
        ).add_to_server(self._server)
        ActionCacheService(
            action_cache,
            storage,
            allow_updates=allow_action_cache_updates,
            check_completeness=check_action_results,
        ).add_to_server(self._server)
        self.port = 0
        self._task_group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        await self.storage.start()
        await self.action_cache.start()
        try:
            try:
                self.port = self._server.add_insecure_port(self.address)
            except RuntimeError as exc:  # grpc's way of saying the bind failed
                raise OSError(f"could not listen on {self.address}: {exc}") from exc
            await self._server.start()
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            self._task_group.start_soon(self.uploads.run_expiry)
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
            await self._server.stop(grace=5.0)
            await self.uploads.close()
            await self.action_cache.stop()
            await self.storage.stop()

    @property
    def target(self) -> str:
        """Where clients should connect, e.g. ``127.0.0.1:41234``."""
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"
