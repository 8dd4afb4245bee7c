"""Two in-process daemons sharing one 3-master Redis Cluster (DESIGN §8)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from kvstore.client import Client
from kvstore.codec.raw import encode_raw
from kvstore.config import Config, load_config
from kvstore.engine import Engine
from kvstore.keys import Namespace, prefix_keys
from kvstore.layout import KVLayout
from kvstore.server.app import ServerThread
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.redis import RedisTier
from tests.daemon_proc import DaemonProcess
from tests.redis_servers import RedisClusterProcs, RedisProcess

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


# -- a delete acknowledged while a master is down stays deleted after failover -------------------


def on_master(cluster: RedisClusterProcs, sequences: list, master: int) -> list[bool]:
    """Whether each one-chunk sequence's Redis key lives on ``master``'s slots."""
    ns = Namespace(NAMESPACE, LAYOUT)
    return [cluster.master_of_slot(key_slot(b"kvs:" + prefix_keys(ns, t)[0].hex().encode()))
            == master for t, _ in sequences]


def redis_holds(node: RedisProcess, tokens: np.ndarray) -> bool:
    key = b"kvs:" + prefix_keys(Namespace(NAMESPACE, LAYOUT), tokens)[0].hex().encode()
    return node.client().exists(key) == 1


def wait_for_failover(cluster: RedisClusterProcs, pair: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if cluster.replicas[pair].client().execute_command("ROLE")[0] == b"master":
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError("the replica was not promoted")


def replicate(cluster: RedisClusterProcs) -> None:
    for master in cluster.masters:
        if master.is_running():
            assert master.client().execute_command("WAIT", 1, 2000) == 1


def test_delete_during_master_outage_stays_deleted_after_failover(
        redis_cluster_with_replicas: RedisClusterProcs, tmp_path: Path) -> None:
    cluster = redis_cluster_with_replicas
    config = load_config(overrides={
        "tiers.cpu.capacity_bytes": "16MiB", "tiers.disk.path": str(tmp_path / "disk"),
        "tiers.redis.url": cluster.cluster_url, "tiers.redis.timeout_s": 0.3,
        "tiers.redis.circuit_open_s": 0.3, "tiers.redis.topology_refresh_s": 0.2})
    engine = Engine.from_config(config)
    ns = Namespace(NAMESPACE, LAYOUT)
    sequences = [make_kv(300 + i) for i in range(12)]
    doomed = on_master(cluster, sequences, 0)
    assert 0 < sum(doomed) < len(sequences)
    keys = [prefix_keys(ns, t)[0] for t, _ in sequences]
    objs = [encode_raw(kv, LAYOUT) for _, kv in sequences]
    try:
        for key, obj in zip(keys, objs, strict=True):
            assert engine.put(key, obj) is True
        replicate(cluster)
        cluster.masters[0].kill()
        for key, is_doomed in zip(keys, doomed, strict=True):
            if is_doomed:
                assert engine.delete(key) is True  # DRAM and disk held it
        wait_for_failover(cluster, 0)
        deadline = time.monotonic() + 5  # reads through failover and the retried delete
        while time.monotonic() < deadline:
            for key, obj, is_doomed in zip(keys, objs, doomed, strict=True):
                assert engine.get(key) == (None if is_doomed else obj)
                assert engine.lookup([key])[0] == (0 if is_doomed else 1)
            time.sleep(0.1)
        assert engine.stats()[-1].info["tombstones"] == "0"
        assert not any(redis_holds(cluster.replicas[0], t)
                       for (t, _), d in zip(sequences, doomed, strict=True) if d)
    finally:
        engine.close()


def test_delete_during_master_outage_stays_deleted_across_daemon_kill_9(
        redis_cluster_with_replicas: RedisClusterProcs, tmp_path: Path) -> None:
    cluster = redis_cluster_with_replicas
    toml = (f'[tiers.redis]\nurl = "{cluster.cluster_url}"\ntimeout_s = 0.3\n'
            'circuit_open_s = 0.3\ntopology_refresh_s = 0.2\n'
            '[tiers.cpu]\ncapacity_bytes = "16MiB"\n')
    sequences = [make_kv(400 + i) for i in range(12)]
    doomed = on_master(cluster, sequences, 0)
    assert 0 < sum(doomed) < len(sequences)
    daemon = DaemonProcess(tmp_path, tmp_path / "disk", toml)
    try:
        with Client(daemon.address, NAMESPACE, LAYOUT) as client:
            for tokens, kv in sequences:
                assert client.put(tokens, kv) == len(tokens)
            replicate(cluster)
            cluster.masters[0].kill()
            for (tokens, _), is_doomed in zip(sequences, doomed, strict=True):
                if is_doomed:
                    assert client.delete(tokens) == 1
        daemon.stop(signal.SIGKILL)  # before the failover could confirm any delete
    finally:
        daemon.stop(signal.SIGKILL)
    wait_for_failover(cluster, 0)
    assert all(redis_holds(cluster.replicas[0], t)
               for (t, _), d in zip(sequences, doomed, strict=True) if d)
    daemon = DaemonProcess(tmp_path, tmp_path / "disk", toml)
    try:
        with Client(daemon.address, NAMESPACE, LAYOUT) as client:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                for (tokens, kv), is_doomed in zip(sequences, doomed, strict=True):
                    assert client.lookup(tokens) == (0 if is_doomed else len(tokens))
                    got = client.get(tokens, as_numpy=True)
                    assert (got is None) if is_doomed else (got.tobytes() == kv.tobytes())
                time.sleep(0.1)
        assert not any(redis_holds(cluster.replicas[0], t)
                       for (t, _), d in zip(sequences, doomed, strict=True) if d)
    finally:
        daemon.stop()
