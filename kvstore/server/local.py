"""The same-host path on the daemon side: who may map the arena, leases and reservations.

A same-host client maps the DRAM arena (AttachArena), asks for the extents of the
chunks it wants under a lease (LeaseChunks), copies them out and releases the
lease (ReleaseLease). To put, it reserves space (ReserveExtents), writes each
chunk's object into it and commits (CommitExtents): the daemon verifies the
objects where they lie and indexes them without a copy. Bytes never cross the socket.

Who may use it: only callers connecting from a loopback address (a remote peer
could not map the file anyway, and must not be able to pin DRAM with leases), and,
when bearer tokens are configured, only if ``server.arena_for_tenants`` allows it:
the arena holds every tenant's chunks, so a tenant that maps it could read them all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.arena_file import Placement, host_boot_id
from kvstore.codec.format import HEADER_BYTES
from kvstore.copy_threads import CopyThreads
from kvstore.errors import CapacityExhausted, InvalidArgument, NotFound, PermissionDenied
from kvstore.keys import ChunkKey, Namespace
from kvstore.server.objects import check_put_object, max_object_bytes

# Commits verify each object a client wrote (an XXH3 pass over it, from RAM) on two
# threads where the daemon may use two cores: half a 128 MiB put's commit time.
_VERIFY_THREADS = CopyThreads()

log = logging.getLogger(__name__)

MAX_LEASE_TTL_MS = 600_000  # a lease asks for at most 10 minutes (the proto says so)


@dataclass(frozen=True, slots=True)
class LeasedRun:
    """The leading chunks of a request pinned in the arena."""

    lease_id: int  # 0 when nothing was pinned (no lease is held then)
    ttl_s: float  # the lease's lifetime
    extents: list[tuple[int, int]]  # (offset, length) per leading chunk, in order
    num_stored: int  # leading chunks stored in any tier (>= len(extents))


def is_loopback_peer(peer: str) -> bool:
    """True for a gRPC peer string of a loopback TCP address or a unix socket."""
    if peer.startswith("unix:"):
        return True
    if peer.startswith("ipv4:"):
        return peer[5:].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[5:].rsplit(":", 1)[0]
        return host in ("[::1]", "[::ffff:127.0.0.1]") or host.startswith("[::ffff:127.")
    return False


@dataclass(frozen=True, slots=True)
class SameHostPolicy:
    """Whether a caller may receive arena references."""

    enabled: bool  # server.same_host
    arena_for_tenants: bool  # server.arena_for_tenants

    def check(self, peer: str, tenant: str | None) -> None:
        """Raises PermissionDenied, naming why, if the caller must use Get instead."""
        if not self.enabled:
            raise PermissionDenied("this daemon serves no arena references "
                                   "(server.same_host = false); use Get")
        if not is_loopback_peer(peer):
            raise PermissionDenied(f"arena references are for same-host callers; {peer} is not "
                                   "a loopback peer, use Get")
        if tenant is not None and not self.arena_for_tenants:
            raise PermissionDenied(
                "the arena is shared by all tenants, so tenants get the streamed path "
                "(server.arena_for_tenants = false); use Get")


def attach_info(dram: Any) -> dict[str, Any]:
    """Fields of AttachArenaResponse for a CpuTier."""
    identity = dram.identity()
    return {"path": identity.path, "file_bytes": identity.file_bytes, "nonce": identity.nonce,
            "boot_id": host_boot_id(), "lease_ttl_ms": int(dram.lease_ttl_s * 1000),
            "hugepages": identity.hugepages}


def lease_ttl_s(dram: Any, ttl_ms: int) -> float:
    """The TTL of a requested lease: the default when unset, capped at the maximum."""
    if ttl_ms == 0:
        return float(dram.lease_ttl_s)
    return min(ttl_ms, MAX_LEASE_TTL_MS) / 1000


def check_nonce(dram: Any, nonce: bytes) -> None:
    if nonce and nonce != dram.identity().nonce:
        raise NotFound("the arena this client mapped is not the daemon's current arena "
                       "(the daemon restarted); call AttachArena again")


def lease_run(engine: Any, keys: Sequence[ChunkKey], ttl_s: float) -> LeasedRun:
    """Pin the leading stored ``keys`` in DRAM, promoting those found in slower tiers.

    Runs on the I/O pool (it may read the disk). Chunks are pinned one by one as
    they are promoted, so a promotion can never evict a chunk leased earlier in the
    same run; the run stops at the first chunk that cannot be pinned.
    """
    dram = engine.dram
    num_stored = engine.lookup(keys)[0] if keys else 0
    lease_id, extents = dram.lease(keys[:num_stored], ttl_s)
    # DRAM hits; a promoted chunk is counted where engine.get found it.
    num_resident, resident_bytes = len(extents), sum(e.length for e in extents)
    for key in keys[len(extents):num_stored]:
        extent = dram.extend_lease(lease_id, key)
        if extent is not None:
            num_resident, resident_bytes = num_resident + 1, resident_bytes + extent.length
        # Not in DRAM: engine.get promotes it (None = deleted or corrupt meanwhile).
        elif engine.get(key) is not None:
            extent = dram.extend_lease(lease_id, key)
        if extent is None:  # DRAM could not take it (full of leased bytes, too big)
            break
        extents.append(extent)
    # The client copies these out of the arena: count them as the reads they are.
    dram.count_leased_reads(num_resident, resident_bytes)
    if not extents:
        dram.release_lease(lease_id)
        lease_id = 0
    return LeasedRun(lease_id, ttl_s, [(e.offset, e.length) for e in extents], num_stored)


@dataclass(frozen=True, slots=True)
class PutReservation:
    """What the daemon remembers of a same-host put between reserve and commit."""

    namespace: Namespace  # the caller's, tenant included
    keys: list[ChunkKey | None]  # per reserved extent; None = already stored, not reserved
    first_chunk: int  # chunk index of keys[0]
    num_tokens: int  # tokens per chunk object
    position_free: bool


def check_object_sizes(namespace: Namespace, num_chunks: int, first_chunk: int,
                       sizes: Sequence[int], per_chunk: int) -> None:
    """The object sizes of a ReserveExtents request, checked before anything is evicted."""
    if first_chunk + len(sizes) > num_chunks or not sizes:
        raise InvalidArgument(f"object_bytes has {len(sizes)} entries from first_chunk "
                              f"{first_chunk}; the tokens hold {num_chunks} full chunks, and "
                              "at least one object must be reserved")
    largest = max_object_bytes(namespace, per_chunk)
    for i, size in enumerate(sizes):
        if not HEADER_BYTES <= size <= largest:
            raise InvalidArgument(f"chunk {first_chunk + i}: object_bytes is {size}, expected "
                                  f"{HEADER_BYTES} to {largest} (the raw object's size)")


def reserve_run(engine: Any, plan: PutReservation, sizes: Sequence[int], ttl_s: float
                ) -> tuple[int, list[tuple[int, int]]]:
    """Reserve DRAM for the chunks of ``plan`` no tier holds yet (runs on the I/O pool).

    Returns:
        (reservation id or 0, one ``(offset, length)`` per size; ``(0, 0)`` = stored).

    Raises:
        CapacityExhausted: DRAM cannot hold them (full of leased bytes, or too small).
    """
    present = [key is None or engine.contains(key) for key in plan.keys]
    wanted = [size for size, is_present in zip(sizes, present, strict=True) if not is_present]
    if not wanted:
        return 0, [(0, 0)] * len(sizes)
    tag = dataclasses.replace(plan, keys=[None if p else k
                                          for k, p in zip(plan.keys, present, strict=True)])
    got = engine.dram.reserve(wanted, ttl_s, tag)
    if got is None:
        raise CapacityExhausted(f"DRAM cannot reserve {sum(wanted)} bytes for {len(wanted)} "
                                "objects now (its room is leased, or it is too small); use Put")
    reservation_id, extents = got
    found = iter(extents)
    placed = []
    for is_present in present:
        extent = None if is_present else next(found)
        placed.append((0, 0) if extent is None else (extent.offset, extent.length))
    return reservation_id, placed


def commit_run(engine: Any, registry: Any, reservation_id: int) -> tuple[int, int]:
    """Verify a reservation's objects in place and store them (runs on the I/O pool).

    Every object is checked before any is indexed, so a bad one stores nothing.

    Returns:
        (chunks newly stored, chunks already present).

    Raises:
        NotFound: the reservation expired or is unknown.
        InvalidArgument: an object fails verification (the reservation is dropped).
    """
    dram = engine.dram
    extents, plan = dram.claim_reservation(reservation_id)
    try:
        chunks = [(i, key) for i, key in enumerate(plan.keys) if key is not None]
        views = [dram.reserved_view(extent) for extent in extents]

        def check(view: Any, i: int) -> Any:
            return lambda: check_put_object(view, plan.namespace, plan.num_tokens,
                                            position_free=plan.position_free,
                                            chunk_index=plan.first_chunk + i)

        # every object is checked, on both threads, before any is indexed
        _VERIFY_THREADS.run([check(view, i) for view, (i, _) in zip(views, chunks, strict=True)],
                            sum(view.nbytes for view in views))
        registry.register(plan.namespace)
        stored = 0
        for index, (view, (_, key)) in enumerate(zip(views, chunks, strict=True)):
            stored += bool(engine.put(key, view, plan.namespace.tenant,
                                      placed=Placement(reservation_id, index)))
        return stored, len(plan.keys) - stored
    finally:
        dram.finish_reservation(reservation_id)
