"""Connections to Redis for asynccas: one URL says which deployment, the provider builds the client.

URL forms::

    redis://[:password@]host:port/db            a single server
    rediss://...                                the same over TLS
    redis+cluster://host:port[,host:port...]    Redis Cluster (any reachable nodes)
    redis+sentinel://host:port[,host:port...]/service[/db]   Sentinel-managed primary

Every ``redis.exceptions.RedisError`` is translated once, here, into BackendUnavailable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
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

Client = redis_async.Redis | AsyncRedisCluster


@dataclass(frozen=True)
class RedisProvider:
    url: str
    password: str | None = None
    max_connections: int = 64
    # Short timeouts: during an outage requests should fail fast with UNAVAILABLE
    # rather than queue up; the pool reconnects by itself once Redis is back.
    connect_timeout: float = 1.0
    socket_timeout: float = 5.0

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

    async def close(self, client: Client) -> None:
        """Close ``client``'s connections, and for a Sentinel-managed primary, the sentinels'."""
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()

    async def send_encoded(self, client: Client, commands: bytes, replies: int) -> list[Any]:
        """Send commands already encoded in RESP, on one pooled connection, and read replies.

        For hot paths only: redis-py encodes each argument in Python, which for a command of
        thousands of members costs far more than building the RESP text in a few joins.
        Not for a cluster, which must route each command by its key's slot.
        """
        if not isinstance(client, redis_async.Redis):
            raise TypeError("send_encoded needs a single Redis server, not a cluster")
        pool = client.connection_pool
        for attempt in range(2):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_packed_command(commands)
                return [await connection.read_response() for _ in range(replies)]
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                # A pooled connection may predate a Redis restart: retry once on a new one,
                # as redis-py does. The hot-path commands are idempotent.
                await _drop(connection)
                if attempt:
                    raise
            except BaseException:
                await _drop(connection)
                raise
            finally:
                await pool.release(connection)
        raise AssertionError("unreachable")

    @contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Translate redis-py errors into asynccas errors at this one boundary."""
        try:
            yield
        except redis.exceptions.RedisError as exc:
            raise BackendUnavailable(
                f"Redis at {self.display_url} failed while trying to {action}: {exc}"
            ) from exc
        except OSError as exc:  # raised by some connection paths instead of ConnectionError
            raise BackendUnavailable(
                f"Redis at {self.display_url} is unreachable while trying to {action}: {exc}"
            ) from exc


async def _drop(connection: Any) -> None:
    """Close a connection whose replies may be unread, so that no later user reads them."""
    with anyio.CancelScope(shield=True):
        await connection.disconnect()


def _host_port(item: str) -> tuple[str, int]:
    host, _, port = item.rpartition(":")
    return (host or "127.0.0.1"), int(port or 6379)
