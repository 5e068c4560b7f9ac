"""The one place that knows gRPC status codes: domain errors in, statuses out."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
from google.rpc import status_pb2

from asynccas import errors
from asynccas.server.registration import MalformedRequest

logger = logging.getLogger(__name__)

_CODES: Final[list[tuple[type[errors.CasError], grpc.StatusCode]]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.UploadConflict, grpc.StatusCode.ABORTED),
    (errors.StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]

Context = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


MAX_MESSAGE_CHARS: Final = 1000
"""Error messages quote what the client sent; beyond this they are cut, so that a huge name
neither echoes back in full nor overflows gRPC's metadata limit (8 KiB), which turned an
INVALID_ARGUMENT into a transport failure."""


def message_of(error: BaseException) -> str:
    text = str(error)
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}... ({len(text)} characters in all)"


def status_code(error: errors.CasError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def rpc_status(error: errors.CasError | None) -> status_pb2.Status:
    """A google.rpc.Status for per-item results (batch RPCs); None means OK."""
    if error is None:
        return status_pb2.Status(code=grpc.StatusCode.OK.value[0])
    return status_pb2.Status(code=status_code(error).value[0], message=message_of(error))


async def _abort(context: Context, exc: BaseException) -> None:
    if isinstance(exc, errors.CasError):
        await context.abort(status_code(exc), message_of(exc))
    logger.exception("unexpected error in an RPC", exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {message_of(exc)}"
    )


def unary_rpc(
    handler: Callable[[S, Req, Context], Awaitable[Resp]],
) -> Callable[[S, Req, Context], Awaitable[Resp]]:
    """Map errors of a handler that returns one response (unary or client-streaming)."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("context.abort returned") from exc

    return wrapper


def streaming_rpc(
    handler: Callable[[S, Req, Context], AsyncIterator[Resp]],
) -> Callable[[S, Req, Context], AsyncIterator[Resp]]:
    """Map errors of a server-streaming handler (an async generator)."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: Context) -> AsyncIterator[Resp]:
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            async for response in handler(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper
