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
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvstore.arena_file import ALIGN, FreeList
from kvstore.codec.format import CodecId, read_header
from kvstore.config import GpuTierConfig
from kvstore.errors import Corrupt, InvalidArgument, NotFound
from kvstore.keys import ChunkKey
from kvstore.tiers.base import EvictCallback, TierStats

logger = logging.getLogger(__name__)

LeaseId = int
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


@dataclass(slots=True)
class _Slot:
    offset: int  # byte offset in the slab
    length: int  # object bytes (the allocation is length rounded up to ALIGN)
    checksum: int  # device checksum of the object
    leases: int = 0  # live leases (and in-flight reads) covering this slot
    deleted: bool = False  # removed from the index; freed when leases reach 0


@dataclass(slots=True)
class _Lease:
    slots: list[_Slot]
    expires_at: float  # time.monotonic() deadline


def _aligned(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


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
        self._free = FreeList(self._capacity_bytes)
        self._index: OrderedDict[ChunkKey, _Slot] = OrderedDict()  # LRU first
        self._evicting: dict[ChunkKey, bytes] = {}  # evicted, on_evict still running
        self._leases: dict[LeaseId, _Lease] = {}
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()  # one staging buffer: uploads take turns
        self._used_bytes = 0
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
            if key in self._index:
                self._index.move_to_end(key)
                return True
            if _aligned(nbytes) > self._capacity_bytes:
                return False
            offset = self._allocate(_aligned(nbytes), evicted)
        try:
            if offset is None:
                return False
            checksum = self._upload(offset, nbytes, fill)
            if checksum is None:
                with self._lock:
                    self._free.free(offset, _aligned(nbytes))
                return False
            self._insert(key, _Slot(offset, nbytes, checksum))
            return True
        finally:
            self._notify(evicted)

    def _upload(self, offset: int, nbytes: int, fill: Filler) -> int | None:
        with self._upload_lock:
            if not fill(self._slab.staging(nbytes)):
                return None
            return self._slab.upload_staged(offset, nbytes)

    def _insert(self, key: ChunkKey, slot: _Slot) -> None:
        with self._lock:
            if key in self._index:  # a racing put of the same (content-addressed) key won
                self._free.free(slot.offset, _aligned(slot.length))
                self._index.move_to_end(key)
                return
            self._index[key] = slot
            self._used_bytes += slot.length
            self._stats.puts += 1
            self._stats.written_bytes += slot.length

    def get(self, key: ChunkKey) -> bytes | None:
        """The object copied back to the host (now most recently used), or None."""
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                obj = self._evicting.get(key)
                self._count_read(obj)
                return obj
            self._index.move_to_end(key)
            slot.leases += 1  # pinned while copied outside the lock
        try:
            obj = self._slab.read(slot.offset, slot.length)
        finally:
            with self._lock:
                self._unpin(slot)
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
            return [k in self._index or k in self._evicting for k in keys]

    def delete(self, key: ChunkKey) -> bool:
        """Drop ``key`` (also from objects mid-eviction); True if it was held."""
        with self._lock:
            was_evicting = self._evicting.pop(key, None) is not None
            slot = self._index.pop(key, None)
            if slot is not None:
                self._release_slot(slot)
            return slot is not None or was_evicting

    def keys(self) -> list[ChunkKey]:
        """Held keys, least recently used first."""
        with self._lock:
            return list(self._index)

    def stats(self) -> TierStats:
        with self._lock:
            self._expire_leases()
            return dataclasses.replace(
                self._stats, used_bytes=self._used_bytes, num_objects=len(self._index),
                info={"device": f"cuda:{self._slab.device}", "leases": str(len(self._leases))})

    def close(self) -> None:
        """Drop every object and free the slab (no eviction callbacks: DRAM has them)."""
        with self._lock:
            self._index.clear()
            self._evicting.clear()
            self._leases.clear()
            self._used_bytes = 0
        self._slab.close()

    # -- leases -----------------------------------------------------------------------

    def lease(self, keys: Sequence[ChunkKey], ttl_s: float | None = None
              ) -> tuple[LeaseId, list[GpuExtent]]:
        """Pin the leading held ``keys``; the lease and their extents (maybe [])."""
        with self._lock:
            self._expire_leases()
            slots: list[_Slot] = []
            for key in keys:
                slot = self._index.get(key)
                if slot is None:
                    break
                self._index.move_to_end(key)
                slot.leases += 1
                slots.append(slot)
            lease_id = self._new_lease_id()
            ttl = self.lease_ttl_s if ttl_s is None else ttl_s
            self._leases[lease_id] = _Lease(slots, time.monotonic() + ttl)
            return lease_id, [GpuExtent(s.offset, s.length, s.checksum) for s in slots]

    def extend_lease(self, lease_id: LeaseId, key: ChunkKey) -> GpuExtent | None:
        """Add a held ``key`` to a lease; None if the tier lacks it.

        Raises:
            NotFound: the lease is not held (released or expired).
        """
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise NotFound(f"GPU lease {lease_id} is not held (released or expired)")
            slot = self._index.get(key)
            if slot is None:
                return None
            self._index.move_to_end(key)
            slot.leases += 1
            lease.slots.append(slot)
            return GpuExtent(slot.offset, slot.length, slot.checksum)

    def release_lease(self, lease_id: LeaseId) -> None:
        """End a lease; raises NotFound if it is not held (released or expired)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise NotFound(f"GPU lease {lease_id} is not held (released or expired)")
            for slot in lease.slots:
                self._unpin(slot)

    def num_leases(self) -> int:
        with self._lock:
            self._expire_leases()
            return len(self._leases)

    # -- internals (lock held) ----------------------------------------------------------

    def _new_lease_id(self) -> LeaseId:
        while True:  # random, so one local process cannot guess another's lease
            lease_id = secrets.randbits(63) + 1
            if lease_id not in self._leases:
                return lease_id

    def _allocate(self, size: int, evicted: list[tuple[ChunkKey, bytes]]) -> int | None:
        self._expire_leases()
        offset = self._free.allocate(size)
        while offset is None:
            victim = next((k for k, s in self._index.items() if s.leases == 0), None)
            if victim is None:
                return None
            slot = self._index.pop(victim)
            # Read back before the space is reused: the engine demotes these bytes.
            data = self._slab.read(slot.offset, slot.length)
            evicted.append((victim, data))
            if self.on_evict is not None:
                self._evicting[victim] = data
            self._stats.evictions += 1
            self._release_slot(slot)
            offset = self._free.allocate(size)
        return offset

    def _release_slot(self, slot: _Slot) -> None:
        slot.deleted = True
        self._used_bytes -= slot.length
        if slot.leases == 0:
            self._free.free(slot.offset, _aligned(slot.length))

    def _unpin(self, slot: _Slot) -> None:
        slot.leases -= 1
        if slot.leases == 0 and slot.deleted:
            self._free.free(slot.offset, _aligned(slot.length))

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            logger.info("GPU lease %d expired", lease_id)
            for slot in self._leases.pop(lease_id).slots:
                self._unpin(slot)

    def _notify(self, evicted: list[tuple[ChunkKey, bytes]]) -> None:
        """Run on_evict (outside the lock); the victim stays visible until it returns."""
        callback = self.on_evict
        for key, data in evicted:
            try:
                if callback is not None:
                    callback(key, data)
            except Exception:
                # The put that evicted succeeded; a failed demotion loses only a copy.
                logger.exception("GPU tier on_evict failed for chunk %s", key.hex())
            finally:
                with self._lock:
                    if self._evicting.get(key) is data:
                        del self._evicting[key]
