"""The same-host GPU path on the daemon side: leasing chunks in the GPU tier's slab.

LeaseGpuChunks is LeaseChunks moved to HBM: the leading stored chunks of a request
are placed in the GPU tier (promoted from DRAM, or read from the disk straight into
the slab's pinned staging buffer), pinned one by one under one lease, and returned
as extents of the slab with its CUDA IPC handle. Who may call it is the arena's
policy (``kvstore.server.local.SameHostPolicy``). A daemon without a GPU tier
answers FAILED_PRECONDITION, and the client reads through the arena or Get.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.arena_file import host_boot_id
from kvstore.errors import FailedPrecondition, NotFound
from kvstore.keys import ChunkKey
from kvstore.server.local import MAX_LEASE_TTL_MS
from kvstore.tiers.gpu import GpuExtent, GpuTier

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuLeasedRun:
    """The leading chunks of a request pinned in the GPU tier's slab."""

    lease_id: int  # 0 when nothing was pinned (no lease is held then)
    ttl_s: float  # the lease's lifetime
    extents: list[GpuExtent]  # one per leading chunk placed in HBM, in order
    num_stored: int  # leading chunks stored in any tier (>= len(extents))


def gpu_tier_of(engine: Any) -> GpuTier:
    """The engine's GPU tier.

    Raises:
        FailedPrecondition: the daemon runs without one (no CUDA, or capacity 0).
    """
    gpu = engine.gpu
    if gpu is None:
        raise FailedPrecondition(
            "this daemon has no GPU tier (tiers.gpu.capacity_bytes = 0, or no CUDA device, "
            "torch or cupy where it runs); read through the arena or Get")
    return gpu


def lease_ttl_s(gpu: GpuTier, ttl_ms: int) -> float:
    """The TTL of a requested lease: the tier's default when unset, capped at the maximum."""
    if ttl_ms == 0:
        return float(gpu.lease_ttl_s)
    return min(ttl_ms, MAX_LEASE_TTL_MS) / 1000


def gpu_lease_run(engine: Any, keys: Sequence[ChunkKey], ttl_s: float) -> GpuLeasedRun:
    """Place the leading stored ``keys`` in HBM and pin them (runs on the I/O pool).

    Each chunk is pinned right after it is placed, so placing a later chunk can
    never evict one leased earlier in the same run; the run stops at the first chunk
    that cannot be placed (not raw, or the slab is full of leased bytes).
    """
    gpu = gpu_tier_of(engine)
    num_stored = engine.lookup(keys)[0] if keys else 0
    lease_id, extents = gpu.lease(keys[:num_stored], ttl_s)
    for key in keys[len(extents):num_stored]:
        try:
            extent = gpu.extend_lease(lease_id, key)
            if extent is None and engine.promote_to_gpu(key):
                extent = gpu.extend_lease(lease_id, key)
        except NotFound:  # the lease expired while a slow disk read ran: stop here
            log.info("GPU lease %d expired while it was being filled", lease_id)
            return GpuLeasedRun(0, ttl_s, [], num_stored)
        if extent is None:
            break
        extents.append(extent)
    if not extents:
        gpu.release_lease(lease_id)
        lease_id = 0
    return GpuLeasedRun(lease_id, ttl_s, extents, num_stored)


def slab_info(gpu: GpuTier) -> dict[str, Any]:
    """The slab fields of LeaseGpuChunksResponse."""
    return {"ipc_handle": gpu.ipc_handle(), "pci_bus_id": gpu.pci_bus_id,
            "slab_bytes": gpu.slab_bytes, "slab_nonce": gpu.nonce, "boot_id": host_boot_id()}


def release_any_lease(engine: Any, lease_id: int) -> None:
    """ReleaseLease: end a DRAM lease, else a GPU lease with that id.

    Raises:
        NotFound: neither tier holds it (released or expired).
    """
    try:
        engine.dram.release_lease(lease_id)
        return
    except NotFound:
        if engine.gpu is None:
            raise
    engine.gpu.release_lease(lease_id)
