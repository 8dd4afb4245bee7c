"""GpuTier without CUDA (a host-memory slab): raw-only, exact LRU, leases, checksums."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.codec import encode
from kvstore.config import GpuTierConfig
from kvstore.device_checksum import checksum_reference
from kvstore.errors import InvalidArgument, NotFound
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Tier
from kvstore.tiers.gpu import GpuTier
from tests.fakes import TINY_LAYOUT, HostSlab, make_key, make_object

OBJ_BYTES = len(make_object(seed=0))
SLOT_BYTES = -(-OBJ_BYTES // 64) * 64  # objects sit on 64-byte boundaries


def _tier(tmp_path: Path, num_objects: int, evicted: list[ChunkKey] | None = None,
          ttl_s: float = 30.0) -> GpuTier:
    slab = HostSlab(num_objects * SLOT_BYTES, str(tmp_path))
    on_evict = (lambda key, obj: evicted.append(key)) if evicted is not None else None
    return GpuTier(GpuTierConfig(capacity_bytes=slab.nbytes, lease_ttl_s=ttl_s), slab, on_evict)


def test_tier_implements_protocol_when_built(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 1)
    assert isinstance(tier, Tier) and tier.name == "gpu"
    tier.close()


def test_get_returns_put_object_when_raw(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 2)
    obj = make_object(seed=1)
    assert tier.put(make_key(1), obj)
    assert tier.get(make_key(1)) == obj
    stats = tier.stats()
    assert (stats.hits, stats.puts, stats.num_objects, stats.used_bytes) == (1, 1, 1, OBJ_BYTES)
    assert stats.info["device"] == "cuda:0"


def test_put_refuses_compressed_objects(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 4)
    kv = np.random.default_rng(0).standard_normal(TINY_LAYOUT.chunk_shape).astype(np.float16)
    assert not tier.put(make_key(1), encode(kv, TINY_LAYOUT, "balanced"))
    assert not tier.put(make_key(2), b"not an object at all")
    assert tier.contains_many([make_key(1), make_key(2)]) == [False, False]


def test_put_evicts_least_recently_used_when_full(tmp_path: Path) -> None:
    evicted: list[ChunkKey] = []
    tier = _tier(tmp_path, 3, evicted)
    for i in range(3):
        assert tier.put(make_key(i), make_object(seed=i))
    assert tier.get(make_key(0)) is not None  # 1 is now the least recently used
    assert tier.put(make_key(3), make_object(seed=3))
    assert tier.put(make_key(4), make_object(seed=4))
    assert evicted == [make_key(1), make_key(2)]
    assert tier.keys() == [make_key(0), make_key(3), make_key(4)]
    assert tier.get(make_key(0)) == make_object(seed=0)  # its bytes were not overwritten
    assert tier.stats().evictions == 2


def test_victim_stays_readable_until_its_demotion_returns(tmp_path: Path) -> None:
    seen: list[bytes | None] = []
    tier = _tier(tmp_path, 1)
    tier.on_evict = lambda key, obj: seen.append(tier.get(key))
    tier.put(make_key(0), make_object(seed=0))
    tier.put(make_key(1), make_object(seed=1))
    assert seen == [make_object(seed=0)]
    assert not tier.contains_many([make_key(0)])[0]


def test_lease_pins_objects_against_eviction(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 2)
    tier.put(make_key(0), make_object(seed=0))
    tier.put(make_key(1), make_object(seed=1))
    lease_id, extents = tier.lease([make_key(0), make_key(1)])
    assert len(extents) == 2
    assert not tier.put(make_key(2), make_object(seed=2))  # every byte is leased
    tier.release_lease(lease_id)
    assert tier.put(make_key(2), make_object(seed=2))
    with pytest.raises(NotFound):
        tier.release_lease(lease_id)


def test_lease_stops_at_first_absent_key(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 4)
    tier.put(make_key(0), make_object(seed=0))
    tier.put(make_key(2), make_object(seed=2))
    lease_id, extents = tier.lease([make_key(0), make_key(1), make_key(2)])
    assert len(extents) == 1
    assert tier.extend_lease(lease_id, make_key(1)) is None
    assert tier.extend_lease(lease_id, make_key(2)) is not None
    tier.release_lease(lease_id)
    assert tier.num_leases() == 0


def test_extents_carry_the_device_checksum_of_the_object(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 2)
    obj = make_object(seed=5)
    tier.put(make_key(5), obj)
    _, [extent] = tier.lease([make_key(5)])
    assert extent.offset % 64 == 0 and extent.length == OBJ_BYTES
    assert extent.checksum == checksum_reference(obj)


def test_expired_lease_releases_its_objects(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 1, ttl_s=0.05)
    tier.put(make_key(0), make_object(seed=0))
    lease_id, _ = tier.lease([make_key(0)])
    assert not tier.put(make_key(1), make_object(seed=1))
    time.sleep(0.1)
    assert tier.put(make_key(1), make_object(seed=1))
    with pytest.raises(NotFound):
        tier.extend_lease(lease_id, make_key(1))


def test_delete_hides_leased_object_and_frees_it_on_release(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 1)
    tier.put(make_key(0), make_object(seed=0))
    lease_id, _ = tier.lease([make_key(0)])
    assert tier.delete(make_key(0))
    assert not tier.contains_many([make_key(0)])[0]
    assert not tier.put(make_key(1), make_object(seed=1))  # still pinned by the lease
    tier.release_lease(lease_id)
    assert tier.put(make_key(1), make_object(seed=1))


def test_put_filled_frees_its_room_when_fill_fails(tmp_path: Path) -> None:
    tier = _tier(tmp_path, 1)
    assert not tier.put_filled(make_key(0), OBJ_BYTES, lambda buf: False)
    assert tier.put(make_key(1), make_object(seed=1))  # the slab's room came back


def test_slab_smaller_than_one_slot_is_refused(tmp_path: Path) -> None:
    slab = HostSlab(32, str(tmp_path))
    with pytest.raises(InvalidArgument, match="GPU slab"):
        GpuTier(GpuTierConfig(capacity_bytes=32), slab)
    slab.close()
