"""The Redis tier on a real 3-master Redis Cluster: routing, dead shards, failover, MOVED."""

from __future__ import annotations

import time

import pytest
from redis.crc import key_slot

from kvstore.keys import ChunkKey
from kvstore.tiers.redis import RedisTier
from tests.redis_servers import RedisClusterProcs
from tests.tiers.test_redis import make_key, make_object, tier_for

pytestmark = pytest.mark.redis


def keys_by_master(tier: RedisTier, cluster: RedisClusterProcs, n: int) -> list[list[ChunkKey]]:
    """``n`` keys, grouped by the index of the master that owns each one's slot."""
    groups: list[list[ChunkKey]] = [[] for _ in cluster.masters]
    for seed in range(n):
        key = make_key(1000 + seed)
        groups[cluster.master_of_slot(key_slot(tier.redis_key(key)))].append(key)
    return groups


def test_cluster_detected_when_url_names_one_node(redis_cluster: RedisClusterProcs) -> None:
    tier = tier_for(redis_cluster.masters[1].url)
    assert tier.mode == "cluster" and len(tier.stats().info["address"]) > 0
    keys = [make_key(i) for i in range(30)]
    assert tier.put_many([(k, make_object(i)) for i, k in enumerate(keys)]) == [True] * 30
    assert tier.get_many(keys) == [make_object(i) for i in range(30)]
    sizes = [m.client().dbsize() for m in redis_cluster.masters]
    assert sum(sizes) == 30 and min(sizes) > 0  # spread over every shard
    stats = tier.stats()
    assert stats.num_objects == 30 and stats.info["state"] == "up" and stats.errors == 0


def test_killed_master_without_replica_misses_its_slots_only(
        redis_cluster: RedisClusterProcs) -> None:
    tier = tier_for(redis_cluster.cluster_url)
    groups = keys_by_master(tier, redis_cluster, 30)
    every = [k for g in groups for k in g]
    objs = {k: make_object(i) for i, k in enumerate(every)}
    assert all(tier.put_many(list(objs.items())))
    redis_cluster.masters[0].kill()
    for _ in range(3):  # every call returns; the dead shard's keys are misses
        got = tier.get_many(every)
        assert got == [None if k in groups[0] else objs[k] for k in every]
        assert tier.contains_many(every) == [k not in groups[0] for k in every]
    assert tier.put_many([(k, objs[k]) for k in every]) == [k not in groups[0] for k in every]
    stats = tier.stats()
    assert stats.info["state"] == "degraded"
    assert stats.info["nodes_down"] == f"127.0.0.1:{redis_cluster.masters[0].port}"
    assert int(stats.info["circuit_refused"]) > 0  # the breaker stopped calling it
    assert stats.errors == 7 * len(groups[0])


@pytest.mark.slow
def test_reads_recover_after_failover_when_replicas(
        redis_cluster_with_replicas: RedisClusterProcs) -> None:
    cluster = redis_cluster_with_replicas
    tier = tier_for(cluster.cluster_url)
    groups = keys_by_master(tier, cluster, 30)
    every = [k for g in groups for k in g]
    objs = {k: make_object(i) for i, k in enumerate(every)}
    assert all(tier.put_many(list(objs.items())))
    for master in cluster.masters:  # replicated before the kill
        assert master.client().execute_command("WAIT", 1, 2000) == 1
    cluster.masters[0].kill()
    deadline = time.monotonic() + 15.0
    while True:
        got = tier.get_many(every)  # never raises, meanwhile only shard 0 misses
        assert all(g == objs[k] for g, k in zip(got, every, strict=True) if k not in groups[0])
        if got == [objs[k] for k in every] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == [objs[k] for k in every], "shard 0 did not come back after failover"
    assert tier.put(groups[0][0], objs[groups[0][0]]) is True
    assert tier.stats().info["state"] == "up"


def test_moved_slot_is_followed_when_slot_migrates(redis_cluster: RedisClusterProcs) -> None:
    tier = tier_for(redis_cluster.cluster_url, topology_refresh_s=60.0)
    key, obj = make_key(7), make_object(7)
    tier.put(key, obj)
    rkey = tier.redis_key(key)
    slot = key_slot(rkey)
    src = redis_cluster.masters[redis_cluster.master_of_slot(slot)]
    dst = redis_cluster.masters[(redis_cluster.master_of_slot(slot) + 1) % 3]
    src_id = src.client().execute_command("CLUSTER MYID")
    dst_id = dst.client().execute_command("CLUSTER MYID")
    dst.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", rkey)
    for node in (dst, src):
        node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    assert tier.get(key) == obj  # MOVED from src, followed to dst
    assert tier.stats().errors == 0
