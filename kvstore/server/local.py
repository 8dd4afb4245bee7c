"""The same-host path on the daemon side: who may map the arena, and leasing a chunk run.

A same-host client maps the DRAM arena read-only (AttachArena), asks for the
extents of the chunks it wants under a lease (LeaseChunks), copies them out and
releases the lease (ReleaseLease). Bytes never cross the socket.

Who may use it: only callers connecting from a loopback address (a remote peer
could not map the file anyway, and must not be able to pin DRAM with leases), and,
when bearer tokens are configured, only if ``server.arena_for_tenants`` allows it:
the arena holds every tenant's chunks, so a tenant that maps it could read them all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.arena_file import host_boot_id
from kvstore.errors import NotFound, PermissionDenied
from kvstore.keys import ChunkKey

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
