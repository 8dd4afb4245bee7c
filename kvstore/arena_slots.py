"""Slot and lease bookkeeping shared by the DRAM arena and the GPU HBM tier.

Both place objects first-fit in one flat region (a mmap'd file, a device slab),
keep an LRU index of them, and pin them under *leases*: a leased slot is never
evicted, freed or reused; deleting it hides it at once and frees its space when
the last lease on it ends; a lease ends by release or after its TTL. This module
owns that bookkeeping and nothing else: it does no I/O and takes no lock (every
method runs under the owner's lock, except ``finish_evictions``, which takes it).
Where the bytes live stays with the owner, which passes ``read`` to copy a
victim's bytes out before its space is reused.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from kvstore.arena_file import ALIGN, FreeList
from kvstore.errors import NotFound
from kvstore.keys import ChunkKey

LeaseId = int
Evicted = list[tuple[ChunkKey, bytes]]


@dataclass(slots=True)
class Slot:
    offset: int  # byte offset in the owner's region
    length: int  # object bytes (the allocation is length rounded up to ALIGN)
    checksum: int = 0  # the GPU tier's device checksum of the object (the arena: unused)
    leases: int = 0  # live leases (and in-flight copies) covering this slot
    deleted: bool = False  # removed from the index; freed when leases reach 0


@dataclass(slots=True)
class Lease:
    slots: list[Slot]
    expires_at: float  # time.monotonic() deadline


def aligned(n: int) -> int:
    """The allocation for an object of ``n`` bytes: ALIGN multiples, at least one."""
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class SlotTable:
    """LRU index, free list, leases and eviction of one region; the caller holds its lock.

    Args:
        capacity: usable bytes (a multiple of ALIGN).
        start: offset of the first usable byte.
        read: copies a slot's bytes out (called on eviction, under the owner's lock).
        log: the owner's logger (lease expiries and failed eviction callbacks).
        name: the owner in log lines ("arena", "GPU").
        lease_noun: how errors name a lease ("lease", "GPU lease").
    """

    def __init__(self, capacity: int, start: int, read: Callable[[Slot], bytes], *,
                 log: logging.Logger, name: str, lease_noun: str) -> None:
        self.free = FreeList(capacity, start)
        self.index: OrderedDict[ChunkKey, Slot] = OrderedDict()  # LRU first
        self.evicting: dict[ChunkKey, bytes] = {}  # evicted, on_evict still running
        self.leases: dict[LeaseId, Lease] = {}
        self.used_bytes = 0  # bytes of live objects (unaligned)
        self.evictions = 0
        self._read = read
        self._log = log
        self._name = name
        self._lease_noun = lease_noun

    # -- objects --------------------------------------------------------------------
    def touch(self, key: ChunkKey) -> bool:
        """Make ``key`` most recently used; False if it is not indexed."""
        if key not in self.index:
            return False
        self.index.move_to_end(key)
        return True

    def add(self, key: ChunkKey, slot: Slot) -> None:
        self.index[key] = slot
        self.used_bytes += slot.length

    def insert(self, key: ChunkKey, slot: Slot) -> bool:
        """Index ``slot``; False (its space freed) if a racing put of ``key`` won."""
        if self.touch(key):  # content-addressed: the same key is the same bytes
            self.free_space(slot.offset, slot.length)
            return False
        self.add(key, slot)
        return True

    def pin(self, key: ChunkKey, *, touch: bool) -> Slot | None:
        """Pin ``key``'s slot for a copy outside the lock (``unpin`` after); None if absent."""
        slot = self.index.get(key)
        if slot is None:
            return None
        if touch:
            self.index.move_to_end(key)
        slot.leases += 1
        return slot

    def contains(self, key: ChunkKey) -> bool:
        return key in self.index or key in self.evicting

    def delete(self, key: ChunkKey) -> bool:
        """Drop ``key`` (also from objects mid-eviction); True if it was held."""
        was_evicting = self.evicting.pop(key, None) is not None
        slot = self.index.pop(key, None)
        if slot is not None:
            self.release_slot(slot)
        return slot is not None or was_evicting

    def clear(self) -> None:
        self.index.clear()
        self.evicting.clear()
        self.leases.clear()
        self.used_bytes = 0

    # -- space ------------------------------------------------------------------------
    def free_space(self, offset: int, length: int) -> None:
        self.free.free(offset, aligned(length))

    def allocate(self, size: int, evicted: Evicted, *, keep_evicting: bool) -> int | None:
        """Room for ``size`` (aligned) bytes, evicting unleased LRU objects; None if pinned.

        Each victim's bytes go to ``evicted``; with ``keep_evicting`` (an on_evict is
        set) they stay readable through ``evicting`` until ``finish_evictions``.
        """
        offset = self.free.allocate(size)
        while offset is None:
            victim = next((k for k, s in self.index.items() if s.leases == 0), None)
            if victim is None:
                return None
            slot = self.index.pop(victim)
            data = self._read(slot)  # before the space is reused
            evicted.append((victim, data))
            if keep_evicting:
                self.evicting[victim] = data
            self.evictions += 1
            self.release_slot(slot)
            offset = self.free.allocate(size)
        return offset

    def release_slot(self, slot: Slot) -> None:
        slot.deleted = True
        self.used_bytes -= slot.length
        if slot.leases == 0:
            self.free_space(slot.offset, slot.length)

    def unpin(self, slot: Slot) -> None:
        slot.leases -= 1
        if slot.leases == 0 and slot.deleted:
            self.free_space(slot.offset, slot.length)

    # -- leases -----------------------------------------------------------------------
    def new_lease_id(self, also_taken: Container[LeaseId] = ()) -> LeaseId:
        # Random, not sequential: a local process cannot guess and release (or
        # extend) another client's lease.
        while True:
            lease_id = secrets.randbits(63) + 1
            if lease_id not in self.leases and lease_id not in also_taken:
                return lease_id

    def lease(self, keys: Sequence[ChunkKey], ttl_s: float,
              also_taken: Container[LeaseId] = ()) -> tuple[LeaseId, list[Slot]]:
        """Pin the leading indexed ``keys`` (touching them); the lease and their slots."""
        slots: list[Slot] = []
        for key in keys:
            slot = self.pin(key, touch=True)
            if slot is None:
                break
            slots.append(slot)
        lease_id = self.new_lease_id(also_taken)
        self.leases[lease_id] = Lease(slots, time.monotonic() + ttl_s)
        return lease_id, slots

    def extend(self, lease_id: LeaseId, key: ChunkKey) -> Slot | None:
        """Add ``key`` to a held lease; its slot, or None if it is not indexed.

        Raises:
            NotFound: the lease is not held (released or expired).
        """
        lease = self._held(lease_id)
        slot = self.pin(key, touch=True)
        if slot is not None:
            lease.slots.append(slot)
        return slot

    def release(self, lease_id: LeaseId) -> None:
        """End a lease; raises NotFound if it is not held (released or expired)."""
        self._held(lease_id)
        for slot in self.leases.pop(lease_id).slots:
            self.unpin(slot)

    def expire_leases(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, lease in self.leases.items() if lease.expires_at <= now]:
            self._log.info("%s lease %d expired", self._name, lease_id)
            for slot in self.leases.pop(lease_id).slots:
                self.unpin(slot)

    def _held(self, lease_id: LeaseId) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"{self._lease_noun} {lease_id} is not held (released or expired)")
        return lease

    # -- eviction callbacks (outside the owner's lock) --------------------------------
    def finish_evictions(self, evicted: Evicted, callback: Callable[[ChunkKey, bytes], None]
                         | None, lock: threading.Lock) -> None:
        """Run on_evict on each victim; it stays readable through ``evicting`` until then."""
        for key, data in evicted:
            try:
                if callback is not None:
                    callback(key, data)
            except Exception:
                # The put that evicted succeeded; a failing demotion only loses a
                # cached copy, so it must not fail the caller.
                self._log.exception("%s on_evict callback failed for chunk %s",
                                    self._name, key.hex())
            finally:
                with lock:
                    if self.evicting.get(key) is data:
                        del self.evicting[key]
