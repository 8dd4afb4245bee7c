"""Shared-memory DRAM arena: objects live in one mmap'd file that same-host clients map.

The daemon owns the arena (read-write); clients map the same file read-only
(``ArenaReader``) and copy out of it, so large same-host reads never cross a
socket (DESIGN §5). The file format is in ``kvstore.arena_file``.

Safety model: a reader may only touch bytes it holds a *lease* on. While a lease
is live the arena never evicts, frees or reuses those bytes, so a reader can
never see them torn. A lease expires after its TTL, so a client that dies while
holding one pins nothing for longer than that. Deleting a leased object hides it
at once and frees its bytes when the last lease on it ends.

All tenants' objects share one arena, so the daemon hands arena references only
to callers it trusts with the whole arena (see docs/design.md §5).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvstore.arena_file import (
    ALIGN,
    FILE_HEADER,
    FILE_MAGIC,
    FILE_VERSION,
    HEADER_BYTES,
    PAGE_BYTES,
    ArenaIdentity,
    ArenaReader,
    Extent,
    FreeList,
    Placement,
    create_file,
    prefault,
    remove_stale_files,
    round_up,
)
from kvstore.errors import InvalidArgument, NotFound
from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)

__all__ = ["ALIGN", "Arena", "ArenaIdentity", "ArenaReader", "Extent", "LeaseId", "Placement"]

LeaseId = int
EvictCallback = Callable[[ChunkKey, bytes], None]


@dataclass(slots=True)
class _Slot:
    offset: int  # byte offset in the arena file
    length: int  # object bytes (the allocation is length rounded up to ALIGN)
    leases: int = 0  # live leases (and in-flight copies) covering this slot
    deleted: bool = False  # removed from the index; freed when leases reach 0


@dataclass(slots=True)
class _Lease:
    slots: list[_Slot]
    expires_at: float  # time.monotonic() deadline


@dataclass(slots=True)
class _Reservation:
    """Space handed to a same-host writer, not yet holding any indexed object."""

    extents: list[Extent]  # one per object to write, ``length`` = its exact size
    expires_at: float  # time.monotonic() deadline; ignored once committing
    tag: Any  # the reserver's record (the daemon keeps the chunk keys there)
    is_committing: bool = False  # claimed by a commit: no longer expires
    adopted: dict[int, _Slot] = field(default_factory=dict)  # extent index -> indexed slot




def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _aligned(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Arena:
    """Objects keyed by ChunkKey in a shared-memory file, with LRU eviction and leases.

    Eviction hands each dropped object (a private copy) to ``on_evict`` *outside*
    the lock; until that callback returns the object stays readable through
    ``get``/``peek``/``contains`` although its bytes are already reused, so a
    reader never sees a chunk vanish before its demotion has landed.
    """

    def __init__(self, capacity_bytes: int, *, directory: str = "/dev/shm",
                 on_evict: EvictCallback | None = None, lease_ttl_s: float = 30.0,
                 hugepages: bool = False) -> None:
        if capacity_bytes < ALIGN:
            raise InvalidArgument(f"arena capacity must be >= {ALIGN} bytes, got {capacity_bytes}")
        if lease_ttl_s <= 0:
            raise InvalidArgument(f"arena lease TTL must be > 0 s, got {lease_ttl_s}")
        self.capacity_bytes = capacity_bytes // ALIGN * ALIGN
        self.lease_ttl_s = lease_ttl_s
        self.on_evict = on_evict
        remove_stale_files(directory)
        file_bytes = HEADER_BYTES + round_up(self.capacity_bytes, PAGE_BYTES)
        self.path, self._map, self.hugepages = create_file(directory, file_bytes,
                                                            hugepages=hugepages)
        self.file_bytes = len(self._map)
        self.nonce = secrets.token_bytes(16)
        self._map[: FILE_HEADER.size] = FILE_HEADER.pack(
            FILE_MAGIC, FILE_VERSION, 0, self.capacity_bytes, self.nonce, os.getpid())
        # Unlink the file when the arena is collected or the interpreter exits unclosed.
        self._unlink = weakref.finalize(self, _unlink_quietly, self.path)
        self._view = memoryview(self._map)
        # Set once every page is faulted in (or prefaulting gave up): the daemon reports
        # NOT_SERVING on its health service until then (server/app.py).
        self.prefaulted = threading.Event()
        threading.Thread(target=self._prefault, name="kvstore-arena-prefault",
                         daemon=True).start()
        self._free = FreeList(self.capacity_bytes, HEADER_BYTES)
        self._index: OrderedDict[ChunkKey, _Slot] = OrderedDict()  # LRU first
        self._evicting: dict[ChunkKey, bytes] = {}  # evicted, on_evict still running
        self._leases: dict[LeaseId, _Lease] = {}
        self._reservations: dict[LeaseId, _Reservation] = {}  # same id space as leases
        self._lock = threading.Lock()
        self._closed = False
        self.used_bytes = 0  # bytes of live objects (unaligned)
        self.evictions = 0

    def _prefault(self) -> None:
        try:
            prefault(self._map)
        finally:
            self.prefaulted.set()

    def identity(self) -> ArenaIdentity:
        return ArenaIdentity(self.path, self.file_bytes, self.nonce, self.hugepages)

    # -- objects -------------------------------------------------------------------
    def put(self, key: ChunkKey, obj: bytes | memoryview) -> bool:
        """Store ``obj``; False if it can never fit or the space is pinned by leases.

        The bytes are copied outside the lock into space reserved for them; the
        object becomes visible only once it is complete.
        """
        data = memoryview(obj).cast("B")
        size = data.nbytes
        evicted: list[tuple[ChunkKey, bytes]] = []
        with self._lock:
            self._check_open()
            if key in self._index:
                self._index.move_to_end(key)
                return True
            if _aligned(size) > self.capacity_bytes:
                return False
            offset = self._allocate(_aligned(size), evicted)
        try:
            if offset is not None:
                self._view[offset : offset + size] = data
                self._insert(key, offset, size)
        finally:
            self._notify(evicted)
        return offset is not None

    def _insert(self, key: ChunkKey, offset: int, size: int) -> None:
        with self._lock:
            if key in self._index:  # a racing put of the same (content-addressed) key won
                self._free.free(offset, _aligned(size))
                self._index.move_to_end(key)
                return
            self._index[key] = _Slot(offset, size)
            self.used_bytes += size

    def get(self, key: ChunkKey) -> bytes | None:
        """A private copy of the object (now most recently used), or None."""
        return self._read(key, touch=True)

    def peek(self, key: ChunkKey) -> bytes | None:
        """Like ``get`` without touching the LRU order."""
        return self._read(key, touch=False)

    def _read(self, key: ChunkKey, *, touch: bool) -> bytes | None:
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                return self._evicting.get(key)
            if touch:
                self._index.move_to_end(key)
            slot.leases += 1  # pinned while copied outside the lock
        try:
            return bytes(self._view[slot.offset : slot.offset + slot.length])
        finally:
            with self._lock:
                self._unpin(slot)

    @contextmanager
    def pinned(self, key: ChunkKey) -> Iterator[bytes | memoryview | None]:
        """The object as a view of the arena, pinned for the ``with`` block (no copy)."""
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                evicting = self._evicting.get(key)
            else:
                slot.leases += 1
        if slot is None:
            yield evicting
            return
        view = self._view[slot.offset : slot.offset + slot.length]
        try:
            yield view
        finally:
            try:
                view.release()
            except BufferError:  # the caller kept a slice; it is collected later
                pass
            with self._lock:
                self._unpin(slot)

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._index or key in self._evicting

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

    def __len__(self) -> int:
        return len(self._index)

    # -- leases --------------------------------------------------------------------
    def lease(self, keys: Sequence[ChunkKey], ttl_s: float | None = None
              ) -> tuple[LeaseId, list[Extent]]:
        """Pin the leading present ``keys``; returns the lease and their extents (maybe [])."""
        with self._lock:
            self._check_open()
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
            return lease_id, [Extent(s.offset, s.length) for s in slots]

    def extend(self, lease_id: LeaseId, key: ChunkKey) -> Extent | None:
        """Add ``key`` to a held lease; its extent, or None if the arena lacks it."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise NotFound(f"lease {lease_id} is not held (released or expired)")
            slot = self._index.get(key)
            if slot is None:
                return None
            self._index.move_to_end(key)
            slot.leases += 1
            lease.slots.append(slot)
            return Extent(slot.offset, slot.length)

    def release(self, lease_id: LeaseId) -> None:
        """End a lease, or drop a reservation that no commit has claimed."""
        with self._lock:
            if lease_id in self._reservations and not self._reservations[lease_id].is_committing:
                self._drop_reservation(lease_id)
                return
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise NotFound(f"lease {lease_id} is not held (released or expired)")
            for slot in lease.slots:
                self._unpin(slot)

    def num_leases(self) -> int:
        with self._lock:
            self._expire_leases()
            return len(self._leases)

    # -- reservations: same-host writers ------------------------------------------
    def reserve(self, sizes: Sequence[int], ttl_s: float | None = None, tag: Any = None
                ) -> tuple[LeaseId, list[Extent]] | None:
        """Set aside space for objects of ``sizes`` bytes that a writer fills in place.

        Evicts like ``put``. The space is not indexed: readers cannot see it, and it
        is freed by ``release``, by the TTL (a writer killed before committing pins
        nothing for longer), or, for extents not adopted, by ``finish_reservation``.

        Returns:
            (reservation id, one extent per size), or None when some object cannot be
            placed (larger than the arena, or its room is leased); nothing is then held.
        """
        evicted: list[tuple[ChunkKey, bytes]] = []
        with self._lock:
            self._check_open()
            offsets: list[int] = []
            for size in sizes:
                offset = None if _aligned(size) > self.capacity_bytes else \
                    self._allocate(_aligned(size), evicted)
                if offset is None:
                    for done, done_size in zip(offsets, sizes, strict=False):
                        self._free.free(done, _aligned(done_size))
                    offsets = []
                    break
                offsets.append(offset)
            result = None
            if offsets or not sizes:
                reservation_id = self._new_lease_id()
                extents = [Extent(o, n) for o, n in zip(offsets, sizes, strict=True)]
                ttl = self.lease_ttl_s if ttl_s is None else ttl_s
                self._reservations[reservation_id] = _Reservation(
                    extents, time.monotonic() + ttl, tag)
                result = reservation_id, extents
        self._notify(evicted)
        return result

    def claim_reservation(self, reservation_id: LeaseId) -> tuple[list[Extent], Any]:
        """Start committing: the reservation stops expiring; returns its extents and tag.

        Raises:
            NotFound: unknown, expired, released, or already being committed.
        """
        with self._lock:
            self._expire_leases()
            reservation = self._reservations.get(reservation_id)
            if reservation is None or reservation.is_committing:
                raise NotFound(f"reservation {reservation_id} is not held (expired, released "
                               "or already committed); reserve again")
            reservation.is_committing = True
            return list(reservation.extents), reservation.tag

    def writable_view(self, extent: Extent) -> memoryview:
        """The bytes of a reserved or leased extent (the daemon verifies commits through it)."""
        return self._view[extent.offset : extent.offset + extent.length]

    def adopt(self, placement: Placement, key: ChunkKey) -> bool:
        """Index a claimed reservation's extent as ``key``'s object, without copying.

        The slot stays pinned until ``finish_reservation``, so write-through tiers can
        read it in place. True if ``key`` is held afterwards (when it already was, the
        extent is left to be freed by ``finish_reservation``).
        """
        with self._lock:
            self._check_open()
            reservation = self._reservations[placement.reservation_id]
            assert reservation.is_committing and placement.index not in reservation.adopted
            if key in self._index:  # content-addressed: the object is already held
                self._index.move_to_end(key)
                return True
            extent = reservation.extents[placement.index]
            slot = _Slot(extent.offset, extent.length, leases=1)
            self._index[key] = slot
            self.used_bytes += extent.length
            reservation.adopted[placement.index] = slot
            return True

    def finish_reservation(self, reservation_id: LeaseId) -> None:
        """End a claimed reservation: unpin adopted objects, free every other extent."""
        with self._lock:
            if reservation_id in self._reservations:
                self._drop_reservation(reservation_id)

    def reservation_stats(self) -> tuple[int, int]:
        """(reservations held, bytes they hold)."""
        with self._lock:
            self._expire_leases()
            held = [r for r in self._reservations.values()]
            return len(held), sum(e.length for r in held for e in r.extents)

    # -- internals (lock held) -----------------------------------------------------
    def _new_lease_id(self) -> LeaseId:
        # Random, not sequential: a local process cannot guess and release (or
        # extend) another client's lease.
        while True:
            lease_id = secrets.randbits(63) + 1
            if lease_id not in self._leases and lease_id not in self._reservations:
                return lease_id

    def _allocate(self, size: int, evicted: list[tuple[ChunkKey, bytes]]) -> int | None:
        self._expire_leases()
        offset = self._free.allocate(size)
        while offset is None:
            victim = next((k for k, s in self._index.items() if s.leases == 0), None)
            if victim is None:
                return None
            slot = self._index.pop(victim)
            data = bytes(self._view[slot.offset : slot.offset + slot.length])
            evicted.append((victim, data))
            if self.on_evict is not None:
                self._evicting[victim] = data
            self.evictions += 1
            self._release_slot(slot)
            offset = self._free.allocate(size)
        return offset

    def _release_slot(self, slot: _Slot) -> None:
        slot.deleted = True
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
        for reservation_id in [i for i, r in self._reservations.items()
                               if r.expires_at <= now and not r.is_committing]:
            log.info("arena reservation %d expired uncommitted; its space is freed",
                     reservation_id)
            self._drop_reservation(reservation_id)

    def _drop_reservation(self, reservation_id: LeaseId) -> None:
        reservation = self._reservations.pop(reservation_id)
        for index, extent in enumerate(reservation.extents):
            slot = reservation.adopted.get(index)
            if slot is not None:
                self._unpin(slot)
            else:
                self._free.free(extent.offset, _aligned(extent.length))

    def _check_open(self) -> None:
        if self._closed:
            raise NotFound(f"arena {self.path} is closed")

    def _notify(self, evicted: list[tuple[ChunkKey, bytes]]) -> None:
        """Run on_evict (outside the lock); the object stays readable until it returns."""
        callback = self.on_evict
        for key, data in evicted:
            try:
                if callback is not None:
                    callback(key, data)
            except Exception:
                # The put that evicted succeeded; a failing demotion only loses a
                # cached copy, so it must not fail the caller.
                log.exception("arena on_evict callback failed for chunk %s", key.hex())
            finally:
                with self._lock:
                    if self._evicting.get(key) is data:
                        del self._evicting[key]

    def close(self) -> None:
        """Unmap and unlink the file. Idempotent; clients' mappings stay valid."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index.clear()
            self._evicting.clear()
            self._leases.clear()
            self._reservations.clear()
            self.used_bytes = 0
            self._view.release()
            try:
                self._map.close()
            except BufferError:  # a reader thread still holds a view; the GC unmaps it
                log.warning("arena %s closed while a copy was in flight", self.path)
            self._unlink()


