"""DiskTier on a real, small file system that fills up (a tmpfs of a few MiB)."""

from __future__ import annotations

from pathlib import Path

from kvstore.config import DiskTierConfig
from kvstore.layout import KVLayout
from kvstore.tiers.disk import DiskTier
from tests.fakes import make_key, make_object
from tests.small_fs import small_filesystem

LAYOUT = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, chunk_tokens=64)  # 256 KiB


def test_full_filesystem_evicts_to_make_room(tmp_path: Path) -> None:
    # The configured capacity (64 MiB) is far above the 2 MiB file system: the writes
    # themselves hit ENOSPC, and the tier must evict instead of refusing every put.
    with small_filesystem(tmp_path / "fs", size_mib=2) as mount:
        tier = DiskTier(DiskTierConfig(path=str(mount / "d"), capacity_bytes=64 << 20,
                                       fsync=True))
        objects = {i: make_object(LAYOUT, seed=i) for i in range(24)}  # ~6 MiB into 2 MiB
        assert all(tier.put(make_key(i), obj) for i, obj in objects.items())
        stats = tier.stats()
        assert stats.evictions >= 16 and stats.errors == 0
        held = [i for i in objects if tier.contains_many([make_key(i)])[0]]
        assert held and held[-1] == 23  # the newest survive, LRU goes first
        for i in held:
            assert tier.get(make_key(i)) == objects[i]
        assert not any(".tmp-" in p.name for p in (mount / "d").rglob("*"))


def test_object_larger_than_filesystem_refused(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs", size_mib=1) as mount:
        tier = DiskTier(DiskTierConfig(path=str(mount / "d"), capacity_bytes=64 << 20,
                                       fsync=False))
        big = make_object(KVLayout(num_layers=8, num_kv_heads=4, head_dim=64,
                                   chunk_tokens=64), seed=1)  # 512 KiB
        assert tier.put(make_key(1), big)
        huge = make_object(KVLayout(num_layers=24, num_kv_heads=4, head_dim=64,
                                    chunk_tokens=64), seed=2)  # 1.5 MiB > the file system
        assert not tier.put(make_key(2), huge)
        stats = tier.stats()
        # It can never fit, so nothing was evicted for it; no partial file remains.
        assert (stats.errors, stats.evictions, stats.num_objects) == (1, 0, 1)
        assert tier.get(make_key(1)) == big
        assert not any(".tmp-" in p.name for p in (mount / "d").rglob("*"))
