"""What the daemon counts about the calls it serves: requests, latencies, bytes, namespaces.

The servicer counts into one ``ServiceCounters``; the Stats RPC and the Prometheus
endpoint (``kvstore.server.prometheus``) both read it, so the two never disagree.
Tier figures (hits, misses, fill, leases, breakers) are read from the engine at
scrape time instead.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

# Upper bounds (seconds) of the latency buckets: 0.25 ms (an arena lease) to 10 s.
LATENCY_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0, 2.5, 5.0, 10.0)
MAX_NAMESPACES = 256  # distinct (tenant, namespace) label pairs; the rest count as "_other"
OTHER_NAMESPACE = "_other"


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram of seconds, as Prometheus exposes it (not thread-safe)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; +Inf last
    total_s: float = 0.0
    num: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds
        self.num += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations <= it), +Inf last."""
        out, running = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total_s, self.num)


NamespaceLabel = tuple[str, str]  # (tenant or "", namespace name)


@dataclass(slots=True)
class CounterSnapshot:
    """A consistent copy of every ServiceCounters figure."""

    requests: dict[str, int]  # RPCs started, by method
    failures: dict[tuple[str, str], int]  # (method, status code name) -> RPCs that failed
    received_bytes: int  # object bytes accepted by Put and PutBlob
    sent_bytes: int  # data bytes sent by Get, GetBlob and FetchBlocks
    corrupt_reads: int  # stored objects that failed verification on a read (misses)
    latency: dict[str, Histogram]  # method -> seconds per call
    codec: dict[str, Histogram]  # "decode" / "encode" -> seconds per object, daemon side
    # (tenant, namespace, tier or "any", "hit" | "miss") -> chunks asked for by Lookup/Get
    namespace_chunks: dict[tuple[str, str, str, str], int]
    is_ready: bool  # health SERVING: the arena is prefaulted and no drain has begun
    is_draining: bool  # SIGTERM (or stop) received


@dataclass(slots=True)
class ServiceCounters:
    """Counters of the RPCs a daemon served since it started. Thread-safe."""

    started_monotonic: float = field(default_factory=time.monotonic)
    requests: dict[str, int] = field(default_factory=dict)  # RPCs started, by method
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, status) -> n
    received_bytes: int = 0  # object bytes accepted by Put
    sent_bytes: int = 0  # data bytes streamed by Get
    corrupt_reads: int = 0  # stored objects that failed to parse on a read (served as misses)
    latency: dict[str, Histogram] = field(default_factory=dict)  # method -> call durations
    codec: dict[str, Histogram] = field(default_factory=dict)  # op -> per-object durations
    namespace_chunks: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    is_ready: bool = False
    is_draining: bool = False
    _namespaces: set[NamespaceLabel] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, method: str) -> None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1

    def count_failure(self, method: str, status: str) -> None:
        with self._lock:
            self.failures[(method, status)] = self.failures.get((method, status), 0) + 1

    def observe_latency(self, method: str, seconds: float) -> None:
        with self._lock:
            self.latency.setdefault(method, Histogram()).observe(seconds)

    def observe_codec(self, op: str, seconds: float) -> None:
        """One object's decode (kvq -> tensor) or encode (tensor -> raw object) in the daemon."""
        with self._lock:
            self.codec.setdefault(op, Histogram()).observe(seconds)

    def count_lookup(self, tenant: str | None, namespace: str, num_chunks: int,
                     num_found: int, found_per_tier: dict[str, int]) -> None:
        """A Lookup or Get of ``num_chunks`` chunks: the leading ``num_found`` were stored
        somewhere, ``found_per_tier[t]`` of them in tier t."""
        with self._lock:
            label = (tenant or "", namespace)
            if label not in self._namespaces:
                if len(self._namespaces) >= MAX_NAMESPACES:
                    label = (tenant or "", OTHER_NAMESPACE)
                else:
                    self._namespaces.add(label)
            for tier, found in (("any", num_found), *found_per_tier.items()):
                for result, n in (("hit", found), ("miss", num_chunks - found)):
                    key = (*label, tier, result)
                    self.namespace_chunks[key] = self.namespace_chunks.get(key, 0) + n

    def add_bytes(self, *, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.received_bytes += received
            self.sent_bytes += sent

    def count_corrupt_read(self) -> None:
        with self._lock:
            self.corrupt_reads += 1

    def mark_ready(self) -> None:
        with self._lock:
            self.is_ready = not self.is_draining

    def mark_draining(self) -> None:
        with self._lock:
            self.is_ready, self.is_draining = False, True

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def num_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    @property
    def num_failed_requests(self) -> int:
        with self._lock:
            return sum(self.failures.values())

    def snapshot(self) -> CounterSnapshot:
        with self._lock:
            return CounterSnapshot(
                dict(self.requests), dict(self.failures), self.received_bytes,
                self.sent_bytes, self.corrupt_reads,
                {m: h.copy() for m, h in self.latency.items()},
                {m: h.copy() for m, h in self.codec.items()},
                dict(self.namespace_chunks), self.is_ready, self.is_draining)
