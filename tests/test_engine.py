"""Engine: write policies, demotion on eviction, promotion, lookup, prefetch, threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from kvstore.config import Config, CpuTierConfig, DiskTierConfig, EngineConfig
from kvstore.engine import Engine
from kvstore.errors import CapacityExhausted, InvalidArgument, Unavailable
from kvstore.tiers.base import Tier
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from tests.fakes import FaultyTier, make_key, make_object

OBJ_BYTES = len(make_object(seed=0))
NEVER_S = 3600.0  # a flush interval no test waits for: only flush()/close() flush

EngineFactory = Callable[..., tuple[Engine, list[Tier]]]


def _disk(path: Path, num_objects: int = 64) -> DiskTier:
    return DiskTier(DiskTierConfig(path=str(path), capacity_bytes=num_objects * OBJ_BYTES,
                                   fsync=False))


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    """Builds cpu + disk (+ extra) engines and closes them after the test."""
    engines: list[Engine] = []

    def factory(*, dram_objects: int = 8, policy: str = "write-back",
                interval_s: float = NEVER_S, disk: Tier | None = None,
                extra: Sequence[Tier] = (), write_through: Sequence[str] = (),
                ) -> tuple[Engine, list[Tier]]:
        tiers: list[Tier] = [CpuTier(CpuTierConfig(capacity_bytes=dram_objects * OBJ_BYTES)),
                             disk if disk is not None else _disk(tmp_path / "disk"), *extra]
        engine = Engine(EngineConfig(write_policy=policy, flush_interval_s=interval_s), tiers,
                        write_through_tiers=write_through)
        engines.append(engine)
        return engine, tiers

    yield factory
    for engine in engines:
        engine.close()


def _has(tier: Tier, i: int) -> bool:
    return tier.contains_many([make_key(i)])[0]


def _put_direct(tier: Tier, *indices: int) -> None:
    for i in indices:
        assert tier.put(make_key(i), make_object(seed=i))


def test_write_back_put_waits_for_flush_when_interval_long(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine()
    assert engine.put(make_key(0), make_object(seed=0))
    assert _has(cpu, 0) and not _has(disk, 0)
    assert engine.stats()[0].info["dirty"] == "1"
    engine.flush()
    assert _has(disk, 0)
    assert engine.stats()[0].info["dirty"] == "0"


def test_write_back_flush_reaches_disk_within_interval(make_engine: EngineFactory) -> None:
    interval_s = 0.2
    engine, (_, disk) = make_engine(interval_s=interval_s)
    start = time.monotonic()
    for i in range(3):
        engine.put(make_key(i), make_object(seed=i))
    while not all(_has(disk, i) for i in range(3)):
        assert time.monotonic() - start < interval_s + 1.0, "flusher missed its interval"
        time.sleep(0.01)
    assert disk.get(make_key(2)) == make_object(seed=2)


def test_write_through_put_on_disk_when_put_returns(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine(policy="write-through")
    engine.put(make_key(0), make_object(seed=0))
    assert _has(cpu, 0) and _has(disk, 0)
    assert engine.stats()[0].info["dirty"] == "0"


def test_write_through_tier_gets_put_when_policy_write_back(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    shared = FaultyTier(_disk(tmp_path / "shared"), name="shared")
    engine, (cpu, disk, _) = make_engine(extra=[shared], write_through=["shared"])
    engine.put(make_key(0), make_object(seed=0))
    assert [_has(t, 0) for t in (cpu, disk, shared)] == [True, False, True]


def test_evicted_chunk_served_from_disk_when_dram_small(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine(dram_objects=2)
    for i in range(5):
        engine.put(make_key(i), make_object(seed=i))
    # Never flushed: 0, 1, 2 reached the disk only by being evicted from DRAM.
    assert [_has(cpu, i) for i in range(5)] == [False, False, False, True, True]
    assert [_has(disk, i) for i in range(5)] == [True, True, True, False, False]
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert _has(cpu, 0)  # promoted back; 3 was least recent and went to disk
    assert _has(disk, 3) and not _has(cpu, 3)
    assert engine.get(make_key(0)) == make_object(seed=0)
    cpu_stats, disk_stats = engine.stats()
    assert (cpu_stats.hits, disk_stats.hits) == (1, 1)


def test_disk_hit_promoted_to_dram_when_read(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine()
    _put_direct(disk, 0)
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert _has(cpu, 0)
    assert engine.stats()[0].info["dirty"] == "0"  # promoted copies are clean


def test_hit_below_disk_promoted_to_disk_and_dram(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    shared = FaultyTier(_disk(tmp_path / "shared"), name="shared")
    engine, (cpu, disk, _) = make_engine(extra=[shared], write_through=["shared"])
    _put_direct(shared, 0)  # written by another daemon
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert _has(cpu, 0) and _has(disk, 0)


def test_get_returns_none_when_absent_everywhere(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    assert engine.get(make_key(0)) is None
    assert not engine.contains(make_key(0))


def test_delete_removes_from_all_tiers(make_engine: EngineFactory, tmp_path: Path) -> None:
    shared = FaultyTier(_disk(tmp_path / "shared"), name="shared")
    engine, tiers = make_engine(policy="write-through", extra=[shared], write_through=["shared"])
    engine.put(make_key(0), make_object(seed=0))
    assert all(_has(t, 0) for t in tiers)
    assert engine.delete(make_key(0))
    assert not any(_has(t, 0) for t in tiers)
    assert not engine.delete(make_key(0))


def test_delete_drops_dirty_chunk_when_write_back(make_engine: EngineFactory) -> None:
    engine, (_, disk) = make_engine()
    engine.put(make_key(0), make_object(seed=0))
    engine.delete(make_key(0))
    engine.flush()
    assert not _has(disk, 0)
    assert engine.stats()[0].info["dirty"] == "0"


def test_lookup_counts_leading_keys_per_tier(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine()
    _put_direct(cpu, 0, 1, 4)
    _put_direct(disk, 0, 2)
    keys = [make_key(i) for i in range(5)]
    assert engine.lookup(keys) == (3, {"cpu": 2, "disk": 1})
    assert engine.lookup([]) == (0, {"cpu": 0, "disk": 0})


def test_prefetch_counts_promoted_and_resident(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine()
    _put_direct(cpu, 0, 1)
    _put_direct(disk, 2, 3, 5)
    keys = [make_key(i) for i in range(6)]
    assert engine.prefetch(keys) == (2, 2)  # stops at 4, absent everywhere
    assert [_has(cpu, i) for i in range(6)] == [True] * 4 + [False, False]
    assert engine.prefetch(keys[:4]) == (0, 4)


def test_put_returns_false_when_already_present(make_engine: EngineFactory) -> None:
    engine, (_, disk) = make_engine()
    assert engine.put(make_key(0), make_object(seed=0))
    assert not engine.put(make_key(0), make_object(seed=0))
    _put_direct(disk, 1)
    assert not engine.put(make_key(1), make_object(seed=1))


def test_put_raises_capacity_exhausted_when_no_tier_fits(make_engine: EngineFactory,
                                                         tmp_path: Path) -> None:
    engine, _ = make_engine(dram_objects=1, disk=_disk(tmp_path / "small", num_objects=1))
    big = make_object(seed=0) * 2
    with pytest.raises(CapacityExhausted, match=f"{len(big)} bytes"):
        engine.put(make_key(0), big)
    assert not engine.contains(make_key(0))


def test_object_larger_than_dram_stored_on_disk(make_engine: EngineFactory) -> None:
    engine, (cpu, disk) = make_engine(dram_objects=1)
    big = make_object(seed=0) + make_object(seed=1)  # opaque to the engine; fits only disk
    assert engine.put(make_key(0), big)
    assert not _has(cpu, 0) and _has(disk, 0)


def test_evicted_chunk_lost_quietly_when_disk_refuses(make_engine: EngineFactory,
                                                      tmp_path: Path) -> None:
    disk = FaultyTier(_disk(tmp_path / "disk"))
    disk.faults.refuse_puts = True
    engine, _ = make_engine(dram_objects=2, disk=disk)
    for i in range(3):
        assert engine.put(make_key(i), make_object(seed=i))
    assert engine.get(make_key(0)) is None  # only the cached copy is lost
    assert engine.get(make_key(2)) == make_object(seed=2)
    assert engine.stats()[1].errors == disk.num_errors >= 1


def test_put_raises_when_dram_too_small_and_disk_refuses(make_engine: EngineFactory,
                                                         tmp_path: Path) -> None:
    disk = FaultyTier(_disk(tmp_path / "disk"))
    disk.faults.refuse_puts = True
    engine, _ = make_engine(dram_objects=0, disk=disk)
    with pytest.raises(CapacityExhausted):
        engine.put(make_key(0), make_object(seed=0))


def test_disk_read_error_is_miss_when_get(make_engine: EngineFactory, tmp_path: Path) -> None:
    disk = FaultyTier(_disk(tmp_path / "disk"))
    engine, _ = make_engine(disk=disk)
    _put_direct(disk, 0)
    disk.faults.fail_gets = True
    assert engine.get(make_key(0)) is None
    disk.faults.fail_gets = False
    assert engine.get(make_key(0)) == make_object(seed=0)


def test_dram_get_not_blocked_when_flush_slow(make_engine: EngineFactory,
                                              tmp_path: Path) -> None:
    disk = FaultyTier(_disk(tmp_path / "disk"))
    engine, _ = make_engine(disk=disk)
    engine.put(make_key(0), make_object(seed=0))
    disk.faults.hold_puts = release = threading.Event()
    flusher = threading.Thread(target=engine.flush)
    flusher.start()
    assert disk.faults.held.wait(5)  # the flush is stuck writing key 0 to disk
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert engine.put(make_key(1), make_object(seed=1))
    release.set()
    flusher.join()
    assert _has(disk, 0)


def test_delete_during_demotion_leaves_no_copy(make_engine: EngineFactory,
                                               tmp_path: Path) -> None:
    disk = FaultyTier(_disk(tmp_path / "disk"))
    engine, (cpu, _) = make_engine(dram_objects=1, disk=disk)
    engine.put(make_key(0), make_object(seed=0))
    disk.faults.hold_puts = release = threading.Event()
    evictor = threading.Thread(target=engine.put, args=(make_key(1), make_object(seed=1)))
    evictor.start()  # evicts 0 and demotes it to the (held) disk
    assert disk.faults.held.wait(5)
    assert engine.get(make_key(0)) == make_object(seed=0)  # readable while being demoted
    deleter = threading.Thread(target=engine.delete, args=(make_key(0),))
    deleter.start()
    release.set()
    evictor.join()
    deleter.join()
    assert not engine.contains(make_key(0))
    assert engine.get(make_key(1)) == make_object(seed=1)


def test_promotion_undone_when_delete_races(make_engine: EngineFactory, tmp_path: Path) -> None:
    disk = FaultyTier(_disk(tmp_path / "disk"))
    engine, (cpu, _) = make_engine(disk=disk)
    _put_direct(disk, 0)
    disk.faults.hold_gets = release = threading.Event()
    results: list[bytes | None] = []
    reader = threading.Thread(target=lambda: results.append(engine.get(make_key(0))))
    reader.start()
    assert disk.faults.held.wait(5)  # the reader has the bytes, not yet promoted
    disk.faults.hold_gets = None
    assert engine.delete(make_key(0))
    release.set()
    reader.join()
    assert results == [make_object(seed=0)]  # the read began before the delete
    assert not engine.contains(make_key(0))  # but the delete is not undone by promotion


def test_concurrent_puts_gets_exact_when_8_threads(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(dram_objects=4, interval_s=0.02)
    objects = [make_object(seed=i) for i in range(24)]
    stored = [threading.Event() for _ in objects]
    wrong: list[str] = []

    def worker(offset: int) -> None:
        for n in range(40):
            i = (offset * 3 + n) % 24
            engine.put(make_key(i), objects[i])
            stored[i].set()
            for j in (i, (i + 5) % 24):
                was_stored = stored[j].is_set()
                got = engine.get(make_key(j))
                if (got is None and was_stored) or (got is not None and got != objects[j]):
                    wrong.append(f"key {j}: {'missing' if got is None else 'wrong bytes'}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    assert all(engine.get(make_key(i)) == objects[i] for i in range(24))
    cpu_stats, disk_stats = engine.stats()
    assert cpu_stats.used_bytes <= 4 * OBJ_BYTES
    assert disk_stats.corrupt == disk_stats.errors == 0


def _config(tmp_path: Path) -> Config:
    config = Config()
    config.engine.flush_interval_s = NEVER_S
    config.tiers.disk.path = str(tmp_path / "disk")
    config.tiers.disk.fsync = False
    config.tiers.cpu.capacity_bytes = 16 * OBJ_BYTES
    return config


def test_close_flushes_dirty_chunks_when_reopened(tmp_path: Path) -> None:
    engine = Engine.from_config(_config(tmp_path))
    for i in range(3):
        engine.put(make_key(i), make_object(seed=i))
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(Unavailable):
        engine.get(make_key(0))
    reopened = Engine.from_config(_config(tmp_path))
    try:
        assert [reopened.get(make_key(i)) for i in range(3)] == [make_object(seed=i)
                                                                 for i in range(3)]
        assert reopened.stats()[1].hits == 3
    finally:
        reopened.close()


def test_from_config_builds_tiers_fastest_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    engine = Engine.from_config(config)
    assert [s.name for s in engine.stats()] == ["cpu", "disk"]
    engine.close()
    config.tiers.disk.enabled = False
    dram_only = Engine.from_config(config)
    assert [s.name for s in dram_only.stats()] == ["cpu"]
    assert dram_only.put(make_key(0), make_object(seed=0))
    assert dram_only.get(make_key(0)) == make_object(seed=0)
    dram_only.close()


def test_engine_rejects_tiers_when_misconfigured(tmp_path: Path) -> None:
    disk = _disk(tmp_path / "disk")
    with pytest.raises(InvalidArgument, match="CpuTier"):
        Engine(EngineConfig(), [disk])
    cpu = CpuTier(CpuTierConfig(), on_evict=lambda key, obj: None)
    with pytest.raises(InvalidArgument, match="on_evict"):
        Engine(EngineConfig(), [cpu, disk])
    with pytest.raises(InvalidArgument, match="redis"):
        Engine(EngineConfig(), [CpuTier(CpuTierConfig()), disk], write_through_tiers=["redis"])
