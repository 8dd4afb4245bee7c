"""The Prometheus endpoint scraped over HTTP after real traffic, and `kvstore stats --metrics`."""

from __future__ import annotations

import time
import urllib.request

import pytest

from kvstore.cli import main
from kvstore.client import Client
from kvstore.server.app import ServerThread
from kvstore.stats_table import Figures, quantile, scrape
from tests.conftest import make_config, make_kv, make_tokens


def _scrape(port: int) -> Figures:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    assert text.startswith(b"# HELP")
    return scrape(f"127.0.0.1:{port}")


def _traffic(address: str, layout) -> None:
    with Client(address, "model-a", layout, transport="stream") as a, \
            Client(address, "model-b", layout, transport="arena") as b:
        tokens, kv = make_tokens(48), make_kv(layout, 48)
        assert a.put(tokens, kv) == 48
        a.get(tokens)
        a.get(make_tokens(32, seed=7))  # two misses
        assert b.lookup(tokens) == 0  # model-b is another namespace: 3 misses
        b.put(tokens[:16], kv[:, :, :, :16])
        with b.lease(tokens[:16]):
            b.get(tokens[:16])


def test_metrics_move_with_real_traffic(tmp_path, layout):
    config = make_config(tmp_path / "d", **{"server.metrics_listen": "127.0.0.1:0"})
    with ServerThread(config) as srv:
        before = _scrape(srv.metrics_port)
        _traffic(srv.address, layout)
        with Client(srv.address, "model-a", layout, transport="arena") as a, \
                a.lease(make_tokens(48)):
            during = _scrape(srv.metrics_port)
        after = _scrape(srv.metrics_port)
    assert before.value("kvstore_requests_total") < after.value("kvstore_requests_total")
    assert after.value("kvstore_requests_total", method="Put") == 1  # model-a streams
    assert after.value("kvstore_requests_total", method="CommitExtents") == 1  # b: same host
    # latency histograms per RPC
    assert after.value("kvstore_request_seconds_count", method="Get") >= 2
    assert after.value("kvstore_request_seconds_bucket", method="Get", le="+Inf") >= 2
    assert quantile(after, "kvstore_request_seconds", 0.99, method="Lookup") is not None
    # hits and misses per namespace and tier
    ns_a = {"tenant": "", "namespace": "model-a"}
    assert after.value("kvstore_namespace_chunks_total", **ns_a, tier="cpu", result="hit") >= 3
    assert after.value("kvstore_namespace_chunks_total", **ns_a, tier="any", result="miss") >= 2
    assert after.value("kvstore_namespace_chunks_total", namespace="model-b", tier="any",
                       result="miss") >= 3
    assert after.value("kvstore_tier_hits_total", tier="cpu") > 0
    # bytes in and out
    assert after.value("kvstore_bytes_total", direction="received") > 0
    assert after.value("kvstore_bytes_total", direction="sent") > 0
    # leases held while a lease is open; arena and disk fill
    assert during.value("kvstore_leases_held") == 1
    assert after.value("kvstore_leases_held") == 0
    assert 0 < after.value("kvstore_tier_fill_ratio", tier="cpu") < 1
    assert after.value("kvstore_tier_capacity_bytes", tier="disk") > 0
    assert after.value("kvstore_disk_free_bytes") > 0
    assert after.value("kvstore_ready") == 1 and after.value("kvstore_draining") == 0
    # per-tenant usage (no tokens: no tenant rows); evictions and corrupt counters exist
    assert "kvstore_tier_evictions_total" in after.samples
    assert "kvstore_corrupt_reads_total" in after.samples


