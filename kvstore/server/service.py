"""The grpc.aio servicer of kvstore.v1.KVStore: validates requests, calls the engine.

Engine calls block (disk, Redis), and so does hashing a request's tokens into
chunk keys, so both run on a thread pool; the event loop only parses, validates
and streams. A request is bounded (``server.max_request_tokens`` / ``_chunks``)
before anything is hashed. Every handler is wrapped by ``_rpc`` /
``_rpc_stream``, which authenticate the caller, count the request, and turn any
exception into a status code through ``kvstore.server.status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import numpy as np

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore._version import __version__
from kvstore.errors import (
    CapacityExhausted,
    Corrupt,
    InvalidArgument,
    Unauthenticated,
)
from kvstore.keys import ChunkKey, Namespace
from kvstore.server import blobs, gpu, local, objects
from kvstore.server.auth import Authenticator, LeaseOwners
from kvstore.server.blocks import batch_from_proto, fetch_blocks
from kvstore.server.get import ENVELOPE_BYTES, ChunkStreamer
from kvstore.server.metrics import ServiceCounters
from kvstore.server.namespaces import NamespaceRegistry
from kvstore.server.put import ChunkObject, PutAssembler
from kvstore.server.status import RefusalLog, abort_unauthenticated, abort_with, status_for
from kvstore.server.wire import (
    RequestLimits,
    check_parsed,
    chunk_keys,
    layers_from_proto,
    namespace_from_proto,
    order_from_proto,
    tokens_from_bytes,
    tokens_per_chunk,
)

if TYPE_CHECKING:
    from kvstore.engine import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
# Tier facts a tenant may see in Stats: configuration, not anyone's traffic.
_TENANT_VISIBLE_INFO = frozenset({"io", "fsync", "hugepages", "mode", "state"})


@contextlib.asynccontextmanager
async def _accounted(servicer: KVStoreServicer, method: str,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[str | None]:
    """Authenticate one call (yields its tenant), time it and turn any failure inside it
    into its status code."""
    started = time.perf_counter()
    tenant = await servicer._begin(method, context)
    try:
        yield tenant
    except grpc.aio.AbortError:
        raise  # already counted where the abort was decided
    except asyncio.CancelledError:  # the caller went away or its deadline passed
        servicer._counters.count_failure(method, "CANCELLED")
        raise
    except Exception as exc:  # every failure becomes a status code
        await servicer._fail(method, context, exc)
    finally:
        servicer._counters.observe_latency(method, time.perf_counter() - started)


def _rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary-response handler: auth, counting, error -> status mapping."""
    method = fn.__name__

    @functools.wraps(fn)
    async def handler(self: KVStoreServicer, request: Any, context: grpc.aio.ServicerContext):
        async with _accounted(self, method, context) as tenant:
            return await fn(self, _checked(request), context, tenant)

    return handler


def _rpc_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    """Wrap a server-streaming handler like ``_rpc``."""
    method = fn.__name__

    @functools.wraps(fn)
    async def handler(self: KVStoreServicer, request: Any, context: grpc.aio.ServicerContext):
        async with _accounted(self, method, context) as tenant:
            async for message in fn(self, _checked(request), context, tenant):
                yield message

    return handler


def _checked(request: Any) -> Any:
    """The request, refused (InvalidArgument) if its bytes did not parse; a client
    stream (Put) is checked message by message as it is read."""
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return check_parsed(request)


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield check_parsed(request)


