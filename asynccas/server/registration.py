"""How the services are registered with grpc: request bodies are parsed here, leniently, so that
a malformed one reaches its handler as a ``MalformedRequest`` and is answered INVALID_ARGUMENT
(through ``server/errors.py``) instead of grpc's own UNKNOWN or INTERNAL with a traceback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError, Message

from asynccas.errors import InvalidArgument

logger = logging.getLogger(__name__)
LOG_INTERVAL: Final = 10.0
"""Seconds between log lines about malformed requests: a client sending nothing else must not
flood the log."""


class MalformedRequest:
    """Stands in for a request whose body does not parse as its message type."""

    __slots__ = ("message_type", "reason")
    _last_logged = -LOG_INTERVAL
    _unlogged = 0

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason

    def error(self) -> InvalidArgument:
        """The error to answer with; logs one short line now and then."""
        cls = type(self)
        cls._unlogged += 1
        now = time.monotonic()
        if now - cls._last_logged >= LOG_INTERVAL:
            logger.warning(
                "%d malformed request(s) refused in the last %.0f s, e.g. a %s: %s",
                cls._unlogged, min(now - cls._last_logged, 1e9), self.message_type, self.reason,
            )  # fmt: skip
            cls._last_logged, cls._unlogged = now, 0
        return InvalidArgument(f"the request is not a valid {self.message_type}: {self.reason}")


def lenient(message: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that returns a ``MalformedRequest`` rather than raising."""
    name = message.DESCRIPTOR.name
    parse = message.FromString

    def deserialize(body: bytes) -> Any:
        try:
            return parse(body)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return MalformedRequest(name, str(exc) or type(exc).__name__)

    return deserialize


def register(
    server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def unary(
    handler: Any, request: type[Message], response: type[Message] | None = None
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary handler; without ``response`` the handler returns the encoded bytes itself."""
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=lenient(request),
        response_serializer=response.SerializeToString if response is not None else None,
    )


def server_streaming(
    handler: Any, request: type[Message], response: type[Message]
) -> grpc.RpcMethodHandler[Any, Any]:
    return _streaming(grpc.unary_stream_rpc_method_handler, handler, request, response)


def client_streaming(
    handler: Any, request: type[Message], response: type[Message]
) -> grpc.RpcMethodHandler[Any, Any]:
    return _streaming(grpc.stream_unary_rpc_method_handler, handler, request, response)


def _streaming(
    make: Callable[..., grpc.RpcMethodHandler[Any, Any]],
    handler: Any,
    request: type[Message],
    response: type[Message],
) -> grpc.RpcMethodHandler[Any, Any]:
    return make(
        handler,
        request_deserializer=lenient(request),
        response_serializer=response.SerializeToString,
    )
