"""Request counters of the servicer and their Prometheus exposition.

The servicer counts into one ``ServiceCounters``; the Stats RPC and the
Prometheus endpoint both read it, so the two never disagree. Tier counters
(hits, misses per tier) are read from the engine at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.tiers.base import TierStats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServiceCounters:
    """Counters of the RPCs a daemon served since it started. Thread-safe."""

    started_monotonic: float = field(default_factory=time.monotonic)
    requests: dict[str, int] = field(default_factory=dict)  # RPCs started, by method
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, status) -> n
    received_bytes: int = 0  # object bytes accepted by Put
    sent_bytes: int = 0  # data bytes streamed by Get
    corrupt_reads: int = 0  # stored objects that failed to parse on a read (served as misses)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, method: str) -> None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1

    def count_failure(self, method: str, status: str) -> None:
        with self._lock:
            self.failures[(method, status)] = self.failures.get((method, status), 0) + 1

    def add_bytes(self, *, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.received_bytes += received
            self.sent_bytes += sent

    def count_corrupt_read(self) -> None:
        with self._lock:
            self.corrupt_reads += 1

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

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int], int, int, int]:
        """Copies of (requests, failures, received_bytes, sent_bytes, corrupt_reads)."""
        with self._lock:
            return (dict(self.requests), dict(self.failures), self.received_bytes,
                    self.sent_bytes, self.corrupt_reads)


class _Collector:
    """Prometheus collector reading ServiceCounters and tier stats at scrape time."""

    def __init__(self, counters: ServiceCounters,
                 tier_stats: Callable[[], Sequence[TierStats]]) -> None:
        self._counters = counters
        self._tier_stats = tier_stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        requests, failures, received, sent, corrupt = self._counters.snapshot()
        fam = CounterMetricFamily("kvstore_requests", "RPCs started", labels=["method"])
        for method, n in sorted(requests.items()):
            fam.add_metric([method], n)
        yield fam
        fam = CounterMetricFamily("kvstore_failed_requests", "RPCs ended with a non-OK status",
                                  labels=["method", "code"])
        for (method, code), n in sorted(failures.items()):
            fam.add_metric([method, code], n)
        yield fam
        fam = CounterMetricFamily("kvstore_bytes", "object bytes moved", labels=["direction"])
        fam.add_metric(["received"], received)
        fam.add_metric(["sent"], sent)
        yield fam
        yield CounterMetricFamily("kvstore_corrupt_reads", "stored objects served as misses "
                                  "because they failed to parse", value=corrupt)
        yield GaugeMetricFamily("kvstore_uptime_seconds", "seconds since start",
                                value=self._counters.uptime_s)
        yield from _tier_families(self._tier_stats())


def _tier_families(stats: Sequence[TierStats]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    counters = ("hits", "misses", "evictions", "corrupt", "errors", "puts", "read_bytes",
                "written_bytes")
    for name in counters:
        fam = CounterMetricFamily(f"kvstore_tier_{name}", f"tier {name}", labels=["tier"])
        for tier in stats:
            fam.add_metric([tier.name], getattr(tier, name))
        yield fam
    for name in ("used_bytes", "capacity_bytes", "num_objects"):
        fam = GaugeMetricFamily(f"kvstore_tier_{name}", f"tier {name}", labels=["tier"])
        for tier in stats:
            fam.add_metric([tier.name], getattr(tier, name))
        yield fam


class MetricsEndpoint:
    """A Prometheus HTTP endpoint on its own registry (several daemons may share a process)."""

    __slots__ = ("_httpd", "_thread", "port")

    def __init__(self, listen: str, counters: ServiceCounters,
                 tier_stats: Callable[[], Sequence[TierStats]]) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(counters, tier_stats))  # type: ignore[arg-type]
        self._httpd, self._thread = start_http_server(int(port), host.strip("[]") or "127.0.0.1",
                                                      registry=registry)
        self.port: int = self._httpd.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host or "127.0.0.1", self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
