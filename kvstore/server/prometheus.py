"""The Prometheus endpoint (``server.metrics_listen``): every figure an operator runs by.

Read at scrape time from the servicer's ``ServiceCounters`` and from the engine, so
nothing is counted twice. ``kvstore stats --metrics HOST:PORT`` renders the same
families as tables (``kvstore.stats_table``). Families (all prefixed ``kvstore_``):

- requests_total{method}, failed_requests_total{method,code}, request_seconds{method}
  (histogram), bytes_total{direction}, uptime_seconds, ready, draining
- namespace_chunks_total{tenant,namespace,tier,result}: chunks asked for by Lookup
  and Get, "hit"/"miss" per tier ("any" = stored anywhere)
- tier_{hits,misses,evictions,corrupt,errors,puts,read_bytes,written_bytes}_total{tier},
  tier_{used_bytes,capacity_bytes,num_objects,fill_ratio}{tier}
- corrupt_reads_total, leases_held, disk_free_bytes
- redis_breaker_open{node} (1 = open: calls refused), codec_seconds{op} (histogram)
- tenant_used_bytes{tenant}, tenant_quota_bytes{tenant},
  tenant_quota_refusals_total{tenant}, tenant_quota_evictions_total{tenant}
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import Any

from kvstore.server.metrics import CounterSnapshot, Histogram, ServiceCounters

log = logging.getLogger(__name__)

_TIER_COUNTERS = ("hits", "misses", "evictions", "corrupt", "errors", "puts", "read_bytes",
                  "written_bytes")
_TIER_GAUGES = ("used_bytes", "capacity_bytes", "num_objects")


def _histogram(name: str, doc: str, label: str, hists: dict[str, Histogram]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    fam = HistogramMetricFamily(name, doc, labels=[label])
    for value, hist in sorted(hists.items()):
        fam.add_metric([value], hist.cumulative(), sum_value=hist.total_s)
    return fam


class _Collector:
    """Prometheus collector over ServiceCounters and the engine, read at scrape time."""

    def __init__(self, counters: ServiceCounters, engine: Any) -> None:
        self._counters = counters
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        snap = self._counters.snapshot()
        yield from _service_families(snap, self._counters.uptime_s)
        stats = self._engine.stats()
        yield from _tier_families(stats)
        yield from _engine_families(self._engine, stats)


def _service_families(snap: CounterSnapshot, uptime_s: float) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fam: Any = CounterMetricFamily("kvstore_requests", "RPCs started", labels=["method"])
    for method, n in sorted(snap.requests.items()):
        fam.add_metric([method], n)
    yield fam
    fam = CounterMetricFamily("kvstore_failed_requests", "RPCs ended with a non-OK status",
                              labels=["method", "code"])
    for (method, code), n in sorted(snap.failures.items()):
        fam.add_metric([method, code], n)
    yield fam
    yield _histogram("kvstore_request_seconds", "duration of an RPC in the daemon", "method",
                     snap.latency)
    yield _histogram("kvstore_codec_seconds", "daemon-side codec time per object "
                     "(decode: kvq to tensor; encode: tensor to raw object)", "op", snap.codec)
    fam = CounterMetricFamily("kvstore_bytes", "object bytes moved", labels=["direction"])
    fam.add_metric(["received"], snap.received_bytes)
    fam.add_metric(["sent"], snap.sent_bytes)
    yield fam
    fam = CounterMetricFamily("kvstore_namespace_chunks", "chunks asked for by Lookup and Get, "
                              "hit or miss per tier ('any': stored in some tier)",
                              labels=["tenant", "namespace", "tier", "result"])
    for labels, n in sorted(snap.namespace_chunks.items()):
        fam.add_metric(list(labels), n)
    yield fam
    yield CounterMetricFamily("kvstore_corrupt_reads", "stored objects served as misses "
                              "because they failed verification", value=snap.corrupt_reads)
    yield GaugeMetricFamily("kvstore_uptime_seconds", "seconds since start", value=uptime_s)
    yield GaugeMetricFamily("kvstore_ready", "1 when health is SERVING (arena prefaulted, "
                            "not draining)", value=int(snap.is_ready))
    yield GaugeMetricFamily("kvstore_draining", "1 once SIGTERM began the drain",
                            value=int(snap.is_draining))


def _tier_families(stats: list[Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fam: Any
    for name in _TIER_COUNTERS:
        fam = CounterMetricFamily(f"kvstore_tier_{name}", f"tier {name}", labels=["tier"])
        for tier in stats:
            fam.add_metric([tier.name], getattr(tier, name))
        yield fam
    for name in _TIER_GAUGES:
        fam = GaugeMetricFamily(f"kvstore_tier_{name}", f"tier {name}", labels=["tier"])
        for tier in stats:
            fam.add_metric([tier.name], getattr(tier, name))
        yield fam
    fam = GaugeMetricFamily("kvstore_tier_fill_ratio", "used_bytes / capacity_bytes "
                            "(arena fill for cpu, object files for disk)", labels=["tier"])
    for tier in stats:
        if tier.capacity_bytes:
            fam.add_metric([tier.name], tier.used_bytes / tier.capacity_bytes)
    yield fam


def _engine_families(engine: Any, stats: list[Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    by_name = {s.name: s for s in stats}
    leases = int(by_name["cpu"].info.get("leases", 0)) if "cpu" in by_name else 0
    yield GaugeMetricFamily("kvstore_leases_held", "live same-host leases pinning DRAM",
                            value=leases)
    fam: Any = GaugeMetricFamily("kvstore_disk_free_bytes", "free bytes of the disk tier's "
                            "filesystem", labels=["path"])
    disk = by_name.get("disk")
    if disk is not None and disk.info.get("path"):
        try:
            fam.add_metric([disk.info["path"]], shutil.disk_usage(disk.info["path"]).free)
        except OSError as exc:
            log.debug("disk_usage(%s) failed: %s", disk.info["path"], exc)
    yield fam
    fam = GaugeMetricFamily("kvstore_redis_breaker_open", "1 while a Redis node's circuit "
                            "breaker refuses calls", labels=["node"])
    for tier in engine.tiers:
        for node, is_open in getattr(tier, "breaker_states", dict)().items():
            fam.add_metric([node], int(is_open))
    yield fam
    usage = engine.tenant_usage()
    families: dict[str, Any] = {
        "used": GaugeMetricFamily("kvstore_tenant_used_bytes", "bytes a tenant stores "
                                  "(counted since the daemon started)", labels=["tenant"]),
        "quota": GaugeMetricFamily("kvstore_tenant_quota_bytes", "a tenant's byte quota",
                                   labels=["tenant"]),
        "refused": CounterMetricFamily("kvstore_tenant_quota_refusals", "puts refused "
                                       "over quota", labels=["tenant"]),
        "evicted": CounterMetricFamily("kvstore_tenant_quota_evictions", "objects a tenant's "
                                       "own over-quota puts evicted", labels=["tenant"]),
    }
    for tenant, u in sorted(usage.items()):
        families["used"].add_metric([tenant], u.used_bytes)
        if u.quota_bytes is not None:
            families["quota"].add_metric([tenant], u.quota_bytes)
        families["refused"].add_metric([tenant], u.num_refused)
        families["evicted"].add_metric([tenant], u.num_evicted)
    yield from families.values()


class MetricsEndpoint:
    """A Prometheus HTTP endpoint on its own registry (several daemons may share a process)."""

    __slots__ = ("_httpd", "_thread", "port")

    def __init__(self, listen: str, counters: ServiceCounters, engine: Any) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(counters, engine))  # type: ignore[arg-type]
        self._httpd, self._thread = start_http_server(int(port), host.strip("[]") or "127.0.0.1",
                                                      registry=registry)
        self.port: int = self._httpd.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host or "127.0.0.1", self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
