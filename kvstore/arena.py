"""Shared-memory DRAM arena: objects live in one mmap'd file that same-host clients map.

The daemon owns the arena (read-write); clients map the same file read-only and
copy out of it, so large same-host reads never cross a socket (DESIGN §5).

Safety model: a reader may only touch bytes it holds a *lease* on. While a lease
is live the arena never evicts, frees or reuses those bytes, so a reader can
never see them torn. A lease expires after its TTL, so a client that dies while
holding one pins nothing for longer than that. Deleting a leased object hides it
at once and frees its bytes when the last lease on it ends.

The file lives in /dev/shm (POSIX shared memory) with mode 0600: only processes of
the daemon's user can map it. All tenants' objects share one arena, so the daemon
hands arena references only to callers it trusts with the whole arena (see
docs/design.md, "same-host path").
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.errors import InvalidArgument, NotFound
from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)

ALIGN = 4096  # every object starts on a page boundary
LeaseId = int


@dataclass(slots=True)
class _Slot:
    offset: int  # byte offset in the arena file
    length: int  # object bytes (the allocation is length rounded up to ALIGN)
    leases: int = 0  # live leases covering this slot
    deleted: bool = False  # removed from the index; freed when leases reach 0


@dataclass(slots=True)
class _Lease:
    slots: list[_Slot]
    expires_at: float  # time.monotonic() deadline


@dataclass(frozen=True, slots=True)
class Extent:
    """Where one object lies in the arena file."""

    offset: int  # bytes from the start of the file
    length: int  # bytes of the object


@dataclass(slots=True)
class _FreeList:
    """First-fit allocator over [0, capacity) in ALIGN units, coalescing on free.

    Kept as a sorted list of (offset, length) holes; bisect makes insert and
    coalesce O(log n) to find plus a list insert, fine for thousands of holes.
    """

    capacity: int
    holes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.holes = [(0, self.capacity)]

    def allocate(self, size: int) -> int | None:
        for i, (offset, length) in enumerate(self.holes):
            if length >= size:
                if length == size:
                    del self.holes[i]
                else:
                    self.holes[i] = (offset + size, length - size)
                return offset
        return None

    def free(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self.holes, (offset, 0))
        if i > 0 and sum(self.holes[i - 1]) == offset:  # merge with the hole before
            i -= 1
            offset, size = self.holes[i][0], self.holes[i][1] + size
            del self.holes[i]
        if i < len(self.holes) and offset + size == self.holes[i][0]:  # and the one after
            size += self.holes[i][1]
            del self.holes[i]
        self.holes.insert(i, (offset, size))

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self.holes)


def _aligned(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Arena:
    """Objects keyed by ChunkKey in a shared-memory file, with LRU eviction and leases."""

    def __init__(self, capacity_bytes: int, *, directory: str = "/dev/shm",
                 on_evict: Callable[[ChunkKey, bytes], None] | None = None,
                 lease_ttl_s: float = 30.0) -> None:
        if capacity_bytes < ALIGN:
            raise InvalidArgument(f"arena capacity must be >= {ALIGN} bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes // ALIGN * ALIGN
        self.lease_ttl_s = lease_ttl_s
        self.on_evict = on_evict
        base = Path(directory) if Path(directory).is_dir() else Path("/tmp")
        self.path = str(base / f"kvstore-arena-{os.getpid()}-{secrets.token_hex(6)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.capacity_bytes)
            self._map = mmap.mmap(fd, self.capacity_bytes)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self._free = _FreeList(self.capacity_bytes)
        self._index: OrderedDict[ChunkKey, _Slot] = OrderedDict()  # LRU first
        self._leases: dict[LeaseId, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.used_bytes = 0  # bytes of live objects (unaligned)
        self.evictions = 0

    # -- objects -------------------------------------------------------------------
    def put(self, key: ChunkKey, obj: bytes | memoryview) -> bool:
        """Store ``obj``; False if it can never fit or space is pinned by leases."""
        size = memoryview(obj).nbytes
        evicted: list[tuple[ChunkKey, bytes]] = []
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return True
            if _aligned(size) > self.capacity_bytes:
                return False
            offset = self._allocate(_aligned(size), evicted)
            if offset is not None:
                self._view[offset : offset + size] = memoryview(obj).cast("B")
                self._index[key] = _Slot(offset, size)
                self.used_bytes += size
        self._notify(evicted)
        return offset is not None

    def get(self, key: ChunkKey) -> bytes | None:
        """A private copy of the object (safe to keep after eviction), or None."""
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                return None
            self._index.move_to_end(key)
            return bytes(self._view[slot.offset : slot.offset + slot.length])

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._index

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            slot = self._index.pop(key, None)
            if slot is None:
                return False
            self._release_slot(slot, deleted=True)
            return True

    def keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    # -- leases --------------------------------------------------------------------
    def lease(self, keys: Sequence[ChunkKey], ttl_s: float | None = None
              ) -> tuple[LeaseId, list[Extent]]:
        """Pin the leading present ``keys``; returns the lease and their extents (maybe [])."""
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
            lease_id = next(self._lease_ids)
            ttl = self.lease_ttl_s if ttl_s is None else ttl_s
            self._leases[lease_id] = _Lease(slots, time.monotonic() + ttl)
            return lease_id, [Extent(s.offset, s.length) for s in slots]

    def release(self, lease_id: LeaseId) -> None:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise NotFound(f"lease {lease_id} is not held (released or expired)")
            for slot in lease.slots:
                self._unpin(slot)

    def num_leases(self) -> int:
        with self._lock:
            self._expire_leases()
            return len(self._leases)

    # -- internals (lock held) -----------------------------------------------------
    def _allocate(self, size: int, evicted: list[tuple[ChunkKey, bytes]]) -> int | None:
        self._expire_leases()
        offset = self._free.allocate(size)
        while offset is None:
            victim = next((k for k, s in self._index.items() if s.leases == 0), None)
            if victim is None:
                return None
            slot = self._index.pop(victim)
            evicted.append((victim, bytes(self._view[slot.offset : slot.offset + slot.length])))
            self.evictions += 1
            self._release_slot(slot, deleted=True)
            offset = self._free.allocate(size)
        return offset

    def _release_slot(self, slot: _Slot, *, deleted: bool) -> None:
        slot.deleted = deleted
        self.used_bytes -= slot.length
        if slot.leases == 0:
            self._free.free(slot.offset, _aligned(slot.length))

    def _unpin(self, slot: _Slot) -> None:
        slot.leases -= 1
        if slot.leases == 0 and slot.deleted:
            self._free.free(slot.offset, _aligned(slot.length))

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            log.info("arena lease %d expired", lease_id)
            for slot in self._leases.pop(lease_id).slots:
                self._unpin(slot)

    def _notify(self, evicted: list[tuple[ChunkKey, bytes]]) -> None:
        if self.on_evict is not None:
            for key, obj in evicted:
                self.on_evict(key, obj)

    def close(self) -> None:
        with self._lock:
            self._view.release()
            self._map.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ArenaReader:
    """A client's read-only mapping of a daemon's arena file."""

    def __init__(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise NotFound(f"cannot open arena {path}: {exc}") from exc
        try:
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path
        self._view = memoryview(self._map)

    def view(self, extent: Extent) -> memoryview:
        """Zero-copy view of one leased object; valid until the lease ends."""
        if extent.offset < 0 or extent.offset + extent.length > self._view.nbytes:
            raise InvalidArgument(f"extent {extent} outside the arena of {self._view.nbytes} bytes")
        return self._view[extent.offset : extent.offset + extent.length]

    def close(self) -> None:
        self._view.release()
        self._map.close()

