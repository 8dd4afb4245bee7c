"""The GPU HBM tier: raw KVC1 objects in one device slab, LRU within it, and leases.

The tier is the DRAM arena's design moved to HBM. One device allocation (the
*slab*, ``tiers.gpu.capacity_bytes``) holds objects on 64-byte boundaries, placed
first-fit (the arena's allocator); an LRU index evicts within it. A same-host
client opens the slab once through a CUDA IPC handle and copies chunks out of it
device to device, under a *lease* that pins them exactly like an arena lease: a
leased object is never evicted, freed or reused, deleting it hides it at once, and
a lease ends by release or after its TTL (so a killed client pins nothing longer).

Each object keeps a device checksum (``kvstore.device_checksum``), computed on the
device after its upload from bytes that were verified against their XXH3; clients
recompute it over what they copied. Only *raw* objects are held: their payload is
the decoded ``[layers, 2, kv_heads, tokens, head_dim]`` tensor a client copies into
its KV cache (kvq chunks stay in DRAM; see docs/design.md §5).

Storage sits behind `DeviceSlab`, so the placement, eviction and lease logic runs
without CUDA: production uses ``kvstore.tiers.gpu_cuda.CudaSlab``; tests use a
host-memory slab of the same interface (tests/fakes.py).

Eviction hands each victim's bytes (read back from the device before its space is
reused) to ``on_evict`` outside the lock; until that returns the victim stays
visible to ``contains_many``/``get``, so the engine can demote it to DRAM without a
window where the chunk is nowhere.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvstore.arena_file import ALIGN
from kvstore.arena_slots import LeaseId, Slot, SlotTable, aligned
from kvstore.codec.format import CodecId, read_header
from kvstore.config import GpuTierConfig
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.tiers.base import EvictCallback, TierStats

logger = logging.getLogger(__name__)

# Fills a host buffer with one object (e.g. a disk read into the slab's staging
# buffer); returns False when it could not (missing, unreadable or corrupt).
Filler = Callable[[memoryview], bool]


class DeviceSlab(Protocol):
    """One device allocation the tier places objects in (CUDA in production)."""

    nbytes: int  # size of the allocation
    device: int  # CUDA device index in the daemon (the fake says 0)
    pci_bus_id: str  # the device's PCI bus id, which names it across processes

    def staging(self, nbytes: int) -> memoryview:
        """A writable host buffer of ``nbytes`` (pinned on CUDA) for the next upload."""
        ...

    def upload_staged(self, offset: int, nbytes: int) -> int:
        """Copy the staging buffer's first ``nbytes`` to ``offset``; returns their checksum."""
        ...

    def read(self, offset: int, nbytes: int) -> bytes:
        """Copy ``nbytes`` at ``offset`` back to the host."""
        ...

    def ipc_handle(self) -> bytes:
        """What a same-host process needs to open the slab (a CUDA IPC handle)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class GpuExtent:
    """Where a leased object lies in the slab, and its device checksum."""

    offset: int  # bytes from the start of the slab (a multiple of 64)
    length: int  # object bytes
    checksum: int  # kvstore.device_checksum of the object's bytes


def is_raw_object(obj: bytes | memoryview) -> bool:
    """True for a raw (decoded) KVC1 object: the only kind the tier holds."""
    try:
        return read_header(obj).codec_id == CodecId.RAW
    except Corrupt:
        return False


class GpuTier:
    """GPU tier, name ``"gpu"``: raw objects in a `DeviceSlab`, LRU, leases; thread-safe."""

    name = "gpu"

    def __init__(self, config: GpuTierConfig, slab: DeviceSlab,
                 on_evict: EvictCallback | None = None) -> None:
        if slab.nbytes < ALIGN:
            raise InvalidArgument(f"the GPU slab must be >= {ALIGN} bytes, got {slab.nbytes}")
        self.on_evict = on_evict  # the engine sets it to demote victims to DRAM
        self.lease_ttl_s = config.lease_ttl_s
        self.promote_after_hits = config.promote_after_hits  # read by the engine
        self.nonce = secrets.token_bytes(16)  # tells clients which slab they opened
        self._slab = slab
        self._capacity_bytes = slab.nbytes // ALIGN * ALIGN
        # The LRU index, free list and leases (the arena's); each slot keeps the
        # object's device checksum. Victims are read back before their space is
        # reused: the engine demotes these bytes.
        self._slots = SlotTable(self._capacity_bytes, 0,
                                lambda slot: self._slab.read(slot.offset, slot.length),
                                log=logger, name="GPU", lease_noun="GPU lease")
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()  # one staging buffer: uploads take turns
        self._stats = TierStats(name=self.name, capacity_bytes=self._capacity_bytes)

    @property
    def device(self) -> int:
        return self._slab.device

    @property
    def slab_bytes(self) -> int:
        return self._slab.nbytes

    @property
    def pci_bus_id(self) -> str:
        return self._slab.pci_bus_id

    def ipc_handle(self) -> bytes:
        return self._slab.ipc_handle()

    # -- the Tier protocol ------------------------------------------------------------

    def put(self, key: ChunkKey, obj: bytes) -> bool:
        """Upload a raw object; False if it is not raw, too big, or its room is leased."""
        if not is_raw_object(obj):
            return False
        data = memoryview(obj)

        def fill(buf: memoryview) -> bool:
            buf[:] = data
            return True

        return self.put_filled(key, len(obj), fill)

    def put_filled(self, key: ChunkKey, nbytes: int, fill: Filler) -> bool:
        """Upload an object that ``fill`` writes into the slab's host staging buffer.

        Lets the disk tier read a file straight into pinned memory (kvikio or POSIX)
        on its way to HBM. The caller checks that the object is raw and verified.
        """
        evicted: list[tuple[ChunkKey, bytes]] = []
        with self._lock:
            if self._slots.touch(key):
                return True
            if aligned(nbytes) > self._capacity_bytes:
                return False
            offset = self._allocate(aligned(nbytes), evicted)
        try:
            if offset is None:
                return False
            checksum = self._upload(offset, nbytes, fill)
            if checksum is None:
                with self._lock:
                    self._slots.free_space(offset, nbytes)
                return False
            self._insert(key, Slot(offset, nbytes, checksum))
            return True
        finally:
            self._notify(evicted)

    def _upload(self, offset: int, nbytes: int, fill: Filler) -> int | None:
        with self._upload_lock:
            if not fill(self._slab.staging(nbytes)):
                return None
            return self._slab.upload_staged(offset, nbytes)

    def _insert(self, key: ChunkKey, slot: Slot) -> None:
        with self._lock:
            if not self._slots.insert(key, slot):  # a racing put of the same key won
                return
            self._stats.puts += 1
            self._stats.written_bytes += slot.length

    def get(self, key: ChunkKey) -> bytes | None:
        """The object copied back to the host (now most recently used), or None."""
        with self._lock:
            slot = self._slots.pin(key, touch=True)  # pinned while copied outside the lock
            if slot is None:
                obj = self._slots.evicting.get(key)
                self._count_read(obj)
                return obj
        try:
            obj = self._slab.read(slot.offset, slot.length)
        finally:
            with self._lock:
                self._slots.unpin(slot)
        with self._lock:
            self._count_read(obj)
        return obj

    def _count_read(self, obj: bytes | None) -> None:
        if obj is None:
            self._stats.misses += 1
        else:
            self._stats.hits += 1
            self._stats.read_bytes += len(obj)

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [self._slots.contains(k) for k in keys]

    def delete(self, key: ChunkKey) -> bool:
        """Drop ``key`` (also from objects mid-eviction); True if it was held."""
        with self._lock:
            return self._slots.delete(key)

    def keys(self) -> list[ChunkKey]:
        """Held keys, least recently used first."""
        with self._lock:
            return list(self._slots.index)

    def stats(self) -> TierStats:
        with self._lock:
            self._slots.expire_leases()
            return dataclasses.replace(
                self._stats, used_bytes=self._slots.used_bytes,
                num_objects=len(self._slots.index), evictions=self._slots.evictions,
                info={"device": f"cuda:{self._slab.device}",
                      "leases": str(len(self._slots.leases))})

    def close(self) -> None:
        """Drop every object and free the slab (no eviction callbacks: DRAM has them)."""
        with self._lock:
            self._slots.clear()
        self._slab.close()

    # -- leases -----------------------------------------------------------------------

    def lease(self, keys: Sequence[ChunkKey], ttl_s: float | None = None
              ) -> tuple[LeaseId, list[GpuExtent]]:
        """Pin the leading held ``keys``; the lease and their extents (maybe [])."""
        with self._lock:
            self._slots.expire_leases()
            ttl = self.lease_ttl_s if ttl_s is None else ttl_s
            lease_id, slots = self._slots.lease(keys, ttl)
            return lease_id, [GpuExtent(s.offset, s.length, s.checksum) for s in slots]

    def extend_lease(self, lease_id: LeaseId, key: ChunkKey) -> GpuExtent | None:
        """Add a held ``key`` to a lease; None if the tier lacks it.

        Raises:
            NotFound: the lease is not held (released or expired).
        """
        with self._lock:
            slot = self._slots.extend(lease_id, key)
            return None if slot is None else GpuExtent(slot.offset, slot.length, slot.checksum)

    def release_lease(self, lease_id: LeaseId) -> None:
        """End a lease; raises NotFound if it is not held (released or expired)."""
        with self._lock:
            self._slots.release(lease_id)

    def num_leases(self) -> int:
        with self._lock:
            self._slots.expire_leases()
            return len(self._slots.leases)

    # -- internals -----------------------------------------------------------------------

    def _allocate(self, size: int, evicted: list[tuple[ChunkKey, bytes]]) -> int | None:
        """Room for ``size`` bytes, evicting unleased LRU objects (lock held)."""
        self._slots.expire_leases()
        return self._slots.allocate(size, evicted, keep_evicting=self.on_evict is not None)

    def _notify(self, evicted: list[tuple[ChunkKey, bytes]]) -> None:
        """Run on_evict (outside the lock); the victim stays visible until it returns."""
        self._slots.finish_evictions(evicted, self.on_evict, self._lock)
