"""The CPU DRAM tier: an LRU of KVC1 objects held as bytes within a byte capacity."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

from kvstore.config import CpuTierConfig
from kvstore.keys import ChunkKey
from kvstore.tiers.base import EvictCallback, TierStats

logger = logging.getLogger(__name__)


class CpuTier:
    """DRAM tier, name ``"cpu"``: an OrderedDict LRU (least recent first) under one lock.

    Reads do not verify checksums: memory is trusted, and every object was verified
    before it was put (by the server, or by the slower tier it was promoted from).

    Eviction hands each dropped object to ``on_evict`` *outside* the lock, so the
    callback may write it to a slower tier (or even call back into this tier) without
    deadlock. Until the callback returns, the evicted object stays readable through
    ``get``/``contains_many``/``peek`` (it no longer counts toward ``used_bytes``):
    a reader never sees a chunk vanish from DRAM before its demotion has landed.
    """

    name = "cpu"

    def __init__(self, config: CpuTierConfig, on_evict: EvictCallback | None = None) -> None:
        """Args:
        config: capacity of the tier.
        on_evict: called with (key, object) for each evicted object; the engine sets
            it (attribute ``on_evict``) to demote objects to the disk tier.
        """
        self.on_evict = on_evict
        self._capacity_bytes = config.capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[ChunkKey, bytes] = OrderedDict()  # LRU first, MRU last
        # Objects evicted whose on_evict callback is still running -> still readable.
        self._evicting: dict[ChunkKey, bytes] = {}
        self._used_bytes = 0  # sum of len() over _entries
        self._stats = TierStats(name=self.name, capacity_bytes=self._capacity_bytes)

    def get(self, key: ChunkKey) -> bytes | None:
        """The object under ``key`` (now the most recently used), or None."""
        with self._lock:
            obj = self._entries.get(key)
            if obj is not None:
                self._entries.move_to_end(key)
            else:
                obj = self._evicting.get(key)
            if obj is None:
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            self._stats.read_bytes += len(obj)
            return obj

    def peek(self, key: ChunkKey) -> bytes | None:
        """The object under ``key`` without touching recency or hit counters."""
        with self._lock:
            obj = self._entries.get(key)
            return obj if obj is not None else self._evicting.get(key)

    def put(self, key: ChunkKey, obj: bytes) -> bool:
        """Store ``obj``, evicting least recently used objects to make room.

        Returns:
            True if the object is held afterwards (a key already present is only
            refreshed: objects are content-addressed); False if it is larger than
            the whole capacity.
        """
        size = len(obj)
        if size > self._capacity_bytes:
            return False
        if not isinstance(obj, bytes):
            obj = bytes(obj)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            self._entries[key] = obj
            self._used_bytes += size
            self._stats.puts += 1
            self._stats.written_bytes += size
            evicted = self._evict_to_fit_locked()
        if evicted:
            self._run_evict_callbacks(evicted)
        return True

    def _evict_to_fit_locked(self) -> list[tuple[ChunkKey, bytes]]:
        evicted: list[tuple[ChunkKey, bytes]] = []
        while self._used_bytes > self._capacity_bytes:
            victim, obj = self._entries.popitem(last=False)
            self._used_bytes -= len(obj)
            self._stats.evictions += 1
            evicted.append((victim, obj))
            if self.on_evict is not None:
                self._evicting[victim] = obj
        # The newest object is at most the capacity, so it is never its own victim.
        assert self._used_bytes >= 0
        return evicted

    def _run_evict_callbacks(self, evicted: list[tuple[ChunkKey, bytes]]) -> None:
        callback = self.on_evict
        for victim, obj in evicted:
            try:
                if callback is not None:
                    callback(victim, obj)
            except Exception:
                # The put that triggered the eviction succeeded; a failing demotion
                # only loses a cached copy, so it must not fail the caller.
                logger.exception("on_evict callback failed for chunk %s", victim.hex())
            finally:
                with self._lock:
                    if self._evicting.get(victim) is obj:
                        del self._evicting[victim]

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._entries or k in self._evicting for k in keys]

    def delete(self, key: ChunkKey) -> bool:
        """Drop ``key`` (also from objects mid-eviction); True if it was held."""
        with self._lock:
            obj = self._entries.pop(key, None)
            if obj is not None:
                self._used_bytes -= len(obj)
            was_evicting = self._evicting.pop(key, None) is not None
            return obj is not None or was_evicting

    def keys(self) -> list[ChunkKey]:
        """Snapshot of the held keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> TierStats:
        with self._lock:
            return dataclasses.replace(
                self._stats,
                used_bytes=self._used_bytes,
                num_objects=len(self._entries),
                info={"io": "dram"},
            )

    def close(self) -> None:
        """Drop every object (without eviction callbacks: the engine flushes first)."""
        with self._lock:
            self._entries.clear()
            self._evicting.clear()
            self._used_bytes = 0
