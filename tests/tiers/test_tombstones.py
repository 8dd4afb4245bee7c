"""Deletes Redis has not confirmed: the tombstone log alone, and the Redis tier across a
real failover (kill -9 a master, delete during the outage, its replica takes over)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from kvstore.errors import Unavailable
from kvstore.keys import ChunkKey
from kvstore.tiers import tombstones as tombstones_module
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.tombstones import Tombstones
from tests.redis_servers import RedisClusterProcs, RedisProcess
from tests.tiers.test_redis import make_key, make_object, tier_for

FAILOVER_TIMEOUT_S = 20.0


class Confirmer:
    """A stand-in for Redis in the log tests: confirms deletes while ``up``."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[list[ChunkKey]] = []

    def __call__(self, keys: list[ChunkKey]) -> list[bool]:
        self.calls.append(keys)
        return [self.up] * len(keys)


def open_log(path: Path | None, confirm: Confirmer | None = None,
             retry_s: float = 60.0) -> Tombstones:
    return Tombstones(None if path is None else str(path), confirm or Confirmer(), retry_s)


# -- the log, without Redis -------------------------------------------------------------------


def test_tombstones_survive_reopen_until_discarded(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = open_log(path)
    keys = [make_key(i) for i in range(5)]
    log.add_many(keys)
    seen = log.generations(keys[:2])
    log.discard_many(zip(keys[:2], seen, strict=True))
    log.close()
    again = open_log(path)
    assert [k in again for k in keys] == [False, False, True, True, True]
    assert [k for k, _ in again.oldest(10)] == keys[2:]  # oldest first
    again.close()


def test_tombstone_added_again_outlives_an_older_confirmation(tmp_path: Path) -> None:
    log = open_log(tmp_path / "t.log")
    key = make_key(1)
    log.add_many([key])
    seen = log.generations([key])
    log.add_many([key])  # a second delete while the first one's retry was in flight
    log.discard_many(zip([key], seen, strict=True))
    assert key in log
    log.discard_many(zip([key], log.generations([key]), strict=True))
    assert key not in log
    log.close()


def test_torn_last_line_is_skipped_on_open(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = open_log(path)
    log.add_many([make_key(1), make_key(2)])
    log.close()
    with open(path, "ab") as fh:
        fh.write(b"+" + make_key(3).hex().encode()[:20])  # a crash mid-append
    again = open_log(path)
    assert len(again) == 2 and make_key(3) not in again
    again.close()
    assert path.read_bytes().count(b"\n") == 3  # rewritten: header and the two live lines


def test_foreign_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    path.write_bytes(b"something else\n")
    with pytest.raises(Unavailable, match="not a kvstore Redis tombstone log"):
        open_log(path)


def test_unwritable_log_fails_the_delete(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = open_log(path)
    assert log._fd is not None
    os.close(log._fd)
    log._fd = os.open(path, os.O_RDONLY)  # every write now fails (EBADF), as on a dead disk
    with pytest.raises(Unavailable, match="cannot write the Redis tombstone log"):
        log.add_many([make_key(1)])
    assert make_key(1) not in log  # not recorded: the caller must not acknowledge
    log.close()


def test_too_many_pending_deletes_fail_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tombstones_module, "MAX_TOMBSTONES", 3)
    log = open_log(None)
    log.add_many([make_key(i) for i in range(3)])
    with pytest.raises(Unavailable, match="waiting for Redis to confirm"):
        log.add_many([make_key(9)])
    log.close()


def test_log_is_compacted_when_mostly_discarded(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tombstones_module, "_COMPACT_MIN_LINES", 8)
    path = tmp_path / "t.log"
    log = open_log(path)
    for i in range(20):
        key = make_key(i)
        log.add_many([key])
        log.discard_many(zip([key], log.generations([key]), strict=True))
    log.add_many([make_key(99)])
    log.close()
    assert path.stat().st_size < 8 * 66 + 100
    again = open_log(path)
    assert [k for k, _ in again.oldest(10)] == [make_key(99)]
    again.close()


def test_retrier_drops_tombstones_once_confirmed() -> None:
    confirm = Confirmer()
    log = open_log(None, confirm, retry_s=0.05)
    log.add_many([make_key(1), make_key(2)])
    time.sleep(0.3)
    assert len(log) == 2 and confirm.calls  # retried, not confirmed
    confirm.up = True
    deadline = time.monotonic() + 5
    while len(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(log) == 0
    log.close()


# -- the Redis tier across a real failover -------------------------------------------------------


def _role(node: RedisProcess) -> str | None:
    try:
        return node.client().execute_command("ROLE")[0].decode()
    except (redis.RedisError, OSError):
        return None


def wait_for(predicate, timeout_s: float = FAILOVER_TIMEOUT_S, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return False


def owned_by(tier: RedisTier, cluster: RedisClusterProcs, master: int, n: int,
             first_seed: int = 0) -> list[ChunkKey]:
    keys, seed = [], first_seed
    while len(keys) < n:
        key = make_key(seed)
        if cluster.master_of_slot(key_slot(tier.redis_key(key))) == master:
            keys.append(key)
        seed += 1
    return keys


def put_replicated(tier: RedisTier, cluster: RedisClusterProcs,
                   keys: list[ChunkKey]) -> dict[ChunkKey, bytes]:
    objs = {k: make_object(i) for i, k in enumerate(keys)}
    assert all(tier.put_many(list(objs.items())))
    for master in cluster.masters:
        assert master.client().execute_command("WAIT", 1, 2000) == 1
    return objs


@pytest.mark.redis
@pytest.mark.slow
def test_delete_while_master_down_stays_deleted_after_failover(
        redis_cluster_with_replicas: RedisClusterProcs, tmp_path: Path) -> None:
    cluster = redis_cluster_with_replicas
    tier = tier_for(cluster.cluster_url, tombstone_file=str(tmp_path / "t.log"))
    doomed = owned_by(tier, cluster, 0, 6)
    kept = owned_by(tier, cluster, 1, 3)
    objs = put_replicated(tier, cluster, doomed + kept)
    cluster.masters[0].kill()
    for key in doomed:  # acknowledged while nothing can confirm it
        assert tier.delete(key) is False
    assert len(tier.tombstones) == len(doomed)
    assert tier.stats().info["deletes_unconfirmed"] == str(len(doomed))
    assert wait_for(lambda: _role(cluster.replicas[0]) == "master"), "no failover"
    assert wait_for(lambda: not tier.tombstones.oldest(1) or _probe(tier, doomed, kept, objs),
                    every_s=0.05)
    assert len(tier.tombstones) == 0, "the retried delete was not confirmed after failover"
    promoted = cluster.replicas[0].client()
    assert [promoted.exists(tier.redis_key(k)) for k in doomed] == [0] * len(doomed)
    assert tier.get_many(doomed) == [None] * len(doomed)
    assert tier.get_many(kept) == [objs[k] for k in kept]
    tier.close()


def _probe(tier: RedisTier, doomed: list[ChunkKey], kept: list[ChunkKey],
           objs: dict[ChunkKey, bytes]) -> bool:
    """Every read while the delete is pending: the doomed keys miss, the rest hit."""
    assert tier.get_many(doomed) == [None] * len(doomed)
    assert tier.contains_many(doomed) == [False] * len(doomed)
    assert tier.get_many(kept) == [objs[k] for k in kept]
    return False


@pytest.mark.redis
@pytest.mark.slow
def test_pending_delete_survives_a_restart_of_the_tier(
        redis_cluster_with_replicas: RedisClusterProcs, tmp_path: Path) -> None:
    cluster = redis_cluster_with_replicas
    path = tmp_path / "t.log"
    first = tier_for(cluster.cluster_url, tombstone_file=str(path))
    doomed = owned_by(first, cluster, 0, 4)
    put_replicated(first, cluster, doomed)
    cluster.masters[0].kill()
    for key in doomed:
        assert first.delete(key) is False
    first.close()  # the daemon stops before Redis confirmed anything
    assert all(b"+" + k.hex().encode() in path.read_bytes() for k in doomed)
    assert wait_for(lambda: _role(cluster.replicas[0]) == "master"), "no failover"
    second = tier_for(cluster.cluster_url, tombstone_file=str(path))
    assert second.get_many(doomed) == [None] * len(doomed)  # before any retry
    assert wait_for(lambda: len(second.tombstones) == 0)
    promoted = cluster.replicas[0].client()
    assert [promoted.exists(second.redis_key(k)) for k in doomed] == [0] * len(doomed)
    second.close()
    assert open_log(path).oldest(10) == []


@pytest.mark.redis
@pytest.mark.slow
def test_put_after_pending_delete_is_kept(
        redis_cluster_with_replicas: RedisClusterProcs) -> None:
    cluster = redis_cluster_with_replicas
    tier = tier_for(cluster.cluster_url)
    key = owned_by(tier, cluster, 0, 1)[0]
    put_replicated(tier, cluster, [key])
    cluster.masters[0].kill()
    assert tier.delete(key) is False
    assert wait_for(lambda: _role(cluster.replicas[0]) == "master"), "no failover"
    # Put again (before or after the retry confirmed the delete): Redis keeps the put.
    assert wait_for(lambda: tier.put(key, make_object(5)))
    assert len(tier.tombstones) == 0
    time.sleep(0.6)  # two retry intervals: nothing removes the new value
    assert tier.get(key) == make_object(5)
    tier.close()


@pytest.mark.redis
@pytest.mark.slow
def test_delete_the_replica_did_not_acknowledge_stays_pending(
        redis_cluster_with_replicas: RedisClusterProcs) -> None:
    cluster = redis_cluster_with_replicas
    tier = tier_for(cluster.cluster_url, timeout_s=0.5, delete_wait_s=0.2)
    key = owned_by(tier, cluster, 0, 1)[0]
    put_replicated(tier, cluster, [key])
    cluster.replicas[0].pause()  # SIGSTOP: the replica cannot acknowledge the WAIT
    try:
        assert tier.delete(key) is False  # the master applied it; its replica did not say so
        assert len(tier.tombstones) == 1 and tier.get(key) is None
    finally:
        cluster.replicas[0].resume()
    assert wait_for(lambda: len(tier.tombstones) == 0)
    assert tier.get(key) is None
    tier.close()


@pytest.mark.redis
def test_delete_with_replicas_up_is_confirmed_at_once(
        redis_cluster_with_replicas: RedisClusterProcs) -> None:
    cluster = redis_cluster_with_replicas
    tier = tier_for(cluster.cluster_url)
    keys = [make_key(i) for i in range(12)]
    put_replicated(tier, cluster, keys)
    started = time.monotonic()
    assert [tier.delete(k) for k in keys] == [True] * 12
    assert len(tier.tombstones) == 0
    assert time.monotonic() - started < 12 * 0.1  # no WAIT ran to its timeout
    for replica in cluster.replicas:  # WAIT: the replicas applied every delete
        assert replica.client().dbsize() == 0
    tier.close()


def test_retrier_thread_stops_on_close() -> None:
    log = open_log(None, Confirmer(), retry_s=0.05)
    log.add_many([make_key(1)])
    retrier = log._retrier
    assert retrier is not None and retrier.is_alive()
    log.close()
    assert not retrier.is_alive()
