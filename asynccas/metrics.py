"""Prometheus metrics: what a server counts, and how ``/metrics`` serves them.

Off unless ``enable()`` is called (``asynccas serve --metrics-address``): code that counts asks
``active()`` first, so a server without metrics pays one global read per count. With
``--workers``, every process writes its values to files in a shared directory
(prometheus_client's multiprocess mode) and the first process serves their sum, so one scrape
sees the whole server.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Final

import anyio

from asynccas.errors import CasError

MULTIPROCESS_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Metrics:
    """The server's metrics, registered once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.rpcs = Counter(
            "asynccas_rpcs", "RPCs answered, by method and status code", ["method", "code"]
        )
        self.rpc_seconds = Histogram(
            "asynccas_rpc_duration_seconds",
            "Time from a call's arrival to its answer, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
        )
        self.received_bytes = Counter(
            "asynccas_received_bytes", "Request bytes received, by method", ["method"]
        )
        self.sent_bytes = Counter(
            "asynccas_sent_bytes", "Response bytes sent, by method", ["method"]
        )
        self.find_missing = Counter(
            "asynccas_find_missing_digests",
            "Distinct digests asked about by FindMissingBlobs, by answer (present: a cache hit)",
            ["result"],
        )
        self.action_cache = Counter(
            "asynccas_action_cache_lookups",
            "GetActionResult answers: hit, or miss (including results whose outputs are gone)",
            ["result"],
        )
        self.evicted_bytes = Counter(
            "asynccas_evicted_bytes", "Bytes of blobs evicted to keep under --max-size"
        )
        self.evictions = Counter("asynccas_eviction_passes", "Eviction passes that evicted blobs")
        self.stored_bytes = Gauge(
            "asynccas_stored_bytes",
            "Bytes of blobs the store holds (sampled; counted against --max-size)",
            multiprocess_mode="max",
        )
        self.backend_errors = Counter(
            "asynccas_backend_errors",
            "Failed calls to a backend (redis, disk, sqlite), answered UNAVAILABLE",
            ["backend"],
        )
        self.uploads_in_flight = Gauge(
            "asynccas_uploads_in_flight",
            "ByteStream uploads streaming now",
            multiprocess_mode="livesum",
        )


_active: Metrics | None = None


def enable() -> Metrics:
    """Create the metrics (once per process) and start counting."""
    global _active
    if _active is None:
        _active = Metrics()
    return _active


def active() -> Metrics | None:
    return _active


def prepare_multiprocess(directory: Path) -> None:
    """Make this process and the workers it starts write metrics into ``directory``. Must run
    before prometheus_client is imported: it picks its value store at import."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # a previous server's values
        stale.unlink()
    os.environ[MULTIPROCESS_DIR_VARIABLE] = str(directory)


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sum, as Prometheus wants)."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def start_http_server(host: str, port: int) -> tuple[Any, int]:
    """Serve ``/metrics`` on a thread of its own; returns the server and its port."""
    import prometheus_client
    from prometheus_client import CollectorRegistry, multiprocess

    registry: Any = prometheus_client.REGISTRY
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


async def sample_store_size(get_total_size: Any, interval: float = 5.0) -> None:
    """Keep ``asynccas_stored_bytes`` current while the server runs."""
    metrics = enable()
    while True:
        started = time.monotonic()
        with contextlib.suppress(CasError):  # an outage: counted and logged where it happens
            metrics.stored_bytes.set(await get_total_size())
        await anyio.sleep(max(0.0, interval - (time.monotonic() - started)))
