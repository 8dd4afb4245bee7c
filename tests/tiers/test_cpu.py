"""CpuTier: exact LRU order, capacity, eviction callbacks outside the lock, threads."""

from __future__ import annotations

import threading

from kvstore.config import CpuTierConfig
from kvstore.keys import ChunkKey
from kvstore.tiers.cpu import CpuTier
from tests.fakes import make_key, make_object

OBJ_BYTES = len(make_object(seed=0))


def _tier(num_objects: int, evicted: list[ChunkKey] | None = None) -> CpuTier:
    config = CpuTierConfig(capacity_bytes=num_objects * OBJ_BYTES)
    on_evict = (lambda key, obj: evicted.append(key)) if evicted is not None else None
    return CpuTier(config, on_evict=on_evict)


def test_eviction_follows_lru_order_when_full() -> None:
    evicted: list[ChunkKey] = []
    tier = _tier(3, evicted)
    for i in range(3):
        tier.put(make_key(i), make_object(seed=i))
    tier.get(make_key(0))  # 0 becomes most recent: order is now 1, 2, 0
    tier.put(make_key(3), make_object(seed=3))  # evicts 1
    tier.put(make_key(2), make_object(seed=2))  # present: refreshed, order 0, 3, 2
    tier.put(make_key(4), make_object(seed=4))  # evicts 0
    tier.put(make_key(5), make_object(seed=5))  # evicts 3
    assert evicted == [make_key(1), make_key(0), make_key(3)]
    assert tier.keys() == [make_key(2), make_key(4), make_key(5)]
    assert tier.stats().evictions == 3


def test_on_evict_receives_evicted_object_when_evicting() -> None:
    seen: dict[ChunkKey, bytes] = {}
    tier = CpuTier(CpuTierConfig(capacity_bytes=OBJ_BYTES), on_evict=seen.__setitem__)
    tier.put(make_key(0), make_object(seed=0))
    tier.put(make_key(1), make_object(seed=1))
    assert seen == {make_key(0): make_object(seed=0)}


def test_used_bytes_within_capacity_when_many_puts() -> None:
    tier = CpuTier(CpuTierConfig(capacity_bytes=5 * OBJ_BYTES + OBJ_BYTES // 2))
    for i in range(40):
        tier.put(make_key(i), make_object(seed=i % 3))
        assert tier.stats().used_bytes <= 5 * OBJ_BYTES + OBJ_BYTES // 2
    assert tier.stats().num_objects == 5
    assert tier.keys() == [make_key(i) for i in range(35, 40)]


def test_on_evict_may_reenter_tier_when_called() -> None:
    """The callback runs outside the lock: calling back into the tier must not deadlock."""
    tier = _tier(2)
    seen_during: list[bytes | None] = []

    def on_evict(key: ChunkKey, obj: bytes) -> None:
        # Still readable while its demotion runs; reads and puts do not block.
        seen_during.append(tier.get(key))
        assert tier.contains_many([key]) == [True]
        if key == make_key(0):
            tier.put(make_key(100), make_object(seed=100))  # evicts 1 from inside a callback

    tier.on_evict = on_evict
    for i in range(3):
        tier.put(make_key(i), make_object(seed=i))
    assert seen_during == [make_object(seed=0), make_object(seed=1)]
    assert tier.keys() == [make_key(2), make_key(100)]
    assert tier.contains_many([make_key(0)]) == [False]  # gone once the callback returned


def test_failing_on_evict_does_not_fail_put_when_evicting() -> None:
    def on_evict(key: ChunkKey, obj: bytes) -> None:
        raise RuntimeError("demotion bug")

    tier = CpuTier(CpuTierConfig(capacity_bytes=OBJ_BYTES), on_evict=on_evict)
    tier.put(make_key(0), make_object(seed=0))
    assert tier.put(make_key(1), make_object(seed=1))
    assert tier.contains_many([make_key(0), make_key(1)]) == [False, True]


def test_peek_leaves_recency_when_reading() -> None:
    evicted: list[ChunkKey] = []
    tier = _tier(2, evicted)
    tier.put(make_key(0), make_object(seed=0))
    tier.put(make_key(1), make_object(seed=1))
    assert tier.peek(make_key(0)) == make_object(seed=0)
    tier.put(make_key(2), make_object(seed=2))
    assert evicted == [make_key(0)]
    assert tier.stats().hits == 0


def test_accounting_consistent_when_threads_race() -> None:
    tier = _tier(8)
    objects = [make_object(seed=i) for i in range(16)]
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for n in range(300):
            i = (n * 7 + offset) % 16
            tier.put(make_key(i), objects[i])
            got = tier.get(make_key((i + offset) % 16))
            if got is not None and got != objects[(i + offset) % 16]:
                wrong.append(i)
            if n % 13 == 0:
                tier.delete(make_key(i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = tier.stats()
    assert not wrong
    assert stats.used_bytes == stats.num_objects * OBJ_BYTES <= 8 * OBJ_BYTES