def test_corrupt_objects_and_evictions_are_counted(tmp_path, layout):
    config = make_config(tmp_path / "d", **{"server.metrics_listen": "127.0.0.1:0",
                                            "engine.write_policy": "write-through",
                                            "tiers.cpu.capacity_bytes": 100_000})
    tokens, kv = make_tokens(256), make_kv(layout, 256)  # 16 chunks of 25 KB: DRAM evicts
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        c.put(tokens, kv)
        files = sorted((tmp_path / "d").rglob("*.kvc"))
        for f in files:
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x5A
            f.write_bytes(bytes(data))
        c.get(tokens)  # reads the first chunk that DRAM lost from disk: corrupt
        figures = _scrape(srv.metrics_port)
    assert figures.value("kvstore_tier_evictions_total", tier="cpu") > 0
    assert figures.value("kvstore_tier_corrupt_total", tier="disk") >= 1


@pytest.mark.slow  # the daemon compiles the numba kvq decoder on first use
def test_codec_decode_time_is_measured(tmp_path, layout):
    config = make_config(tmp_path / "d", **{"server.metrics_listen": "127.0.0.1:0"})
    with ServerThread(config) as srv, \
            Client(srv.address, "kvq", layout, codec="balanced", transport="stream",
                   timeout_s=300) as c:  # the first kvq object compiles numba code
        tokens = make_tokens(32)
        c.put(tokens, make_kv(layout, 32))
        c.get(tokens)  # decoded by the daemon
        figures = _scrape(srv.metrics_port)
    assert figures.value("kvstore_codec_seconds_count", op="decode") == 2
    assert figures.value("kvstore_codec_seconds_sum", op="decode") > 0


def test_tenant_usage_is_exported(tmp_path, layout):
    config = make_config(tmp_path / "d", **{"server.metrics_listen": "127.0.0.1:0",
                                            "server.tokens": {"t": "alice"},
                                            "tenants.quota_bytes": {"alice": "1MiB"}})
    with ServerThread(config) as srv, Client(srv.address, "m", layout, token="t") as c:
        c.put(make_tokens(32), make_kv(layout, 32))
        figures = _scrape(srv.metrics_port)
    assert figures.value("kvstore_tenant_used_bytes", tenant="alice") > 0
    assert figures.value("kvstore_tenant_quota_bytes", tenant="alice") == 1 << 20
    assert figures.value("kvstore_namespace_chunks_total", tenant="alice", tier="any") == 2


@pytest.mark.redis
def test_redis_breaker_state_per_node(tmp_path, layout, redis_server):
    config = make_config(tmp_path / "d", **{
        "server.metrics_listen": "127.0.0.1:0", "tiers.redis.url": redis_server.url,
        "tiers.redis.timeout_s": 0.2, "tiers.redis.circuit_open_s": 30.0})
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        c.put(make_tokens(16), make_kv(layout, 16))
        node = f"127.0.0.1:{redis_server.port}"
        assert _scrape(srv.metrics_port).value("kvstore_redis_breaker_open", node=node) == 0
        redis_server.kill()
        for seed in range(4):  # each put writes through to Redis: failures open the breaker
            c.put(make_tokens(16, seed=100 + seed), make_kv(layout, 16))
        deadline = time.monotonic() + 10
        while _scrape(srv.metrics_port).value("kvstore_redis_breaker_open", node=node) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_stats_cli_shows_the_scraped_figures(tmp_path, layout, capsys):
    config = make_config(tmp_path / "d", **{"server.metrics_listen": "127.0.0.1:0"})
    with ServerThread(config) as srv:
        _traffic(srv.address, layout)
        figures = _scrape(srv.metrics_port)
        assert main(["stats", "--metrics", f"127.0.0.1:{srv.metrics_port}"]) == 0
    out = capsys.readouterr().out
    for title in ("tiers", "RPCs", "namespaces", "daemon"):
        assert title in out
    gets = int(figures.value("kvstore_requests_total", method="Get"))
    row = next(line for line in out.splitlines() if "│ Get " in line)
    assert row.split("│")[2].strip() == str(gets)  # the calls column
    assert "model-a" in out and "model-b" in out
