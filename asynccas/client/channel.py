"""What every asynccas caller of another REAPI server shares: the channel (endpoint, TLS,
bearer token, transport options), the status codes worth retrying, capped backoff with jitter,
and the small wire helpers. ``CasClient`` (the client library) and ``RemoteStorage`` (a storage
forwarding to another CAS) both build on it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Final

import anyio.to_thread
import grpc

from asynccas._proto.google.bytestream import bytestream_pb2 as bs_pb2
from asynccas.digest import Digest
from asynccas.transport import TRANSPORT_OPTIONS, ClientTls

TRANSIENT: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)
"""What the client library retries. ``RemoteStorage`` leaves ABORTED out (the seed's rule):
there it means a conflicting upload offset, which sending again cannot fix."""

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


def failed_send(exc: grpc.aio.AioRpcError) -> bool:
    """Whether ``exc`` is grpc.aio's report of its own send on a stream the server had already
    ended (INTERNAL, ``Failed "execute_batch"``), which replaces the server's status
    (grpc/grpc#36066): typically a server that answered an upload early, refusing it or
    having the blob. Like a dropped connection, it says nothing of why; QueryWriteStatus or a
    new stream does."""
    return exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (
        exc.debug_error_string() or ""
    )


def backoff_delay(attempt: int, first: float, cap: float) -> float:
    """Capped exponential backoff with jitter: the wait before retry ``attempt`` (0-based) is
    a random point in the upper half of ``min(cap, first * 2**attempt)``, so that many callers
    failing together do not retry together."""
    return float(min(cap, first * 2**attempt) * (0.5 + random.random() / 2))


async def open_channel(
    endpoint: str,
    *,
    tls: ClientTls | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to ``grpc://`` or ``grpcs://`` ``endpoint`` (TLS with ``tls``, ready-made
    ``credentials`` or the scheme); ``token`` goes out as ``authorization: Bearer TOKEN``;
    ``options`` come after asynccas's own, so they win."""
    target, secure = parse_endpoint(endpoint)
    all_options = list(
        dict(  # one value per key, the caller's where given
            [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *TRANSPORT_OPTIONS,
                *options,
            ]
        ).items()
    )
    interceptors = bearer_token_interceptors(token) if token else None
    if credentials is None and (secure or tls is not None):
        credentials = await anyio.to_thread.run_sync((tls or ClientTls()).credentials)
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=all_options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=all_options, interceptors=interceptors)


def check_token(token: str) -> None:
    if not (token.isprintable() and token.isascii() and token.strip() == token and token):
        raise ValueError("a bearer token must be printable ASCII without surrounding spaces")


def function_field(digests: Sequence[Digest]) -> Any:
    """A request's ``digest_function``: unset for the legacy functions, which a server infers
    from the hashes (servers older than REAPI 2.3 know no such field), else the function."""
    if not digests or digests[0].function.is_legacy:
        return 0
    return digests[0].function.proto_value


class _BearerToken:
    """Adds ``authorization: Bearer TOKEN`` to every call, on plain and TLS channels alike
    (grpc's call credentials refuse plain ones, and a TLS-terminating proxy is common)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        metadata.append(self._header)
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


# One class per kind of call: grpc.aio files an interceptor under the first kind it is an
# instance of, so a single class of all four would only ever see unary-unary calls.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def bearer_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    return [kind(token) for kind in kinds]


def status_code_of(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a ``google.rpc.Status.code`` number."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """``grpcs://host:port`` -> (``host:port``, True): the target and whether TLS is meant."""
    for scheme, secure in (
        ("grpc://", False),
        ("http://", False),
        ("grpcs://", True),
        ("https://", True),
    ):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/"), secure
    return endpoint, False


def read_response_data(message: bytes) -> bytes:
    """``ReadResponse.data`` taken from the message's bytes: a ReadResponse holds nothing else
    (field 10), and building the message would copy each megabyte twice more."""
    if message[:1] == b"\x52":  # field 10, length-delimited
        length = shift = 0
        for position in range(1, min(len(message), 11)):
            byte = message[position]
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                if position + 1 + length == len(message):
                    return message[position + 1 :]
                break
    data: bytes = bs_pb2.ReadResponse.FromString(message).data  # anything else, e.g. empty
    return data
