"""Connections to Redis for asynccas: one URL says which deployment, the provider builds the client.

URL forms::

    redis://[:password@]host:port/db            a single server
    rediss://...                                the same over TLS
    redis+cluster://host:port[,host:port...]    Redis Cluster (any reachable nodes)
    redis+sentinel://host:port[,host:port...]/service[/db]   Sentinel-managed primary

Every ``redis.exceptions.RedisError`` is translated once, here, into BackendUnavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import hiredis
import redis
import redis.asyncio as redis_async
import redis.exceptions
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.retry import Retry

from asynccas.errors import BackendUnavailable
from asynccas.outages import Outages, outages

Client = redis_async.Redis | AsyncRedisCluster


@dataclass(frozen=True)
class RedisProvider:
    url: str
    password: str | None = None
    max_connections: int = 64
    # Short timeouts: during an outage requests should fail fast with UNAVAILABLE
    # rather than queue up; the pool reconnects by itself once Redis is back (a stopped
    # Redis refuses connections at once, whatever this is). Not shorter than 5 s: a TLS
    # handshake costs the client 30-50 ms of CPU here, and twenty opened at once took
    # up to 0.9 s, so 1 s failed healthy connections under load.
    connect_timeout: float = 5.0
    socket_timeout: float = 5.0
    # How long a call may wait for one of the max_connections to come free: under a burst
    # the calls queue (redis-py's pool would fail them with "Too many connections"), but a
    # call that cannot get a connection in this long reports Redis as unavailable.
    pool_wait: float = 10.0

    @property
    def is_cluster(self) -> bool:
        return self.url.startswith("redis+cluster://")

    @property
    def display_url(self) -> str:
        """The URL without any password, for logs and error messages."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def _options(self) -> dict[str, Any]:
        return {
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.socket_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            "decode_responses": False,
            # Given explicitly, or redis-py reads package metadata from disk (a blocking
            # call on the event loop) for every new connection.
            "driver_info": DriverInfo(name="redis-py", lib_version=redis.__version__),
        }

    def client(self) -> Client:
        parts = urlsplit(self.url)
        password = self.password or (unquote(parts.password) if parts.password else None)
        if parts.scheme in ("redis", "rediss", "unix"):
            return redis_async.Redis.from_url(
                self.url, password=password, max_connections=self.max_connections, **self._options()
            )
        hosts = [_host_port(item) for item in parts.netloc.rsplit("@", 1)[-1].split(",")]
        if parts.scheme == "redis+cluster":
            return AsyncRedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in hosts],
                password=password,
                max_connections=self.max_connections,
                **self._options(),
            )
        if parts.scheme == "redis+sentinel":
            path = [p for p in parts.path.split("/") if p]
            if not path:
                raise ValueError(f"{self.display_url}: a sentinel URL needs /service_name")
            db = int(path[1]) if len(path) > 1 else 0
            # The sentinels' own connections get the options too: by default redis-py passes
            # them only socket_* ones, and its driver-info lookup then blocks the event loop.
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, sentinel_kwargs=self._options(), password=password, db=db, **self._options()
            )
            primary: redis_async.Redis = sentinel.master_for(
                path[0], max_connections=self.max_connections
            )
            return primary
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {self.display_url}")

    def encoded_lane(self, client: Client) -> EncodedLane:
        """Connections beside ``client``'s pool for commands already encoded in RESP."""
        return EncodedLane(client, self.socket_timeout, self.max_connections)

    async def close(self, client: Client) -> None:
        """Close ``client``'s connections, and for a Sentinel-managed primary, the sentinels'."""
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()

    @cached_property
    def outages(self) -> Outages:
        return outages("Redis", self.display_url)

    @contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Translate redis-py errors into asynccas errors at this one boundary."""
        try:
            yield
        except redis.exceptions.RedisError as exc:
            self.outages.failed(exc)
            raise BackendUnavailable(
                f"Redis at {self.display_url} failed while trying to {action}: {exc}"
            ) from exc
        except OSError as exc:  # raised by some connection paths instead of ConnectionError
            self.outages.failed(exc)
            raise BackendUnavailable(
                f"Redis at {self.display_url} is unreachable while trying to {action}: {exc}"
            ) from exc
        self.outages.succeeded()


class ConnectionTurns:
    """Calls through one client take turns on its ``max_connections`` connections.

    redis-py's pools fail a call that finds every connection busy ("Too many connections":
    79 of 7,600 operations from 500 clients against a healthy Redis); here it waits for a
    turn instead, up to ``pool_wait`` seconds. One limit for every topology: a cluster's
    per-node pools then never see more calls than the limit either.
    """

    def __init__(self, provider: RedisProvider) -> None:
        self._provider = provider
        self._turns = asyncio.Semaphore(provider.max_connections)

    @asynccontextmanager
    async def take(self, action: str) -> AsyncIterator[None]:
        """Wait for a turn, then run the body with Redis errors translated (``errors``)."""
        provider = self._provider
        try:
            async with asyncio.timeout(provider.pool_wait):
                await self._turns.acquire()
        except TimeoutError:
            raise BackendUnavailable(
                f"Redis at {provider.display_url}: all {provider.max_connections} connections"
                f" stayed busy for {provider.pool_wait:g} s while trying to {action}"
            ) from None
        try:
            with provider.errors(action):
                yield
        finally:
            self._turns.release()


class RedisClientOwner:
    """A store with one client of ``provider``'s: made at ``start``, closed at ``stop``, and
    calls taking turns on its connections (the action cache's and the blob-info cache's)."""

    def __init__(self, provider: RedisProvider) -> None:
        self.provider = provider
        self._client: Client | None = None
        self._turns = ConnectionTurns(provider)

    async def start(self) -> None:
        self._client = self.provider.client()

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await self.provider.close(client)

    def _connected(self) -> Client:
        assert self._client is not None, f"start() the {type(self).__name__} first"
        return self._client


class EncodedLane:
    """Commands already encoded in RESP, written straight onto connections of the lane's own.

    For hot paths only. redis-py encodes each argument in Python, and its pool and reply path
    cost more than the command itself: a 1,000-member ZMSCORE took 175 us of CPU through
    redis-py's pool and 75 us written and read here. redis-py still opens each connection, so
    TLS, AUTH, SELECT and finding a Sentinel's primary stay its business; the lane then writes
    on the connection's streams and reads the replies with hiredis. Not for a cluster, which
    must route each command by its key's slot.
    """

    def __init__(self, client: Client, timeout: float, max_connections: int) -> None:
        if not isinstance(client, redis_async.Redis):
            raise TypeError("an encoded lane needs a single Redis server, not a cluster")
        self._pool = client.connection_pool
        self._timeout = timeout
        # Beyond this many exchanges at once, the rest wait their turn rather than fail.
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_LaneConnection] = []

    async def send(self, commands: bytes, replies: int) -> list[Any]:
        """Send ``commands`` and return their ``replies`` replies, in order."""
        async with self._slots:
            return await self._send(commands, replies)

    async def _send(self, commands: bytes, replies: int) -> list[Any]:
        for attempt in range(2):
            fresh = not self._idle
            connection = await self._connect() if fresh else self._idle.pop()
            try:
                # asyncio's own timeout: the lane's streams are asyncio's, and it costs half
                # of anyio's cancel scope on this path.
                async with asyncio.timeout(self._timeout):
                    answers = await connection.exchange(commands, replies)
            except (OSError, EOFError, TimeoutError, redis.exceptions.ConnectionError) as exc:
                await self._close(connection)
                # An idle connection may predate a Redis restart: retry once on a new one, as
                # redis-py does. The hot-path commands are idempotent.
                if fresh or attempt:
                    if isinstance(exc, TimeoutError):
                        raise redis.exceptions.TimeoutError("Redis did not answer in time") from exc
                    raise redis.exceptions.ConnectionError(f"connection lost: {exc}") from exc
                continue
            except BaseException:
                await self._close(connection)  # replies may be left unread
                raise
            for answer in answers:
                if isinstance(answer, redis.exceptions.ResponseError):
                    # Some errors belong to the connection, not the command: READONLY from a
                    # primary that Sentinel has since demoted, LOADING from a restarting
                    # server. A new connection finds the current primary.
                    await self._close(connection)
                    raise answer
            self._idle.append(connection)
            return answers
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._close(connection)

    async def _connect(self) -> _LaneConnection:
        connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()
            # The streams redis-py opened and authenticated; from here on only the lane
            # reads and writes them.
            reader, writer = connection._reader, connection._writer
            if reader is None or writer is None:
                raise redis.exceptions.ConnectionError("redis-py opened no streams")
        except BaseException:
            await _drop(connection)
            raise
        return _LaneConnection(connection, reader, writer)

    async def _close(self, connection: _LaneConnection) -> None:
        await _drop(connection.owner)


class _LaneConnection:
    __slots__ = ("owner", "parser", "reader", "writer")

    def __init__(
        self, owner: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.owner = owner
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader(replyError=redis.exceptions.ResponseError)

    async def exchange(self, commands: bytes, replies: int) -> list[Any]:
        # No drain: the replies cannot come before the commands are sent, and a request's
        # commands are bounded by the request's own size.
        self.writer.write(commands)
        answers: list[Any] = []
        parser, reader = self.parser, self.reader
        while len(answers) < replies:
            answer = parser.gets()
            if answer is False:
                data = await reader.read(1 << 16)
                if not data:
                    raise EOFError("Redis closed the connection")
                parser.feed(data)
            else:
                answers.append(answer)
        if parser.has_data():  # more than was asked for: the connection cannot be trusted
            raise redis.exceptions.ConnectionError("Redis sent replies nobody asked for")
        return answers


async def _drop(connection: Any) -> None:
    """Close a connection whose replies may be unread, so that no later user reads them."""
    with anyio.CancelScope(shield=True):
        await connection.disconnect()


def _host_port(item: str) -> tuple[str, int]:
    host, _, port = item.rpartition(":")
    return (host or "127.0.0.1"), int(port or 6379)
