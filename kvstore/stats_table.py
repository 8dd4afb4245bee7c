"""``kvstore stats --metrics HOST:PORT``: the Prometheus figures of a daemon as tables.

It reads the same families the endpoint serves (``kvstore.server.prometheus``), so
the table and a Prometheus dashboard never disagree. Loads no server code.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import Unavailable


@dataclass(slots=True)
class Figures:
    """Samples of one scrape: name -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(
        default_factory=lambda: defaultdict(list))

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(v for got, v in self.samples.get(name, ())
                   if all(got.get(k) == want for k, want in labels.items()))

    def rows(self, name: str) -> list[tuple[dict[str, str], float]]:
        return list(self.samples.get(name, ()))


def scrape(address: str, timeout_s: float = 10.0) -> Figures:
    """Read ``http://ADDRESS/metrics`` (ADDRESS is HOST:PORT, or a full URL)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = address if "://" in address else f"http://{address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            text = response.read().decode()
    except OSError as exc:
        raise Unavailable(f"cannot scrape {url}: {exc}") from exc
    figures = Figures()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures.samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return figures


def quantile(figures: Figures, name: str, q: float, **labels: str) -> float | None:
    """The ``q`` quantile of histogram ``name`` (its bucket's upper bound), None if empty."""
    buckets = sorted((float(lab["le"]), v) for lab, v in figures.rows(name + "_bucket")
                     if all(lab.get(k) == w for k, w in labels.items()))
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= target:
            return bound
    return buckets[-1][0]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return "> 10 s" if seconds == float("inf") else f"≤ {seconds * 1000:g} ms"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _bytes(n: float) -> str:
    return human_bytes(int(n))


def tables(f: Figures) -> list[Any]:
    """rich Tables: daemon, tiers, RPCs, namespaces, Redis breakers, codec, tenants."""
    from rich.table import Table

    daemon = Table(title="daemon", show_header=False)
    for label, value in (
        ("uptime", f"{f.value('kvstore_uptime_seconds'):.0f} s"),
        ("ready / draining", f"{int(f.value('kvstore_ready'))} / "
                             f"{int(f.value('kvstore_draining'))}"),
        ("bytes in / out", f"{_bytes(f.value('kvstore_bytes_total', direction='received'))} / "
                           f"{_bytes(f.value('kvstore_bytes_total', direction='sent'))}"),
        ("corrupt reads", f"{f.value('kvstore_corrupt_reads_total'):.0f}"),
        ("leases held", f"{f.value('kvstore_leases_held'):.0f}"),
        ("disk free", _bytes(f.value("kvstore_disk_free_bytes"))),
    ):
        daemon.add_row(label, value)
    out = [daemon, _tier_table(f), _rpc_table(f)]
    ns = Table(title="namespaces (chunks asked for by Lookup/Get)")
    for col in ("tenant", "namespace", "tier", "hits", "misses"):
        ns.add_column(col, justify="right" if col in ("hits", "misses") else "left")
    keys = sorted({(lab["tenant"], lab["namespace"], lab["tier"])
                   for lab, _ in f.rows("kvstore_namespace_chunks_total")})
    for tenant, name, tier in keys:
        hits = f.value("kvstore_namespace_chunks_total", tenant=tenant, namespace=name,
                       tier=tier, result="hit")
        misses = f.value("kvstore_namespace_chunks_total", tenant=tenant, namespace=name,
                         tier=tier, result="miss")
        ns.add_row(tenant or "—", name, tier, f"{hits:.0f}", f"{misses:.0f}")
    out.append(ns)
    out += _small_tables(f)
    return out


def _tier_table(f: Figures) -> Any:
    from rich.table import Table

    table = Table(title="tiers")
    for col in ("tier", "used / capacity", "fill", "objects", "hits", "misses", "evictions",
                "corrupt", "errors"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for labels, used in f.rows("kvstore_tier_used_bytes"):
        t = labels["tier"]
        cap = f.value("kvstore_tier_capacity_bytes", tier=t)
        table.add_row(t, f"{_bytes(used)} / {_bytes(cap) if cap else '—'}",
                      f"{100 * used / cap:.1f}%" if cap else "—",
                      *(f"{f.value(n, tier=t):.0f}" for n in (
                          "kvstore_tier_num_objects", "kvstore_tier_hits_total",
                          "kvstore_tier_misses_total", "kvstore_tier_evictions_total",
                          "kvstore_tier_corrupt_total", "kvstore_tier_errors_total")))
    return table


def _rpc_table(f: Figures) -> Any:
    from rich.table import Table

    table = Table(title="RPCs (latency: upper bound of the bucket holding the quantile)")
    for col in ("method", "calls", "failed", "p50", "p99", "mean"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for labels, calls in sorted(f.rows("kvstore_requests_total"), key=lambda r: r[0]["method"]):
        m = labels["method"]
        count = f.value("kvstore_request_seconds_count", method=m)
        mean = f.value("kvstore_request_seconds_sum", method=m) / count if count else None
        failed = f.value("kvstore_failed_requests_total", method=m)
        table.add_row(m, f"{calls:.0f}", f"{failed:.0f}",
                      _ms(quantile(f, "kvstore_request_seconds", 0.5, method=m)),
                      _ms(quantile(f, "kvstore_request_seconds", 0.99, method=m)),
                      "—" if mean is None else f"{mean * 1000:.2f} ms")
    return table


def _small_tables(f: Figures) -> list[Any]:
    from rich.table import Table

    out = []
    breakers = f.rows("kvstore_redis_breaker_open")
    if breakers:
        table = Table(title="Redis nodes")
        table.add_column("node")
        table.add_column("circuit breaker")
        for labels, is_open in sorted(breakers, key=lambda r: r[0]["node"]):
            table.add_row(labels["node"], "OPEN (calls refused)" if is_open else "closed")
        out.append(table)
    codec = f.rows("kvstore_codec_seconds_count")
    if codec:
        table = Table(title="codec in the daemon")
        for col in ("op", "objects", "mean", "p99"):
            table.add_column(col, justify="left" if col == "op" else "right")
        for labels, count in codec:
            op = labels["op"]
            mean = f.value("kvstore_codec_seconds_sum", op=op) / count if count else 0.0
            table.add_row(op, f"{count:.0f}", f"{mean * 1000:.2f} ms",
                          _ms(quantile(f, "kvstore_codec_seconds", 0.99, op=op)))
        out.append(table)
    used = f.rows("kvstore_tenant_used_bytes")
    if used:
        table = Table(title="tenants")
        for col in ("tenant", "used", "quota", "refused", "evicted"):
            table.add_column(col, justify="left" if col == "tenant" else "right")
        for labels, n in sorted(used, key=lambda r: r[0]["tenant"]):
            t = labels["tenant"]
            quota = [v for lab, v in f.rows("kvstore_tenant_quota_bytes") if lab["tenant"] == t]
            table.add_row(t, _bytes(n), _bytes(quota[0]) if quota else "—",
                          f"{f.value('kvstore_tenant_quota_refusals_total', tenant=t):.0f}",
                          f"{f.value('kvstore_tenant_quota_evictions_total', tenant=t):.0f}")
        out.append(table)
    return out
