"""The CPU DRAM tier: KVC1 objects in a shared-memory arena, LRU within a byte capacity."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from kvstore.arena import Arena, ArenaIdentity, Extent, LeaseId, Placement
from kvstore.config import CpuTierConfig
from kvstore.keys import ChunkKey
from kvstore.tiers.base import EvictCallback, TierStats

logger = logging.getLogger(__name__)


class CpuTier:
    """DRAM tier, name ``"cpu"``: a `kvstore.arena.Arena` (one /dev/shm file) with LRU.

    Living in the arena lets same-host clients map the tier read-only and copy
    chunks out under a lease (``lease``/``extend_lease``/``release_lease``) instead
    of receiving them over a socket. ``get`` returns a private copy.

    Reads do not verify checksums: memory is trusted, and every object was verified
    before it was put (by the server, or by the slower tier it was promoted from).
    Same-host clients verify what they copy out.

    Eviction hands each dropped object to ``on_evict`` *outside* the lock, so the
    callback may write it to a slower tier (or even call back into this tier) without
    deadlock. Until the callback returns, the evicted object stays readable through
    ``get``/``contains_many``/``peek`` (it no longer counts toward ``used_bytes``):
    a reader never sees a chunk vanish from DRAM before its demotion has landed.
    Leased objects are never evicted; a put that finds every byte leased is refused.
    """

    name = "cpu"

    def __init__(self, config: CpuTierConfig, on_evict: EvictCallback | None = None) -> None:
        """Args:
        config: capacity, arena directory, lease TTL and huge-page wish of the tier.
        on_evict: called with (key, object) for each evicted object; the engine sets
            it (attribute ``on_evict``) to demote objects to the disk tier.
        """
        self.on_evict = on_evict
        self._capacity_bytes = config.capacity_bytes
        self._arena = Arena(max(config.capacity_bytes, 64), directory=config.shm_dir,
                            on_evict=self._evicted, lease_ttl_s=config.lease_ttl_s,
                            hugepages=config.hugepages)
        self._lock = threading.Lock()  # guards the counters only; the arena locks itself
        self._stats = TierStats(name=self.name, capacity_bytes=self._capacity_bytes)

    def _evicted(self, key: ChunkKey, obj: bytes) -> None:
        with self._lock:
            self._stats.evictions += 1
        callback = self.on_evict
        if callback is not None:
            callback(key, obj)

    # -- the Tier protocol --------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes | None:
        """The object under ``key`` (now the most recently used), or None."""
        obj = self._arena.get(key)
        with self._lock:
            if obj is None:
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            self._stats.read_bytes += len(obj)
        return obj

    def peek(self, key: ChunkKey) -> bytes | None:
        """The object under ``key`` without touching recency or hit counters."""
        return self._arena.peek(key)

    def put(self, key: ChunkKey, obj: bytes | memoryview, *,
            placed: Placement | None = None) -> bool:
        """Store ``obj``, evicting least recently used objects to make room.

        ``placed``: ``obj`` already lies in reserved arena space (a same-host
        writer's commit); it is indexed where it is instead of copied.

        Returns:
            True if the object is held afterwards (a key already present is only
            refreshed: objects are content-addressed); False if it is larger than
            the whole capacity or the room it needs is leased by same-host readers.
        """
        size = len(obj)
        if size > self._capacity_bytes:
            return False
        is_new = not self._arena.contains(key)
        if placed is not None:
            self._arena.adopt(placed, key)
        elif not self._arena.put(key, obj):
            logger.debug("DRAM refused a %d-byte chunk: its room is leased", size)
            return False
        if is_new:
            with self._lock:
                self._stats.puts += 1
                self._stats.written_bytes += size
        return True

    def pinned(self, key: ChunkKey) -> AbstractContextManager[bytes | memoryview | None]:
        """``with tier.pinned(key) as obj``: the object in place (None if absent), pinned."""
        return self._arena.pinned(key)

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self._arena.contains_many(keys)

    def delete(self, key: ChunkKey) -> bool:
        """Drop ``key`` (also from objects mid-eviction); True if it was held."""
        return self._arena.delete(key)

    def keys(self) -> list[ChunkKey]:
        """Snapshot of the held keys, least recently used first."""
        return self._arena.keys()

    def stats(self) -> TierStats:
        with self._lock:
            stats = dataclasses.replace(self._stats)
        stats.used_bytes = self._arena.used_bytes
        stats.num_objects = len(self._arena)
        num_reservations, reserved_bytes = self._arena.reservation_stats()
        stats.info = {"io": "dram", "arena": self._arena.path,
                      "hugepages": self._arena.hugepages,
                      "leases": str(self._arena.num_leases()),
                      "reservations": str(num_reservations),
                      "reserved_bytes": str(reserved_bytes)}
        return stats

    def close(self) -> None:
        """Drop every object (without eviction callbacks: the engine flushes first)."""
        self._arena.close()

    # -- same-host references -----------------------------------------------------

    def identity(self) -> ArenaIdentity:
        """Path, size and nonce of the arena file, for AttachArena."""
        return self._arena.identity()

    @property
    def prefaulted(self) -> threading.Event:
        """Set once the arena's pages are faulted in (the daemon is ready then)."""
        return self._arena.prefaulted

    @property
    def lease_ttl_s(self) -> float:
        return self._arena.lease_ttl_s

    def lease(self, keys: Sequence[ChunkKey], ttl_s: float | None = None
              ) -> tuple[LeaseId, list[Extent]]:
        """Pin the leading resident ``keys``; the lease and their extents (maybe none)."""
        return self._arena.lease(keys, ttl_s)

    def extend_lease(self, lease_id: LeaseId, key: ChunkKey) -> Extent | None:
        """Add a resident ``key`` to a lease; None if DRAM does not hold it."""
        return self._arena.extend(lease_id, key)

    def count_leased_reads(self, num_objects: int, num_bytes: int) -> None:
        """Count objects a same-host client reads under a lease as hits, like ``get``."""
        with self._lock:
            self._stats.hits += num_objects
            self._stats.read_bytes += num_bytes

    def release_lease(self, lease_id: LeaseId) -> None:
        """End a lease; raises NotFound if it is not held (released or expired)."""
        self._arena.release(lease_id)

    # -- same-host writers --------------------------------------------------------

    def reserve(self, sizes: Sequence[int], ttl_s: float | None = None, tag: Any = None
                ) -> tuple[LeaseId, list[Extent]] | None:
        """Space for objects a same-host client writes in place (see ``Arena.reserve``)."""
        return self._arena.reserve(sizes, ttl_s, tag)

    def claim_reservation(self, reservation_id: LeaseId) -> tuple[list[Extent], Any]:
        """Start a commit; raises NotFound if the reservation is gone."""
        return self._arena.claim_reservation(reservation_id)

    def reserved_view(self, extent: Extent) -> memoryview:
        """The bytes of a claimed reservation's extent, to verify before indexing."""
        return self._arena.writable_view(extent)

    def finish_reservation(self, reservation_id: LeaseId) -> None:
        """End a commit: unpin what was indexed, free the rest."""
        self._arena.finish_reservation(reservation_id)
