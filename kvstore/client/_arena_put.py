"""The client's same-host put: reserve arena space, write each object into it, commit.

Bytes cross no socket and are copied once: a raw chunk's KVC1 object is built
where it will be stored (header, section table, then each (layer, K|V) section
copied from the caller's tensor and hashed right after its copy, while in
cache), so the daemon indexes the very bytes the client wrote after verifying
them. A kvq object is encoded first (its size must be known to reserve) and
copied in whole.

The exchange is a plan (``kvstore.client._plan``) that ``ClientCore.put`` runs,
so ``Client`` and ``AsyncClient`` share every line of it.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.client import _local as local
from kvstore.client._codec import encode_chunk
from kvstore.client._plan import Offload, Plan, Unary
from kvstore.client._protocol import PutPlan
from kvstore.client._status import error_from_rpc
from kvstore.codec.format import (
    FLAG_POSITION_FREE,
    HEADER_BYTES,
    CodecId,
    new_object_hasher,
    pack_header_prefix,
)
from kvstore.copy_threads import CopyThreads
from kvstore.errors import CapacityExhausted, InvalidArgument, KVStoreError, PermissionDenied
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

# Write no chunk once less than this share of the reservation's TTL is left: the
# daemon frees an expired reservation, and its space may then hold another object.
_MIN_TTL_LEFT = 0.5


@dataclass(frozen=True, slots=True)
class PutResult:
    num_chunks_stored: int  # newly stored by this put
    num_chunks_present: int  # already stored, not written




def raw_object_bytes(layout: KVLayout, num_tokens: int) -> int:
    """Size of the raw KVC1 object of a ``num_tokens``-token chunk."""
    elements = layout.num_layers * 2 * layout.num_kv_heads * num_tokens * layout.head_dim
    return HEADER_BYTES + 8 * layout.num_layers + elements * layout.itemsize


def write_raw_object(dst: memoryview, piece: np.ndarray, layout: KVLayout, flags: int) -> None:
    """Build the raw object of ``piece`` ([layers, 2, heads, T, dim], storage dtype) in ``dst``.

    ``dst`` is exactly the object's size. Each (layer, K|V) section is hashed right
    after it is copied (while in cache); the checksum is written last.
    """
    num_layers, _, heads, num_tokens, dim = piece.shape
    section = heads * num_tokens * dim * piece.itemsize
    table = np.full(2 * num_layers, section, dtype="<u4").tobytes()
    prefix = pack_header_prefix(
        codec_id=CodecId.RAW, codec_level=0, dtype=layout.dtype, flags=flags,
        num_layers=num_layers, num_kv_heads=heads, head_dim=dim, num_tokens=num_tokens,
        num_sections=2 * num_layers, meta_bytes=0, payload_bytes=len(table) + 2 * num_layers
        * section)
    table_end = HEADER_BYTES + len(table)
    assert dst.nbytes == table_end + 2 * num_layers * section
    dst[: len(prefix)] = prefix
    dst[HEADER_BYTES:table_end] = table
    digest = new_object_hasher(prefix)
    digest.update(table)
    body = np.frombuffer(dst, dtype=piece.dtype, offset=table_end).reshape(piece.shape)
    for layer in range(num_layers):
        for kv in range(2):
            np.copyto(body[layer, kv], piece[layer, kv])
            digest.update(body[layer, kv])  # contiguous [heads, T, dim]
    dst[len(prefix) : HEADER_BYTES] = struct.pack("<Q", digest.intdigest())


@dataclass(slots=True)
class _Objects:
    """What the put writes: chunks ``first..`` as raw pieces, or encoded (kvq) objects."""

    first: int
    sizes: list[int]
    encoded: list[bytes] | None  # None: raw, built in place from the plan's tensor


def _plan_objects(layout: KVLayout, plan: PutPlan, codec: str, first: int,
                  model: str) -> _Objects:
    count = plan.num_chunks - first
    if codec == "raw":
        return _Objects(first, [raw_object_bytes(layout, plan.tokens_per_chunk)] * count, None)
    flags = FLAG_POSITION_FREE if plan.position_free else 0
    encoded = [encode_chunk(_piece(plan, i), layout, codec, flags, model)
               for i in range(first, plan.num_chunks)]
    return _Objects(first, [len(obj) for obj in encoded], encoded)


def _piece(plan: PutPlan, index: int) -> np.ndarray:
    step = plan.tokens_per_chunk
    return plan.kv[:, :, :, index * step : (index + 1) * step, :]


def _write_objects(writer: local.ArenaReader, extents: Sequence[pb.ChunkExtent],
                   objects: _Objects, plan: PutPlan, layout: KVLayout,
                   deadline: float, threads: CopyThreads) -> None:
    """Write every reserved object, split across ``threads`` (each object whole on one)."""
    flags = FLAG_POSITION_FREE if plan.position_free else 0

    def job(i: int, extent: pb.ChunkExtent) -> Callable[[], None]:
        def write() -> None:
            if time.monotonic() > deadline:
                raise CapacityExhausted("the arena reservation is close to its TTL; streaming")
            dst = writer.view(local.Extent(extent.offset_bytes, extent.length_bytes))
            if dst.nbytes != objects.sizes[i]:
                raise InvalidArgument(f"daemon reserved {dst.nbytes} bytes for chunk "
                                      f"{objects.first + i}, its object is {objects.sizes[i]}")
            if objects.encoded is None:
                write_raw_object(dst, _piece(plan, objects.first + i), layout, flags)
            else:
                dst[:] = objects.encoded[i]
        return write

    jobs = [job(i, extent) for i, extent in enumerate(extents)
            if extent.length_bytes != 0]  # a length of 0: already stored
    threads.run(jobs, sum(extent.length_bytes for extent in extents))


def put_steps(paths: local.LocalPath, index: int, namespace: pb.Namespace, layout: KVLayout,
              plan: PutPlan, codec: str, timeout_s: float) -> Plan[PutResult]:
    """The same-host put of ``plan``'s chunks to address ``index``, as a plan."""
    arena = paths.mapped(index)
    if arena is None:
        arena = local.attach((yield Unary(index, "AttachArena", pb.AttachArenaRequest(),
                                          timeout_s)))
        paths.remember(index, arena)
    tokens = plan.tokens[: plan.num_chunks * plan.tokens_per_chunk].tobytes()
    first = 0
    if codec != "raw" and not plan.position_free:  # encode only what is missing
        found = yield Unary(index, "Lookup", pb.LookupRequest(
            namespace=namespace, tokens_le_i32=tokens), timeout_s)
        first = found.num_tokens // plan.tokens_per_chunk
        if first >= plan.num_chunks:
            return PutResult(0, plan.num_chunks)
    objects = yield Offload(_plan_objects, (layout, plan, codec, first, namespace.name))
    reserved = yield Unary(index, "ReserveExtents", pb.ReserveExtentsRequest(
        namespace=namespace, tokens_le_i32=tokens, position_free=plan.position_free,
        first_chunk=first, object_bytes=objects.sizes, arena_nonce=arena.nonce), timeout_s)
    if reserved.reservation_id == 0:
        return PutResult(0, plan.num_chunks)
    deadline = time.monotonic() + reserved.ttl_ms / 1000 * _MIN_TTL_LEFT
    try:
        yield Offload(_write_objects, (arena.writable(), reserved.extents, objects, plan,
                                       layout, deadline, paths.threads))
    except BaseException:
        yield Unary(index, "ReleaseLease",
                    pb.ReleaseLeaseRequest(lease_id=reserved.reservation_id), timeout_s)
        raise
    done = yield Unary(index, "CommitExtents", pb.CommitExtentsRequest(
        reservation_id=reserved.reservation_id), timeout_s)
    return PutResult(done.num_chunks_stored, first + done.num_chunks_present)


def after_failure(paths: local.LocalPath, index: int, address: str, exc: Exception) -> object:
    """Decide what a failed same-host put means: raise, or ``local.STREAM`` (use Put).

    A refused arena (PermissionDenied) is not tried again on this address; a
    caller's mistake (InvalidArgument) is raised, as Put would raise it too.
    """
    error = error_from_rpc(exc, address) if isinstance(exc, grpc.RpcError) else exc
    if isinstance(error, PermissionDenied):
        return paths.fallback(index, address, error, refused=True)
    if isinstance(error, InvalidArgument) or paths.transport == "arena" or \
            not isinstance(error, KVStoreError):
        raise error from None
    log.info("same-host put to %s not possible now (%s); streaming it", address, error)
    if not isinstance(error, CapacityExhausted):  # e.g. the daemon's arena changed
        paths.forget(index)
    return local.STREAM
