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
    Placement,
    create_file,
    prefault,
    remove_stale_files,
    round_up,
)
from kvstore.arena_slots import LeaseId, Slot, SlotTable, aligned
from kvstore.errors import InvalidArgument, NotFound
from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)

__all__ = ["ALIGN", "Arena", "ArenaIdentity", "ArenaReader", "Extent", "LeaseId", "Placement"]

EvictCallback = Callable[[ChunkKey, bytes], None]


@dataclass(slots=True)
class _Reservation:
    """Space handed to a same-host writer, not yet holding any indexed object."""

    extents: list[Extent]  # one per object to write, ``length`` = its exact size
    expires_at: float  # time.monotonic() deadline; ignored once committing
    tag: Any  # the reserver's record (the daemon keeps the chunk keys there)
    is_committing: bool = False  # claimed by a commit: no longer expires
    adopted: dict[int, Slot] = field(default_factory=dict)  # extent index -> indexed slot


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        self._stop_prefault = threading.Event()  # set by close, before unmapping
        self._prefaulter = threading.Thread(target=self._prefault, name="kvstore-arena-prefault",
                                            daemon=True)
        self._prefaulter.start()
        # The LRU index, free list and leases; bytes live in the file (self._view).
        self._slots = SlotTable(self.capacity_bytes, HEADER_BYTES, self._copy_out,
                                log=log, name="arena", lease_noun="lease")
        self._reservations: dict[LeaseId, _Reservation] = {}  # same id space as leases
        self._lock = threading.Lock()
        self._closed = False

    @property
    def used_bytes(self) -> int:
        """Bytes of live objects (unaligned)."""
        return self._slots.used_bytes

    @property
    def evictions(self) -> int:
        return self._slots.evictions

    def _copy_out(self, slot: Slot) -> bytes:
        return bytes(self._view[slot.offset : slot.offset + slot.length])

    def _prefault(self) -> None:
        try:
            prefault(self._map, stop=self._stop_prefault)
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
            if self._slots.touch(key):
                return True
            if aligned(size) > self.capacity_bytes:
                return False
            offset = self._allocate(aligned(size), evicted)
        try:
            if offset is not None:
                self._view[offset : offset + size] = data
                self._insert(key, offset, size)
        finally:
            self._notify(evicted)
        return offset is not None

    def _insert(self, key: ChunkKey, offset: int, size: int) -> None:
        with self._lock:
            self._slots.insert(key, Slot(offset, size))

    def get(self, key: ChunkKey) -> bytes | None:
        """A private copy of the object (now most recently used), or None."""
        return self._read(key, touch=True)

    def peek(self, key: ChunkKey) -> bytes | None:
        """Like ``get`` without touching the LRU order."""
        return self._read(key, touch=False)

    def _read(self, key: ChunkKey, *, touch: bool) -> bytes | None:
        with self._lock:
            slot = self._slots.pin(key, touch=touch)  # pinned while copied outside the lock
            if slot is None:
                return self._slots.evicting.get(key)
        try:
            return self._copy_out(slot)
        finally:
            with self._lock:
                self._slots.unpin(slot)

    @contextmanager
    def pinned(self, key: ChunkKey) -> Iterator[bytes | memoryview | None]:
        """The object as a view of the arena, pinned for the ``with`` block (no copy)."""
        with self._lock:
            slot = self._slots.pin(key, touch=False)
            if slot is None:
                evicting = self._slots.evicting.get(key)
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
                self._slots.unpin(slot)

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._slots.contains(key)

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

    def __len__(self) -> int:
        return len(self._slots.index)

    # -- leases --------------------------------------------------------------------
    def lease(self, keys: Sequence[ChunkKey], ttl_s: float | None = None
              ) -> tuple[LeaseId, list[Extent]]:
        """Pin the leading present ``keys``; returns the lease and their extents (maybe [])."""
        with self._lock:
            self._check_open()
            self._expire_leases()
            ttl = self.lease_ttl_s if ttl_s is None else ttl_s
            lease_id, slots = self._slots.lease(keys, ttl, self._reservations)
            return lease_id, [Extent(s.offset, s.length) for s in slots]

    def extend(self, lease_id: LeaseId, key: ChunkKey) -> Extent | None:
        """Add ``key`` to a held lease; its extent, or None if the arena lacks it."""
        with self._lock:
            slot = self._slots.extend(lease_id, key)
            return None if slot is None else Extent(slot.offset, slot.length)

    def release(self, lease_id: LeaseId) -> None:
        """End a lease, or drop a reservation that no commit has claimed."""
        with self._lock:
            if lease_id in self._reservations and not self._reservations[lease_id].is_committing:
                self._drop_reservation(lease_id)
                return
            self._slots.release(lease_id)

    def num_leases(self) -> int:
        with self._lock:
            self._expire_leases()
            return len(self._slots.leases)

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
                offset = None if aligned(size) > self.capacity_bytes else \
                    self._allocate(aligned(size), evicted)
                if offset is None:
                    for done, done_size in zip(offsets, sizes, strict=False):
                        self._slots.free_space(done, done_size)
                    offsets = []
                    break
                offsets.append(offset)
            result = None
            if offsets or not sizes:
                reservation_id = self._slots.new_lease_id(self._reservations)
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
            if self._slots.touch(key):  # content-addressed: the object is already held
                return True
            extent = reservation.extents[placement.index]
            slot = Slot(extent.offset, extent.length, leases=1)
            self._slots.add(key, slot)
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
    def _allocate(self, size: int, evicted: list[tuple[ChunkKey, bytes]]) -> int | None:
        self._expire_leases()
        return self._slots.allocate(size, evicted, keep_evicting=self.on_evict is not None)

    def _expire_leases(self) -> None:
        self._slots.expire_leases()
        now = time.monotonic()
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
                self._slots.unpin(slot)
            else:
                self._slots.free_space(extent.offset, extent.length)

    def _check_open(self) -> None:
        if self._closed:
            raise NotFound(f"arena {self.path} is closed")

    def _notify(self, evicted: list[tuple[ChunkKey, bytes]]) -> None:
        """Run on_evict (outside the lock); the object stays readable until it returns."""
        self._slots.finish_evictions(evicted, self.on_evict, self._lock)

    def close(self) -> None:
        """Unmap and unlink the file. Idempotent; clients' mappings stay valid."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_prefault.set()
            self._prefaulter.join()  # at most one prefault slice (a few ms) away
            self._slots.clear()
            self._reservations.clear()
            self._view.release()
            try:
                self._map.close()
            except BufferError:  # a reader thread still holds a view; the GC unmaps it
                log.warning("arena %s closed while a copy was in flight", self.path)
            self._unlink()


