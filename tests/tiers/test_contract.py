"""The Tier contract, one parametrized test per behaviour, run against every tier.

Every tier holds KVC1 objects (bytes): cpu, disk, a real standalone redis-server, and
the GPU tier twice — on a host-file slab (``tests.fakes.HostSlab``: the tier's own
logic, run everywhere) and on a real CUDA slab (a CUDA machine only). Tier-specific
behaviour (file layout, LRU callbacks, Redis TTLs and failures, CUDA IPC) stays in
the tier's own test module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import CpuTierConfig, DiskTierConfig, GpuTierConfig, RedisTierConfig
from kvstore.tiers.base import Tier
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.gpu import GpuTier
from kvstore.tiers.gpu_cuda import cuda_available
from kvstore.tiers.record import RECORD_BYTES
from kvstore.tiers.redis import RedisTier
from tests.fakes import HostSlab, make_key, make_object

OBJ_BYTES = len(make_object(seed=0))


@dataclass(frozen=True, slots=True)
class TierCase:
    """How to build one tier and the values it stores."""

    make: Callable[[int], Any]  # capacity_bytes -> tier (Redis: the largest value it takes)
    value: Callable[[int], Any]  # seed -> a stored value of OBJ_BYTES bytes
    # Bytes the tier holds per object: the disk tier appends a 64-byte key record.
    stored_bytes: int = OBJ_BYTES

    def put(self, tier: Any, key: Any, value: Any) -> bool:
        done = tier.put(key, value)
        if done is None or isinstance(done, bool):
            return bool(done)
        done.synchronize()  # the GPU tier returns the copy's CUDA event
        return True

    @staticmethod
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, bytes | bytearray | memoryview):
            return bytes(a) == bytes(b)
        return bool((a.cpu() == b.cpu()).all())


def _gpu(capacity_bytes: int, directory: Path | None) -> GpuTier:
    """The GPU tier on a host-file slab (``directory`` given) or on a real CUDA slab."""
    config = GpuTierConfig(capacity_bytes=capacity_bytes)
    if directory is not None:
        return GpuTier(config, HostSlab(capacity_bytes, str(directory)))
    from kvstore.tiers.gpu_cuda import CudaSlab

    return GpuTier(config, CudaSlab(capacity_bytes, config.device))


TIERS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("disk", id="disk"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("gpu-host-slab", id="gpu-host-slab"),
    pytest.param("gpu", id="gpu", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]),
]


@pytest.fixture(params=TIERS)
def case(request, tmp_path: Path) -> Iterator[TierCase]:
    yield from _case(request, tmp_path)


@pytest.fixture(params=[t for t in TIERS if t.values[0] != "redis"])
def lru_case(request, tmp_path: Path) -> Iterator[TierCase]:
    """The tiers that evict by themselves (Redis evicts by the server's maxmemory policy)."""
    yield from _case(request, tmp_path)


def _case(request: Any, tmp_path: Path) -> Iterator[TierCase]:
    opened: list[Any] = []

    def track(tier: Any) -> Any:
        opened.append(tier)
        return tier

    kind = request.param
    if kind == "cpu":
        made = TierCase(lambda cap: track(CpuTier(CpuTierConfig(capacity_bytes=cap))),
                        lambda seed: make_object(seed=seed))
    elif kind == "disk":
        made = TierCase(lambda cap: track(DiskTier(DiskTierConfig(
            path=str(tmp_path / f"disk{len(opened)}"), capacity_bytes=cap, fsync=False))),
            lambda seed: make_object(seed=seed), OBJ_BYTES + RECORD_BYTES)
    elif kind == "redis":
        url = request.getfixturevalue("redis_server").url
        made = TierCase(lambda cap: track(RedisTier(RedisTierConfig(
            url=url, max_value_bytes=cap, timeout_s=2.0, stats_cache_s=0.0))),
            lambda seed: make_object(seed=seed))
    else:
        slab_dir = tmp_path if kind == "gpu-host-slab" else None
        made = TierCase(lambda cap: track(_gpu(cap, slab_dir)), lambda seed: make_object(seed=seed))
    yield made
    for tier in opened:
        tier.close()


def test_tier_has_its_name_and_the_protocols_methods(case: TierCase) -> None:
    tier = case.make(4 * case.stored_bytes)
    assert tier.name in ("cpu", "disk", "redis", "gpu")
    assert isinstance(tier, Tier)
    for method in ("get", "put", "contains_many", "delete", "stats", "close"):
        assert callable(getattr(tier, method))


def test_get_returns_none_and_counts_a_miss_when_absent(case: TierCase) -> None:
    tier = case.make(4 * case.stored_bytes)
    assert tier.get(make_key(1)) is None
    assert (tier.stats().misses, tier.stats().hits) == (1, 0)


def test_get_returns_the_put_value_and_counts_it(case: TierCase) -> None:
    tier = case.make(4 * case.stored_bytes)
    value = case.value(1)
    assert case.put(tier, make_key(1), value)
    assert case.same(tier.get(make_key(1)), value)
    stats = tier.stats()
    assert (stats.hits, stats.puts, stats.num_objects) == (1, 1, 1)
    assert (stats.read_bytes, stats.written_bytes) == (OBJ_BYTES, case.stored_bytes)


def test_put_of_a_held_key_keeps_one_copy(case: TierCase) -> None:
    # Keys are content hashes: a second put of a key carries the same object.
    tier = case.make(4 * case.stored_bytes)
    assert case.put(tier, make_key(1), case.value(1))
    assert case.put(tier, make_key(1), case.value(1))
    assert case.same(tier.get(make_key(1)), case.value(1))
    assert tier.stats().num_objects == 1


def test_contains_many_and_delete_report_each_key(case: TierCase) -> None:
    tier = case.make(4 * case.stored_bytes)
    keys = [make_key(i) for i in range(3)]
    for i, key in enumerate(keys[:2]):
        assert case.put(tier, key, case.value(i))
    assert tier.contains_many(keys) == [True, True, False]
    assert tier.delete(keys[0]) is True
    assert tier.delete(keys[0]) is False
    assert tier.contains_many(keys) == [False, True, False]
    assert tier.get(keys[0]) is None
    assert tier.stats().num_objects == 1
    if tier.name != "redis":  # Redis reports the server's memory, not the tier's bytes
        assert tier.stats().used_bytes == case.stored_bytes


def test_put_over_the_capacity_is_refused_not_raised(case: TierCase) -> None:
    tier = case.make(case.stored_bytes - 1)
    assert case.put(tier, make_key(1), case.value(1)) is False
    assert tier.get(make_key(1)) is None
    assert tier.contains_many([make_key(1)]) == [False]


def test_lru_tier_evicts_the_least_recently_used_within_capacity(lru_case: TierCase) -> None:
    case = lru_case
    tier = case.make(3 * case.stored_bytes)
    keys = [make_key(i) for i in range(4)]
    for i in range(3):
        assert case.put(tier, keys[i], case.value(i))
    assert tier.get(keys[0]) is not None  # key 0 is now the most recently used
    assert case.put(tier, keys[3], case.value(3))
    assert tier.contains_many(keys) == [True, False, True, True]
    stats = tier.stats()
    assert stats.evictions == 1 and stats.used_bytes <= 3 * case.stored_bytes
