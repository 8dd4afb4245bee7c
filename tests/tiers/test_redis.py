"""The Redis tier against real standalone redis-server processes (and one Sentinel)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from kvstore.codec.raw import encode_raw
from kvstore.config import MiB, RedisTierConfig
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.layout import KVLayout
from kvstore.tiers.base import Tier
from kvstore.tiers.circuit import CircuitBreaker
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.redis_nodes import (
    VectoredConnection,
    parse_redis_url,
    sendmsg_all,
    use_zero_copy_packer,
)
from tests.redis_servers import RedisFactory, RedisProcess, free_port

TINY = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, chunk_tokens=16)
SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=256)


def make_object(seed: int, layout: KVLayout = TINY) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_raw(rng.standard_normal(layout.chunk_shape).astype("<f2"), layout)


def make_key(seed: int) -> ChunkKey:
    return ChunkKey(np.random.default_rng(seed).bytes(32))


def tier_for(url: str, **overrides) -> RedisTier:
    fields = dict(timeout_s=0.3, circuit_open_s=0.3, topology_refresh_s=0.2, stats_cache_s=0.0)
    return RedisTier(RedisTierConfig(url=url, **{**fields, **overrides}))


# -- addresses and breaker (no server) -------------------------------------------------------


def test_parse_redis_url_reads_every_scheme() -> None:
    plain = parse_redis_url("redis://user:pw@h:7000/2")
    assert (plain.kind, plain.hosts, plain.db, plain.username, plain.password, plain.tls) == (
        "auto", (("h", 7000),), 2, "user", "pw", False)
    assert parse_redis_url("rediss://h").tls and parse_redis_url("rediss://h").hosts[0][1] == 6379
    cluster = parse_redis_url("redis+cluster://a:1,b:2,[::1]:3")
    assert (cluster.kind, cluster.hosts) == ("cluster", (("a", 1), ("b", 2), ("::1", 3)))
    assert parse_redis_url("redis://a:1,b:2").kind == "cluster"
    sentinel = parse_redis_url("redis+sentinel://s1:26379,s2:26379/mymaster/1")
    assert (sentinel.kind, sentinel.service, sentinel.db) == ("sentinel", "mymaster", 1)
    assert "pw" not in plain.redacted()


@pytest.mark.parametrize("url", ["http://h:1", "redis://h:port", "redis://", "redis+sentinel://s:1",
                                 "redis://h:1/x"])
def test_parse_redis_url_raises_when_malformed(url: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_redis_url(url)


@pytest.mark.parametrize("overrides", [{"url": None}, {"key_prefix": "kvs:{x}"},
                                       {"max_value_bytes": 600 * MiB}, {"timeout_s": 0.0},
                                       {"ttl_s": -1.0}])
def test_tier_raises_when_config_invalid(overrides: dict) -> None:
    config = RedisTierConfig(url="redis://127.0.0.1:1")
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises(InvalidArgument):
        RedisTier(config)


def test_sendmsg_all_delivers_every_byte_in_order_across_partial_sends() -> None:
    import socket
    import threading

    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force partial sends
    rng = np.random.default_rng(0)
    buffers = [rng.bytes(n) for n in (7, 300_000, 1, 65_536, 2_000_000, 12)]
    buffers += [memoryview(rng.bytes(10))[2:9]] + [b"x"] * 1500  # > IOV_MAX buffers
    received = bytearray()

    def drain() -> None:
        while len(received) < sum(len(b) for b in buffers):
            received.extend(right.recv(1 << 16))

    reader = threading.Thread(target=drain)
    reader.start()
    sendmsg_all(left, buffers)
    reader.join(timeout=30)
    left.close()
    right.close()
    assert bytes(received) == b"".join(bytes(b) for b in buffers)


def test_tier_clients_send_pipelines_vectored_but_tls_ones_as_redis_py_does() -> None:
    plain = use_zero_copy_packer(redis.Redis(port=1))
    assert plain.connection_pool.connection_class is VectoredConnection
    tls = use_zero_copy_packer(redis.Redis(port=1, ssl=True))
    assert tls.connection_pool.connection_class is redis.SSLConnection


def test_circuit_breaker_opens_after_failures_and_probes_once_per_interval() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, open_s=1.0, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.allow() and not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 1.5
    assert breaker.allow() and not breaker.allow()  # exactly one probe
    breaker.record_failure()
    assert not breaker.allow()
    now[0] = 3.0
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


# -- a real standalone server ----------------------------------------------------------------


@pytest.mark.redis
def test_get_returns_bit_exact_object_after_put(redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url)
    assert isinstance(tier, Tier) and tier.mode == "standalone"
    key, obj = make_key(1), make_object(1)
    assert tier.get(key) is None
    assert tier.put(key, obj) is True
    assert tier.get(key) == obj
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.errors) == (1, 1, 1, 0)
    assert stats.read_bytes == stats.written_bytes == len(obj)
    assert stats.info["state"] == "up" and stats.num_objects == 1
    tier.close()


@pytest.mark.redis
def test_put_and_get_many_round_trip_when_chunks_are_smollm2_sized(
        redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url, timeout_s=5.0)
    objs = [make_object(i, SMOLLM2) for i in range(3)]
    keys = [make_key(i) for i in range(3)]
    assert len(objs[0]) > 5_800_000
    assert tier.put_many(list(zip(keys, objs, strict=True))) == [True] * 3
    assert tier.get_many([keys[2], make_key(99), keys[0]]) == [objs[2], None, objs[0]]
    tier.close()


@pytest.mark.redis
def test_keys_are_prefix_and_hex_when_written(redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url, key_prefix="t1:")
    key = make_key(2)
    tier.put(key, make_object(2))
    assert redis_server.client().keys("*") == [b"t1:" + key.hex().encode()]
    assert tier.redis_key(key) == b"t1:" + key.hex().encode()


@pytest.mark.redis
def test_put_refused_when_larger_than_max_value_bytes(redis_server: RedisProcess) -> None:
    obj = make_object(3)
    tier = tier_for(redis_server.url, max_value_bytes=len(obj) - 1)
    assert tier.put_many([(make_key(3), obj), (make_key(4), obj[:10])]) == [False, True]
    assert tier.get(make_key(3)) is None
    assert tier.stats().info["refused_too_large"] == "1"


@pytest.mark.redis
def test_chunks_expire_when_ttl_set(redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url, ttl_s=0.2)
    tier.put(make_key(5), make_object(5))
    assert 0 < redis_server.client().pttl(tier.redis_key(make_key(5))) <= 200
    time.sleep(0.3)
    assert tier.get(make_key(5)) is None


@pytest.mark.redis
def test_corrupt_value_is_a_counted_miss_and_deleted(redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url)
    raw = redis_server.client()
    key, obj = make_key(6), make_object(6)
    tier.put(key, obj)
    damaged = bytearray(obj)
    damaged[len(obj) // 2] ^= 0xFF
    raw.hset(tier.redis_key(key), b"o", bytes(damaged))
    raw.set(tier.redis_key(make_key(7)), b"not a KVC1 object")  # a plain value (old format)
    assert tier.get_many([key, make_key(7)]) == [None, None]
    stats = tier.stats()
    assert (stats.corrupt, stats.misses, stats.hits, stats.errors) == (2, 2, 0, 0)
    assert raw.dbsize() == 0


@pytest.mark.redis
def test_copied_value_is_corrupt_miss_not_other_chunk(redis_server: RedisProcess) -> None:
    # Issue #17 item 1: a valid value copied to another chunk's key must not be
    # served as that other chunk.
    tier = tier_for(redis_server.url)
    raw = redis_server.client()
    tier.put(make_key(1), make_object(1))
    tier.put(make_key(2), make_object(2))
    assert raw.copy(tier.redis_key(make_key(1)), tier.redis_key(make_key(2)), replace=True)
    assert tier.get(make_key(2)) is None
    stats = tier.stats()
    assert (stats.corrupt, stats.misses, stats.hits) == (1, 1, 0)
    assert not raw.exists(tier.redis_key(make_key(2)))
    assert tier.get(make_key(1)) == make_object(1)


@pytest.mark.redis
def test_put_replaces_plain_value_written_before_records(redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url, ttl_s=5.0)
    raw = redis_server.client()
    raw.set(tier.redis_key(make_key(3)), make_object(3))
    assert tier.put(make_key(3), make_object(3))
    assert tier.get(make_key(3)) == make_object(3)
    assert 0 < raw.pttl(tier.redis_key(make_key(3))) <= 5000


@pytest.mark.redis
def test_full_redis_evicts_without_errors_when_allkeys_lru(redis_factory: RedisFactory) -> None:
    server = redis_factory.server("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    tier = tier_for(server.url)
    obj = make_object(8, KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, chunk_tokens=64))
    keys = [make_key(100 + i) for i in range(120)]  # ~15 MB into 4 MB
    for batch in range(0, len(keys), 10):
        assert tier.put_many([(k, obj) for k in keys[batch : batch + 10]]) == [True] * 10
    found = tier.contains_many(keys)
    stats = tier.stats()
    assert stats.evictions > 0 and stats.errors == 0 and stats.capacity_bytes == 4 * MiB
    assert not all(found) and found[-1]
    assert tier.get(keys[-1]) == obj


@pytest.mark.redis
def test_tier_starts_down_and_connects_when_redis_appears(redis_factory: RedisFactory) -> None:
    port = free_port()
    tier = tier_for(f"redis://127.0.0.1:{port}")
    assert tier.stats().info["state"] == "down" and not tier.is_up and tier.mode == "unknown"
    assert tier.get(make_key(9)) is None and tier.put(make_key(9), make_object(9)) is False
    assert tier.contains_many([make_key(9)]) == [False]
    assert tier.stats().errors == 3
    redis_factory.server(port=port)
    time.sleep(0.35)  # the connect breaker lets one probe through per circuit_open_s
    assert tier.put(make_key(9), make_object(9)) is True and tier.is_up
    assert tier.get(make_key(9)) == make_object(9)


@pytest.mark.redis
def test_hung_server_times_out_to_misses_and_breaker_stops_calls(
        redis_server: RedisProcess) -> None:
    tier = tier_for(redis_server.url)
    key, obj = make_key(10), make_object(10)
    tier.put(key, obj)
    redis_server.pause()
    try:
        started = time.monotonic()
        assert [tier.get(key) for _ in range(2)] == [None, None]  # two timeouts open it
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        assert [tier.get(key) for _ in range(20)] == [None] * 20
        assert time.monotonic() - started < 0.25  # refused by the breaker, no timeouts
        assert tier.stats().info["state"] == "down"
    finally:
        redis_server.resume()
    time.sleep(0.35)
    assert tier.get(key) == obj and tier.is_up
    assert tier.stats().errors == 22


@pytest.mark.redis
def test_killed_server_gives_misses_then_hits_after_restart(redis_factory: RedisFactory) -> None:
    server = redis_factory.server()
    tier = tier_for(server.url)
    key, obj = make_key(11), make_object(11)
    tier.put(key, obj)
    server.kill()
    assert tier.get(key) is None and tier.put(key, obj) is False
    restarted = redis_factory.server(port=server.port)
    assert restarted.port == server.port
    time.sleep(0.35)
    assert tier.put(key, obj) is True and tier.get(key) == obj


@pytest.mark.redis
def test_sentinel_url_reaches_the_master(redis_factory: RedisFactory) -> None:
    master = redis_factory.server()
    sentinel_port = free_port()
    conf = redis_factory.root / f"sentinel-{sentinel_port}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"sentinel monitor kvs 127.0.0.1 {master.port} 1\n")
    redis_factory.server("--sentinel", port=sentinel_port, config_file=str(conf))
    tier = tier_for(f"redis+sentinel://127.0.0.1:{sentinel_port}/kvs")
    assert tier.mode == "sentinel"
    assert tier.put(make_key(12), make_object(12)) is True
    assert master.client().exists(tier.redis_key(make_key(12))) == 1
    assert tier.get(make_key(12)) == make_object(12)
