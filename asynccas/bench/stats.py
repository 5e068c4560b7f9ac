"""What the load harness measures per operation: counts, bytes, errors by status, corruptions,
latencies in a mergeable log-bucket histogram, and completions per second over time."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

_MIN: Final = 1e-6  # 1 µs: the smallest latency bucket
_GROWTH: Final = 1.02  # each bucket 2% wider than the last: percentiles within 2%


@dataclass
class Histogram:
    counts: Counter[int] = field(default_factory=Counter)
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[int(math.log(max(seconds, _MIN) / _MIN, _GROWTH))] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float:
        """The latency below which ``p`` percent of samples fall (bucket upper edge)."""
        if not self.count:
            return 0.0
        rank = p / 100 * self.count
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self.max, _MIN * _GROWTH ** (bucket + 1))
        return self.max

    def buckets(self) -> list[tuple[float, int]]:
        """(lower edge in seconds, count) for each non-empty bucket, for plotting."""
        return [(_MIN * _GROWTH**b, self.counts[b]) for b in sorted(self.counts)]

    def to_json(self) -> dict[str, Any]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "count": self.count,
                "total": self.total, "max": self.max}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        return cls(Counter({int(k): v for k, v in data["counts"].items()}), data["count"],
                   data["total"], data["max"])  # fmt: skip


@dataclass
class OpStats:
    """Everything measured for one kind of operation (one RPC, or one composite action)."""

    histogram: Histogram = field(default_factory=Histogram)
    bytes: int = 0
    items: int = 0  # digests or blobs handled, where one op handles several
    errors: Counter[str] = field(default_factory=Counter)
    corruptions: int = 0
    per_second: Counter[int] = field(default_factory=Counter)  # completions by second since start

    def merge(self, other: OpStats) -> None:
        self.histogram.merge(other.histogram)
        self.bytes += other.bytes
        self.items += other.items
        self.errors.update(other.errors)
        self.corruptions += other.corruptions
        self.per_second.update(other.per_second)

    def to_json(self) -> dict[str, Any]:
        h = self.histogram
        return {
            "histogram": h.to_json(), "bytes": self.bytes, "items": self.items,
            "errors": dict(self.errors), "corruptions": self.corruptions,
            "per_second": {str(k): v for k, v in self.per_second.items()},
            # For readers of the JSON; the histogram above is what reports are made from.
            "p50_ms": h.percentile(50) * 1e3, "p90_ms": h.percentile(90) * 1e3,
            "p99_ms": h.percentile(99) * 1e3, "max_ms": h.max * 1e3,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OpStats:
        return cls(
            Histogram.from_json(data["histogram"]), data["bytes"], data["items"],
            Counter(data["errors"]), data["corruptions"],
            Counter({int(k): v for k, v in data["per_second"].items()}),
        )  # fmt: skip
