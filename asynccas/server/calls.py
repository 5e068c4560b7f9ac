"""What happens around every RPC when a server checks credentials, counts metrics or keeps an
access log: one grpc.aio interceptor, installed only when one of them is on (a server with
none of them pays nothing per call).

The interceptor identifies the caller from the call's metadata before the handler runs; the
handler, once it has parsed the instance name, calls ``authorize`` (the instance is in the
request body, which an interceptor does not see). Afterwards the interceptor counts the call
and logs it, with the status code the handler answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from asynccas.auth import EVERYONE, Access, AccessPolicy, Identity
from asynccas.digest import DEFAULT_FUNCTION, DigestFunction
from asynccas.errors import CasError
from asynccas.metrics import Metrics
from asynccas.server.errors import message_of, status_code
from asynccas.storage.context import RequestContext

access_logger: Final = logging.getLogger("asynccas.access")


@dataclass(slots=True)
class Call:
    """One RPC under way, as the interceptor and ``authorize`` see it."""

    method: str
    peer: str
    identity: Identity
    policy: AccessPolicy | None
    instance: str = ""
    received: int = 0
    sent: int = 0


_current: ContextVar[Call | None] = ContextVar("asynccas_call", default=None)


def authorize(
    access: Access,
    instance: str,
    context: grpc.aio.ServicerContext[Any, Any] | None = None,
    digest_function: DigestFunction | int = DEFAULT_FUNCTION,
) -> RequestContext:
    """Raise Unauthenticated or PermissionDenied unless the current caller may ``access``
    ``instance``; otherwise the request context for the storage calls that follow (with the
    call's deadline, when ``context`` is given). Handlers call it once they know the instance;
    outside an observed call (no policy) everyone may do everything."""
    if isinstance(digest_function, int):
        digest_function = _function_named_by(digest_function)
    remaining = context.time_remaining() if context is not None else None
    deadline = None if remaining is None else time.monotonic() + remaining
    call = _current.get()
    if call is None:
        return RequestContext(instance, digest_function, deadline)
    call.instance = instance
    if call.policy is not None:
        call.policy.authorize(call.identity, access, instance)
    return RequestContext(instance, digest_function, deadline, call.identity)


def _function_named_by(value: int) -> DigestFunction:
    """A request's ``digest_function`` field: the default when unset (each digest's own
    function is then inferred from its length) or not one this server knows (the digests'
    parsing names that problem, after authorization)."""
    try:
        return DigestFunction.from_proto(value) if value else DEFAULT_FUNCTION
    except CasError:
        return DEFAULT_FUNCTION


def record_instance(instance: str) -> None:
    """Name the instance of a call that needs no rights (Capabilities), for the access log."""
    call = _current.get()
    if call is not None:
        call.instance = instance


def _size(message: object) -> int:
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, Message):
        return message.ByteSize()
    return 0  # a MalformedRequest


class CallObserver(grpc.aio.ServerInterceptor):
    """Identifies callers (``policy``), counts calls (``metrics``) and logs them
    (``access_log``); any of the three may be off."""

    def __init__(
        self,
        *,
        policy: AccessPolicy | None = None,
        metrics: Metrics | None = None,
        access_log: bool = False,
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self.access_log = access_log

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # grpc's handlers are namedtuples, which its type stubs do not say.
        handler: Any = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        metadata = details.invocation_metadata
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method, metadata))
        if handler.stream_unary is not None:
            return handler._replace(
                stream_unary=self._client_streaming(handler.stream_unary, method, metadata)
            )
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._server_streaming(handler.unary_stream, method, metadata)
            )
        return handler  # no bidirectional RPCs here

    @asynccontextmanager
    async def _observing(self, method: str, metadata: Any, context: Any) -> AsyncIterator[Call]:
        """Identify the caller, run the body as the current call, then count and log it; a
        caller whose credentials do not verify gets UNAUTHENTICATED before the body runs."""
        call = Call(method, context.peer(), EVERYONE, self.policy)
        _current.set(call)  # each RPC runs in a task of its own: this does not leak
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            if self.policy is not None:
                call.identity = self.policy.identify(metadata)
            yield call
        except CasError as exc:  # from identify: handlers answer their own errors
            failure = exc
            await context.abort(status_code(exc), message_of(exc))
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._end(call, context, time.perf_counter() - started, failure)

    def _unary(self, behavior: Any, method: str, metadata: Any) -> Any:
        async def observed(request: Any, context: Any) -> Any:
            async with self._observing(method, metadata, context) as call:
                call.received = _size(request)
                response = await behavior(request, context)
                call.sent = _size(response)
                return response
            raise AssertionError("unreachable: _observing re-raises or aborts")

        return observed

    def _client_streaming(self, behavior: Any, method: str, metadata: Any) -> Any:
        async def observed(requests: AsyncIterator[Any], context: Any) -> Any:
            async with self._observing(method, metadata, context) as call:
                response = await behavior(_counted(requests, call), context)
                call.sent = _size(response)
                return response
            raise AssertionError("unreachable: _observing re-raises or aborts")

        return observed

    def _server_streaming(self, behavior: Any, method: str, metadata: Any) -> Any:
        async def observed(request: Any, context: Any) -> AsyncIterator[Any]:
            async with self._observing(method, metadata, context) as call:
                call.received = _size(request)
                async for response in behavior(request, context):
                    call.sent += _size(response)
                    yield response

        return observed

    def _end(self, call: Call, context: Any, seconds: float, failure: BaseException | None) -> None:
        code = _code(context, failure)
        method = call.method
        if self.metrics is not None:
            self.metrics.rpcs.labels(method, code).inc()
            self.metrics.rpc_seconds.labels(method).observe(seconds)
            self.metrics.received_bytes.labels(method).inc(call.received)
            self.metrics.sent_bytes.labels(method).inc(call.sent)
        if self.access_log:
            access_logger.info(
                "%s %s instance=%r %s %s in=%d out=%d %.1fms",
                call.peer, call.identity.name or "-", call.instance, method, code,
                call.received, call.sent, seconds * 1000,
            )  # fmt: skip


def _code(context: Any, failure: BaseException | None) -> str:
    if isinstance(failure, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if code is None:
        return "OK" if failure is None else "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(code)


async def _counted(requests: AsyncIterator[Any], call: Call) -> AsyncIterator[Any]:
    async for request in requests:
        call.received += _size(request)
        yield request