class KVStoreServicer(pb_grpc.KVStoreServicer):
    """Serves every RPC of kvstore.v1.KVStore over one engine."""

    def __init__(self, engine: Engine, registry: NamespaceRegistry, authenticator: Authenticator,
                 executor: Executor, counters: ServiceCounters, *,
                 max_message_bytes: int, limits: RequestLimits | None = None,
                 same_host: local.SameHostPolicy | None = None) -> None:
        self._engine = engine  # blocking, thread-safe
        self._registry = registry
        self._auth = authenticator
        self._executor = executor
        self._counters = counters
        self._max_message_bytes = max_message_bytes
        self._limits = limits or RequestLimits(max_tokens=1 << 22, max_chunks=1 << 16)
        self._refusals = RefusalLog()
        self._same_host = same_host or local.SameHostPolicy(enabled=True,
                                                            arena_for_tenants=False)
        self._chunks = ChunkStreamer(engine, executor, counters, max_message_bytes)
        self._lease_owners = LeaseOwners()

    # ------------------------------------------------------------ helpers

    async def _begin(self, method: str, context: grpc.aio.ServicerContext) -> str | None:
        """Count the request and authenticate it; returns the caller's tenant."""
        self._counters.count_request(method)
        try:
            return self._auth.tenant_for(context.invocation_metadata())
        except Unauthenticated as exc:
            self._counters.count_failure(method, "UNAUTHENTICATED")
            await abort_unauthenticated(context, str(exc))

    async def _fail(self, method: str, context: grpc.aio.ServicerContext,
                    exc: Exception) -> NoReturn:
        code = status_for(exc)
        self._counters.count_failure(method, code.name)
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            self._refusals.refused(method, context.peer(), code, str(exc))
        await abort_with(context, exc)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _keys(self, namespace: Namespace, data: bytes, *, position_free: bool = False
                    ) -> tuple[np.ndarray, list[ChunkKey]]:
        """The tokens of a request and the keys of their chunks, within the request limits.

        Hashing runs on the pool: a long token list must not hold the event loop.
        """
        self._limits.check(namespace, len(data) // 4, position_free=position_free)
        tokens = tokens_from_bytes(data, position_free=position_free)
        keys = await self._run(functools.partial(chunk_keys, namespace, tokens,
                                                 position_free=position_free))
        return tokens, keys

    def _lookup_tokens(self, namespace: Namespace, tokens: np.ndarray, position_free: bool
                       ) -> tuple[list[ChunkKey], tuple[int, dict[str, int]]]:
        keys = chunk_keys(namespace, tokens, position_free=position_free)
        return keys, (self._engine.lookup(keys) if keys else (0, {}))

    def _namespace(self, request: Any, tenant: str | None) -> Namespace:
        """The request's namespace; a layout clash with the registered one is refused."""
        namespace = namespace_from_proto(request, tenant)
        self._registry.check(namespace)
        return namespace

    # ------------------------------------------------------------ unary RPCs

    @_rpc
    async def Lookup(self, request: pb.LookupRequest, context: Any, tenant: str | None):
        namespace = self._namespace(request, tenant)
        position_free = request.position_free
        self._limits.check(namespace, len(request.tokens_le_i32) // 4,
                           position_free=position_free)
        tokens = tokens_from_bytes(request.tokens_le_i32, position_free=position_free)
        per_chunk = tokens_per_chunk(namespace, tokens, position_free=position_free)
        # One pool task hashes and looks up: a Lookup pays one thread hop, not two (the
        # connectors' schedulers wait on it).
        keys, (num, per_tier) = await self._run(self._lookup_tokens, namespace, tokens,
                                                position_free)
        if not keys:
            return pb.LookupResponse(num_tokens=0)
        self._counters.count_lookup(tenant, namespace.name, len(keys), num, per_tier)
        return pb.LookupResponse(
            num_tokens=num * per_chunk,
            tiers=[pb.TierHits(tier=name, num_tokens=n * per_chunk)
                   for name, n in per_tier.items()],
        )

    @_rpc
    async def Put(self, request_iterator: Any, context: Any, tenant: str | None):
        assembler: PutAssembler | None = None
        stored = present = 0
        # One chunk is verified and stored on the pool while the next one arrives.
        pending: asyncio.Future[bool] | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("msg")
            if assembler is None:
                if kind != "header":
                    raise InvalidArgument(f"a Put stream starts with a header, got {kind}")
                header = request.header
                namespace = self._namespace(header, tenant)
                tokens, keys = await self._keys(namespace, header.tokens_le_i32,
                                                position_free=header.position_free)
                assembler = PutAssembler.from_header(
                    header, namespace, keys,
                    tokens_per_chunk(namespace, tokens, position_free=header.position_free))
                continue
            if kind != "chunk":
                raise InvalidArgument(f"a Put stream has one header, then chunks; got {kind}")
            chunk = assembler.add(request.chunk)
            if chunk is not None:
                if pending is not None:
                    is_new = await pending
                    stored, present = stored + is_new, present + (not is_new)
                pending = asyncio.get_running_loop().run_in_executor(
                    self._executor, self._store, assembler, chunk)
        if pending is not None:
            is_new = await pending
            stored, present = stored + is_new, present + (not is_new)
        if assembler is None:
            raise InvalidArgument("empty Put stream: expected a header, then chunks")
        assembler.finish()
        return pb.PutResponse(num_chunks_stored=stored, num_chunks_present=present)

    def _store(self, assembler: PutAssembler, chunk: ChunkObject) -> bool:
        """Verify one object against the namespace and store it (runs on the pool)."""
        objects.check_put_object(chunk.data, assembler.namespace, assembler.num_tokens,
                                 position_free=assembler.position_free, chunk_index=chunk.index)
        self._registry.register(assembler.namespace)
        self._counters.add_bytes(received=len(chunk.data))
        return bool(self._engine.put(chunk.key, chunk.data, assembler.namespace.tenant))

    @_rpc
    async def Delete(self, request: pb.DeleteRequest, context: Any, tenant: str | None):
        namespace = self._namespace(request, tenant)
        _, keys = await self._keys(namespace, request.tokens_le_i32,
                                   position_free=request.position_free)
        deleted = await self._run(lambda: sum(bool(self._engine.delete(k)) for k in keys))
        return pb.DeleteResponse(num_chunks_deleted=deleted)

    @_rpc
    async def Prefetch(self, request: pb.PrefetchRequest, context: Any, tenant: str | None):
        namespace = self._namespace(request, tenant)
        _, keys = await self._keys(namespace, request.tokens_le_i32)
        if not keys:
            return pb.PrefetchResponse()
        promoted, resident = await self._run(self._engine.prefetch, keys)
        return pb.PrefetchResponse(num_chunks_promoted=promoted, num_chunks_resident=resident)

    @_rpc
    async def Stats(self, request: pb.StatsRequest, context: Any, tenant: str | None):
        """Daemon-wide figures; with bearer tokens, only what no other tenant's use moves.

        Occupancy, hit counts and request counts sum every tenant's traffic, so one
        tenant would learn another's activity from them: a tenant sees each tier's name,
        capacity and configuration facts only (the operator reads the daemon-wide
        figures from the metrics endpoint).
        """
        tiers = await self._run(self._engine.stats)
        if tenant is not None:
            return pb.StatsResponse(
                tiers=[pb.TierStats(name=t.name, capacity_bytes=t.capacity_bytes,
                                    info={k: str(v) for k, v in t.info.items()
                                          if k in _TENANT_VISIBLE_INFO})
                       for t in tiers],
                uptime_ms=int(self._counters.uptime_s * 1000),
                version=__version__,
            )
        return pb.StatsResponse(
            tiers=[
                pb.TierStats(
                    name=t.name, used_bytes=t.used_bytes, capacity_bytes=t.capacity_bytes,
                    num_objects=t.num_objects, hits=t.hits, misses=t.misses,
                    evictions=t.evictions, corrupt=t.corrupt, errors=t.errors, puts=t.puts,
                    read_bytes=t.read_bytes, written_bytes=t.written_bytes,
                    info={str(k): str(v) for k, v in t.info.items()},
                )
                for t in tiers
            ],
            uptime_ms=int(self._counters.uptime_s * 1000),
            version=__version__,
            requests=self._counters.num_requests,
            failed_requests=self._counters.num_failed_requests,
        )

    # ------------------------------------------------------------ same-host arena

    @_rpc
    async def AttachArena(self, request: pb.AttachArenaRequest, context: Any,
                          tenant: str | None):
        self._same_host.check(context.peer(), tenant)
        return pb.AttachArenaResponse(**local.attach_info(self._engine.dram))

    @_rpc
    async def LeaseChunks(self, request: pb.LeaseChunksRequest, context: Any,
                          tenant: str | None):
        self._same_host.check(context.peer(), tenant)
        local.check_nonce(self._engine.dram, request.arena_nonce)
        namespace = self._namespace(request, tenant)
        _, keys = await self._keys(namespace, request.tokens_le_i32,
                                   position_free=request.position_free)
        ttl_s = local.lease_ttl_s(self._engine.dram, request.ttl_ms)
        run = await self._run(local.lease_run, self._engine, keys, ttl_s)
        if run.lease_id:
            self._lease_owners.record(run.lease_id, tenant, run.ttl_s)
        return pb.LeaseChunksResponse(
            lease_id=run.lease_id, ttl_ms=int(run.ttl_s * 1000), num_chunks_stored=run.num_stored,
            extents=[pb.ChunkExtent(offset_bytes=o, length_bytes=n) for o, n in run.extents])

    @_rpc
    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context: Any,
                           tenant: str | None):
        self._same_host.check(context.peer(), tenant)
        self._lease_owners.check_release(request.lease_id, tenant)
        gpu.release_any_lease(self._engine, request.lease_id)  # dict operations: no pool hop
        return pb.ReleaseLeaseResponse()

    @_rpc
    async def ReserveExtents(self, request: pb.ReserveExtentsRequest, context: Any,
                             tenant: str | None):
        self._same_host.check(context.peer(), tenant)
        local.check_nonce(self._engine.dram, request.arena_nonce)
        namespace = self._namespace(request, tenant)
        position_free = request.position_free
        tokens = tokens_from_bytes(request.tokens_le_i32, position_free=position_free)
        keys = chunk_keys(namespace, tokens, position_free=position_free)
        per_chunk = tokens_per_chunk(namespace, tokens, position_free=position_free)
        first, sizes = request.first_chunk, list(request.object_bytes)
        local.check_object_sizes(namespace, len(keys), first, sizes, per_chunk)
        plan = local.PutReservation(namespace, list(keys[first:first + len(sizes)]), first,
                                    per_chunk, position_free)
        ttl_s = local.lease_ttl_s(self._engine.dram, request.ttl_ms)
        reservation_id, extents = await self._run(local.reserve_run, self._engine, plan, sizes,
                                                  ttl_s)
        if reservation_id:
            self._lease_owners.record(reservation_id, tenant, ttl_s)
        return pb.ReserveExtentsResponse(
            reservation_id=reservation_id, ttl_ms=int(ttl_s * 1000),
            extents=[pb.ChunkExtent(offset_bytes=o, length_bytes=n) for o, n in extents])

    @_rpc
    async def CommitExtents(self, request: pb.CommitExtentsRequest, context: Any,
                            tenant: str | None):
        self._same_host.check(context.peer(), tenant)
        self._lease_owners.check_release(request.reservation_id, tenant)  # the reserver only
        stored, present = await self._run(local.commit_run, self._engine, self._registry,
                                          request.reservation_id)
        return pb.CommitExtentsResponse(num_chunks_stored=stored, num_chunks_present=present)

    @_rpc
    async def LeaseGpuChunks(self, request: pb.LeaseGpuChunksRequest, context: Any,
                             tenant: str | None):
        self._same_host.check(context.peer(), tenant)
        tier = gpu.gpu_tier_of(self._engine)
        namespace = self._namespace(request, tenant)
        tokens = tokens_from_bytes(request.tokens_le_i32, position_free=request.position_free)
        keys = chunk_keys(namespace, tokens, position_free=request.position_free)
        ttl_s = gpu.lease_ttl_s(tier, request.ttl_ms)
        run = await self._run(gpu.gpu_lease_run, self._engine, keys, ttl_s)
        return pb.LeaseGpuChunksResponse(
            lease_id=run.lease_id, ttl_ms=int(run.ttl_s * 1000), num_chunks_stored=run.num_stored,
            extents=[pb.GpuChunkExtent(offset_bytes=e.offset, length_bytes=e.length,
                                       device_checksum=e.checksum) for e in run.extents],
            **gpu.slab_info(tier))

    # ------------------------------------------------------------ FetchBlocks

    @_rpc
    async def FetchBlocks(self, request: pb.FetchBlocksRequest, context: Any,
                          tenant: str | None):
        namespace = self._namespace(request, tenant)
        _, keys = await self._keys(namespace, request.tokens_le_i32)
        batch = batch_from_proto(request, namespace.layout, len(keys))
        if batch.num_bytes + ENVELOPE_BYTES > self._max_message_bytes:
            raise CapacityExhausted(
                f"{len(batch.blocks)} blocks are {batch.num_bytes} bytes, over the "
                f"{self._max_message_bytes}-byte message limit; ask for fewer per call")
        data = await self._run(fetch_blocks, batch, keys, lambda key: self._chunks.load(key, False))
        self._counters.add_bytes(sent=len(data))
        return frames.fetch_blocks_response(data=data, block_bytes=batch.block_bytes)

    # ------------------------------------------------------------ blobs

    async def _blob_address(self, request: Any, tenant: str | None
                            ) -> tuple[Namespace, Any, str, ChunkKey]:
        """(namespace, tokens, kind, key) of a PutBlob/GetBlob request, validated; the
        key is hashed on the pool (up to max_request_tokens ids)."""
        namespace = self._namespace(request, tenant)
        tokens = tokens_from_bytes(request.tokens_le_i32)
        self._limits.check(namespace, tokens.size, position_free=True)  # one key, one hash
        blobs.check_tokens(tokens)
        kind = blobs.check_kind(request.kind)
        key = await self._run(blobs.blob_key, namespace, tokens, kind)
        return namespace, tokens, kind, key

    @_rpc
    async def PutBlob(self, request: pb.PutBlobRequest, context: Any, tenant: str | None):
        namespace, tokens, kind, key = await self._blob_address(request, tenant)
        data = request.data  # upb copies a bytes field on every access: read it once
        if len(data) + ENVELOPE_BYTES > self._max_message_bytes:
            raise CapacityExhausted(
                f"a {len(data)}-byte blob would not fit a GetBlob reply under the "
                f"{self._max_message_bytes}-byte message limit; raise server.max_message_bytes")

        def store() -> bool:
            obj = blobs.wrap(namespace, tokens.size, kind, data)  # checksums: off the loop
            self._registry.register(namespace)  # a blob fixes the layout like a chunk does
            # Unlike a chunk, a blob is not content-addressed: the last put wins (a
            # client that rejected a stored bundle replaces it with a recomputed one).
            replaced = self._engine.delete(key)
            self._engine.put(key, obj, namespace.tenant)
            return replaced

        replaced = await self._run(store)
        self._counters.add_bytes(received=len(data))
        return pb.PutBlobResponse(num_blobs_replaced=int(replaced))

    @_rpc
    async def GetBlob(self, request: pb.GetBlobRequest, context: Any, tenant: str | None):
        namespace, tokens, kind, key = await self._blob_address(request, tenant)

        def load() -> bytes | None:
            obj = self._engine.get(key)
            if obj is None:
                return None
            try:
                return blobs.unwrap(obj, namespace, tokens.size, kind)
            except Corrupt as exc:
                self._counters.count_corrupt_read()
                log.warning("dropping stored blob %s: %s", key.hex()[:16], exc)
                self._engine.drop_corrupt(key, obj)
                return None

        data = await self._run(load)
        if data is None:
            return pb.GetBlobResponse()
        self._counters.add_bytes(sent=len(data))
        return pb.GetBlobResponse(data=data)

    # ------------------------------------------------------------ Get

    @_rpc_stream
    async def Get(self, request: pb.GetRequest, context: Any, tenant: str | None):
        namespace = self._namespace(request, tenant)
        layer_major = order_from_proto(request.order)
        layers = layers_from_proto(request.layers, namespace.layout)
        _, keys = await self._keys(namespace, request.tokens_le_i32,
                                   position_free=request.position_free)
        if request.encoded and (layer_major or request.layers):
            raise InvalidArgument("encoded objects are whole chunks: ask for chunk-major order "
                                  "without a layer filter, or set encoded=false")
        num, per_tier = (await self._run(self._engine.lookup, keys)) if keys else (0, {})
        self._counters.count_lookup(tenant, namespace.name, len(keys), num, per_tier)
        if num == 0:
            return
        keys = keys[:num]
        limit = self._chunks.message_limit(request.max_response_bytes)
        if layer_major:
            stream = self._chunks.layer_major(keys, layers, context, limit=limit)
        else:
            stream = self._chunks.chunk_major(keys, request.encoded, layers, context,
                                              layer_filter=bool(request.layers), limit=limit)
        async for message in stream:
            self._counters.add_bytes(sent=len(message))  # framed: payload + a few bytes
            yield message
