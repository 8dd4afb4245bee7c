"""Two in-process daemons sharing one 3-master Redis Cluster (DESIGN §8)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from redis.crc import key_slot

from kvstore.client import Client
from kvstore.config import Config, load_config
from kvstore.engine import Engine
from kvstore.keys import Namespace, prefix_keys
from kvstore.layout import KVLayout
from kvstore.server.app import ServerThread
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.redis import RedisTier
from tests.redis_servers import RedisClusterProcs

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=16)
NAMESPACE = "cluster-test@1"


def daemon_config(redis_url: str) -> Config:
    return load_config(overrides={
        "server.listen": "127.0.0.1:0", "tiers.cpu.capacity_bytes": "16MiB",
        "tiers.disk.enabled": False, "tiers.redis.url": redis_url,
        "tiers.redis.timeout_s": 0.3, "tiers.redis.circuit_open_s": 0.3,
        "tiers.redis.topology_refresh_s": 0.2,
    })


def start_daemon(redis_url: str) -> ServerThread:
    """A daemon whose engine is DRAM + the shared Redis tier (written through)."""
    config = daemon_config(redis_url)
    engine = Engine(config.engine, [CpuTier(config.tiers.cpu), RedisTier(config.tiers.redis)],
                    write_through_tiers={"redis"})
    return ServerThread(config, engine).start()


@pytest.fixture
def two_daemons(redis_cluster: RedisClusterProcs) -> Iterator[tuple[ServerThread, ServerThread]]:
    a = start_daemon(redis_cluster.cluster_url)
    b = start_daemon(redis_cluster.masters[1].url)  # one node: cluster mode detected
    try:
        yield a, b
    finally:
        for daemon in (a, b):
            daemon.stop(grace_s=0.5)


def make_kv(seed: int, num_chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, num_chunks * LAYOUT.chunk_tokens)
    kv = rng.standard_normal(LAYOUT.shape(len(tokens))).astype("<f2")
    return tokens, kv


def test_chunk_put_through_one_daemon_hits_bit_exact_through_another(two_daemons) -> None:
    a, b = two_daemons
    tokens, kv = make_kv(1, num_chunks=3)
    with Client(a.address, NAMESPACE, LAYOUT) as ca, Client(b.address, NAMESPACE, LAYOUT) as cb:
        assert ca.put(tokens, kv) == len(tokens)
        assert cb.lookup(tokens) == len(tokens)
        got = cb.get(tokens, as_numpy=True)
    assert got is not None and got.tobytes() == kv.tobytes()


def test_killed_master_gives_misses_not_failed_calls(
        redis_cluster: RedisClusterProcs, two_daemons) -> None:
    a, b = two_daemons
    ns = Namespace(NAMESPACE, LAYOUT)
    sequences = [make_kv(100 + i) for i in range(12)]
    with Client(a.address, NAMESPACE, LAYOUT) as ca, Client(b.address, NAMESPACE, LAYOUT) as cb:
        for tokens, kv in sequences:
            assert ca.put(tokens, kv) == len(tokens)
        redis_cluster.masters[0].kill()
        dead = [redis_cluster.master_of_slot(key_slot(b"kvs:" + prefix_keys(ns, t)[0].hex()
                                                       .encode())) == 0 for t, _ in sequences]
        assert 0 < sum(dead) < len(sequences)
        for (tokens, kv), on_dead_shard in zip(sequences, dead, strict=True):
            # every call succeeds; only the dead shard's chunks miss
            assert cb.lookup(tokens) == (0 if on_dead_shard else len(tokens))
            got = cb.get(tokens, as_numpy=True)
            assert (got is None) if on_dead_shard else (got.tobytes() == kv.tobytes())


def test_client_with_two_addresses_survives_a_dead_daemon(two_daemons) -> None:
    a, b = two_daemons
    tokens, kv = make_kv(7, num_chunks=2)
    with Client([a.address, b.address], NAMESPACE, LAYOUT) as client:
        assert client.put(tokens, kv) == len(tokens)
        a.stop(grace_s=0.1)
        got = client.get(tokens, as_numpy=True)  # answered by b, from the cluster
        assert got is not None and got.tobytes() == kv.tobytes()
