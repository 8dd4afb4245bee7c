"""The asyncio client: ``AsyncClient`` mirrors ``Client`` with ``async`` methods (grpc.aio).

Failover, deadlines, validation and verification follow ``kvstore.client.sync``.
Channels are created on first use, inside the running event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import _arena_put as arena_put
from kvstore.client import _codec as codecs
from kvstore.client import _local as local
from kvstore.client import _protocol as proto
from kvstore.client._status import error_from_rpc
from kvstore.client._tensors import from_storage
from kvstore.client._view import AsyncViewScope
from kvstore.client.sync import Connections, Metadata
from kvstore.errors import InvalidArgument, KVStoreError, NotFound, PermissionDenied
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncConnections(Connections):
    """``Connections`` over grpc.aio channels."""

    def stub(self, index: int) -> pb_grpc.KVStoreStub:
        channel = self._channels.get(index)
        if channel is None:
            address = self.addresses[index]
            if self._is_tls:
                creds = grpc.ssl_channel_credentials(root_certificates=self._ca)
                channel = grpc.aio.secure_channel(address, creds, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[index] = channel
        return frames.stub(channel)

    async def acall(self, what: str,
                    fn: Callable[[pb_grpc.KVStoreStub, float, Metadata], Awaitable[T]]) -> T:
        """Await ``fn(stub, timeout_s, metadata)`` against each address until one answers."""
        deadline = time.monotonic() + self.timeout_s
        failures: list[str] = []
        for index in self.order():
            try:
                result = await fn(self.stub(index), self.remaining(deadline, what), self.metadata)
            except grpc.RpcError as exc:
                self.record_failure(what, index, exc, failures)
                continue
            self.succeeded(index)
            return result
        raise self.all_failed(what, failures)

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.close()  # type: ignore[misc]
        self._channels.clear()


class AsyncClient:
    """Asyncio client of one namespace; same arguments and semantics as ``Client``.

    Same-host arena reads copy on a worker thread, so the event loop keeps running.
    """

    def __init__(self, addresses: str | Sequence[str], namespace: str, layout: KVLayout, *,
                 token: str | None = None, tls_ca_file: str | None = None,
                 timeout_s: float = 30.0, max_message_bytes: int = 64 << 20,
                 tp_rank: int = 0, transport: str = "auto", codec: str = "raw") -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgument(f"layout must be a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        self._ns = proto.namespace_to_proto(namespace, layout, tp_rank)
        self.max_message_bytes = max_message_bytes  # largest message sent or received
        self._part_bytes = max_message_bytes - proto.PART_HEADROOM_BYTES
        self._local = local.LocalPath(transport)
        self._codec = codecs.check_codec(codec)
        self._conns = AsyncConnections(addresses, token=token, tls_ca_file=tls_ca_file,
                                       timeout_s=timeout_s, max_message_bytes=max_message_bytes)

    # ------------------------------------------------------------ prefix-chained chunks

    async def put(self, tokens: Any, kv: Any) -> int:
        """Store the full chunks of a sequence; returns the tokens now stored."""
        plan = proto.plan_put(self.layout, tokens, kv, position_free=False)
        if plan.num_chunks == 0:
            return 0
        if await self._put_local(plan) is not local.STREAM:
            return plan.num_chunks * plan.tokens_per_chunk

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> int:
            request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=plan.tokens.tobytes())
            first = (await stub.Lookup(request, timeout=timeout, metadata=md)).num_tokens
            first //= plan.tokens_per_chunk
            if first < plan.num_chunks:
                messages = proto.put_requests(self._ns, self.layout, plan, first,
                                              self._part_bytes, self._codec)
                await stub.Put(messages, timeout=timeout, metadata=md)
            return plan.num_chunks * plan.tokens_per_chunk

        return await self._conns.acall("Put", attempt)

    async def lookup(self, tokens: Any) -> int:
        """Leading tokens stored (a multiple of chunk_tokens); 0 on a miss."""
        return await self._lookup(tokens, position_free=False)

    async def get(self, tokens: Any, *, layers: Sequence[int] | None = None,
                  as_numpy: bool = False, decode: str = "server", device: Any = None,
                  out: Any = None, verify: bool = True) -> Any:
        """The leading stored chunks of ``tokens`` (see ``Client.get``), or None."""
        return await self._get(tokens, layers=layers, as_numpy=as_numpy, position_free=False,
                               decode=decode, device=device, out=out, verify=verify)

    async def get_layers(self, tokens: Any, *, layers: Sequence[int] | None = None,
                         as_numpy: bool = False) -> AsyncIterator[tuple[int, Any]]:
        """Layer-major: yields ``(layer, [2, heads, n, dim])`` as each layer arrives.

        Same host: copied out of the arena first, then handed out layer by layer
        (see ``Client.get_layers``).
        """
        arr = proto.check_tokens(tokens, position_free=False)
        chosen = proto.check_layers(layers, self.layout)
        got = await self._get_local(arr, chosen, False)
        if got is not local.STREAM:
            for layer, arr_l in proto.split_layers(got, chosen, self.layout):
                yield layer, from_storage(arr_l, self.layout.dtype, as_numpy=as_numpy)
            return
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=True,
                                    position_free=False,
                                    max_response_bytes=self.max_message_bytes)
        deadline = time.monotonic() + self._conns.timeout_s
        yielded, num_chunks, failures = 0, None, []
        for index in self._conns.order():
            stub = self._conns.stub(index)
            asm = self._assembler(chosen, arr, position_free=False, layer_major=True)
            try:
                stream = stub.Get(request, timeout=self._conns.remaining(deadline, "Get"),
                                  metadata=self._conns.metadata)
                async for msg in stream:
                    done = asm.add_streamed_layer(msg, yielded=yielded, num_chunks=num_chunks)
                    num_chunks = asm.num_chunks
                    if done is not None:
                        yielded += 1
                        yield asm.layers[done], from_storage(asm.layer(done).copy(),
                                                             self.layout.dtype, as_numpy=as_numpy)
                asm.result()
            except grpc.RpcError as exc:
                self._conns.record_failure("Get", index, exc, failures)
                continue
            self._conns.succeeded(index)
            return
        raise self._conns.all_failed("Get", failures)

    async def delete(self, tokens: Any) -> int:
        """Remove every full chunk of ``tokens`` from every tier; returns chunks deleted."""
        return await self._delete(tokens, position_free=False)

    async def prefetch(self, tokens: Any) -> int:
        """Promote the leading stored chunks to DRAM; returns the tokens now resident there."""
        arr = proto.check_tokens(tokens, position_free=False)
        request = pb.PrefetchRequest(namespace=self._ns, tokens_le_i32=arr.tobytes())

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> int:
            resp = await stub.Prefetch(request, timeout=timeout, metadata=md)
            return resp.num_chunks_promoted + resp.num_chunks_resident

        return await self._conns.acall("Prefetch", attempt) * self.layout.chunk_tokens

    async def stats(self) -> dict[str, Any]:
        """Tier occupancy and counters (see ``Client.stats``)."""

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> Any:
            return proto.stats_to_dict(await stub.Stats(pb.StatsRequest(), timeout=timeout,
                                                        metadata=md))

        return await self._conns.acall("Stats", attempt)

    async def fetch_blocks(self, tokens: Any, layer: int, kind: int, heads: Sequence[int],
                           blocks: Sequence[int], *, block_tokens: int = 8) -> bytes:
        """Blocks ``(heads[i], blocks[i])`` of ``(layer, kind)``; see ``Client.fetch_blocks``."""
        request = proto.fetch_blocks_request(self._ns, tokens, layer, kind, heads, blocks,
                                             block_tokens)

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> bytes:
            return (await stub.FetchBlocks(request, timeout=timeout, metadata=md)).data

        return await self._conns.acall("FetchBlocks", attempt)

    async def put_blob(self, tokens: Any, kind: str, data: bytes) -> bool:
        """Attach ``data`` to exactly ``tokens`` under ``kind``; see ``Client.put_blob``."""
        request = pb.PutBlobRequest(namespace=self._ns, data=bytes(data),
                                    **proto.blob_fields(tokens, kind))

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> bool:
            resp = await stub.PutBlob(request, timeout=timeout, metadata=md)
            return resp.num_blobs_replaced == 1

        return await self._conns.acall("PutBlob", attempt)

    async def get_blob(self, tokens: Any, kind: str) -> bytes | None:
        """The blob attached to exactly ``tokens`` under ``kind``; None on a miss."""
        request = pb.GetBlobRequest(namespace=self._ns, **proto.blob_fields(tokens, kind))

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float,
                          md: Metadata) -> bytes | None:
            resp = await stub.GetBlob(request, timeout=timeout, metadata=md)
            return resp.data if resp.HasField("data") else None

        return await self._conns.acall("GetBlob", attempt)

    # ------------------------------------------------------------ position-free chunks

    async def put_chunk(self, tokens: Any, kv: Any) -> bool:
        """Store a text chunk's KV position-free (any length); True if newly stored."""
        plan = proto.plan_put(self.layout, tokens, kv, position_free=True)
        done = await self._put_local(plan)
        if done is not local.STREAM:
            return done.num_chunks_stored == 1

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> bool:
            messages = proto.put_requests(self._ns, self.layout, plan, 0, self._part_bytes,
                                          self._codec)
            resp = await stub.Put(messages, timeout=timeout, metadata=md)
            return resp.num_chunks_stored == 1

        return await self._conns.acall("Put", attempt)

    async def get_chunk(self, tokens: Any, *, as_numpy: bool = False, decode: str = "server",
                        device: Any = None) -> Any:
        return await self._get(tokens, layers=None, as_numpy=as_numpy, position_free=True,
                               decode=decode, device=device)

    async def lookup_chunk(self, tokens: Any) -> bool:
        return await self._lookup(tokens, position_free=True) > 0

    async def delete_chunk(self, tokens: Any) -> bool:
        return await self._delete(tokens, position_free=True) > 0

    # ------------------------------------------------------------ shared

    async def _lookup(self, tokens: Any, *, position_free: bool) -> int:
        arr = proto.check_tokens(tokens, position_free=position_free)
        request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=arr.tobytes(),
                                   position_free=position_free)

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> int:
            return (await stub.Lookup(request, timeout=timeout, metadata=md)).num_tokens

        return await self._conns.acall("Lookup", attempt)

    async def _delete(self, tokens: Any, *, position_free: bool) -> int:
        arr = proto.check_tokens(tokens, position_free=position_free)
        request = pb.DeleteRequest(namespace=self._ns, tokens_le_i32=arr.tobytes(),
                                   position_free=position_free)

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> int:
            return (await stub.Delete(request, timeout=timeout, metadata=md)).num_chunks_deleted

        return await self._conns.acall("Delete", attempt)

    def _assembler(self, layers: list[int] | None, tokens: Any, *, layer_major: bool,
                   position_free: bool) -> proto.GetAssembler:
        per_chunk = len(tokens) if position_free else self.layout.chunk_tokens
        return proto.GetAssembler(self.layout, per_chunk,
                                  layers or list(range(self.layout.num_layers)), layer_major)

    async def _get(self, tokens: Any, *, layers: Sequence[int] | None, as_numpy: bool,
                   position_free: bool, decode: str = "server", device: Any = None,
                   out: Any = None, verify: bool = True) -> Any:
        arr = proto.check_tokens(tokens, position_free=position_free)
        chosen = proto.check_layers(layers, self.layout)
        dest = None if out is None else local.check_out(
            out, self.layout, len(chosen or range(self.layout.num_layers)),
            local.out_tokens(arr, self.layout, position_free))
        if codecs.check_decode(decode) == "client":
            if out is not None:
                raise InvalidArgument("out= fills CPU buffers from stored raw bytes; with "
                                      "decode='client' use the returned tensor")
            out = await self._get_encoded(arr, chosen, position_free, device)
            return None if out is None else proto.tensor_result(out, self.layout, as_numpy)
        got = await self._get_local(arr, chosen, position_free, dest, verify)
        if got is not local.STREAM:
            return local.deliver(got, out, dest, self.layout.dtype, as_numpy=as_numpy)
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=False,
                                    position_free=position_free,
                                    max_response_bytes=self.max_message_bytes)

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> Any:
            asm = self._assembler(chosen, arr, layer_major=False, position_free=position_free)
            async for msg in stub.Get(request, timeout=timeout, metadata=md):
                asm.add(msg)
            return asm.result()

        got = await self._conns.acall("Get", attempt)
        return local.deliver(got, out, dest, self.layout.dtype, as_numpy=as_numpy)

    async def _get_encoded(self, arr: Any, chosen: list[int] | None, position_free: bool,
                           device: Any) -> Any:
        """Stream the objects as stored and decode them on a worker thread."""
        request = proto.get_request(self._ns, arr, layers=None, layer_major=False,
                                    position_free=position_free, encoded=True,
                                    max_response_bytes=self.max_message_bytes)

        async def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> Any:
            got = codecs.EncodedObjects()
            async for msg in stub.Get(request, timeout=timeout, metadata=md):
                got.add(msg)
            return got.objects

        objects = await self._conns.acall("Get", attempt)
        if not objects:
            return None
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        return await asyncio.to_thread(codecs.decode_objects, objects, self.layout, per_chunk,
                                       chosen, device)

    def view(self, tokens: Any, *, position_free: bool = False, verify: bool = True,
             ttl_s: float | None = None) -> AsyncViewScope:
        """``async with client.view(tokens) as v``: chunks read in place (``Client.view``)."""
        if self._local.transport == "stream":
            raise InvalidArgument("this client was made with transport='stream'; views need "
                                  "the arena")
        arr = proto.check_tokens(tokens, position_free=position_free)
        index = self._conns.order()[0]
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        return AsyncViewScope(lambda: self._lease(index, arr, position_free, ttl_s),
                              lambda lease_id: self._release(index, lease_id), self.layout,
                              per_chunk, verify)

    async def _get_local(self, arr: Any, chosen: list[int] | None, position_free: bool,
                         dest: Any = None, verify: bool = True) -> Any:
        """The arena read of ``_get``: an array, None (nothing stored) or local.STREAM."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not self._local.wants(index, address):
            return local.STREAM
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        layers = chosen or list(range(self.layout.num_layers))
        try:
            lease = await self._lease(index, arr, position_free)
            try:
                return await asyncio.to_thread(self._local.read, lease, self.layout, per_chunk,
                                               layers, dest, verify)
            finally:
                await self._release(index, lease.lease_id)
        except PermissionDenied as exc:
            return self._local.fallback(index, address, exc, refused=True)
        except (KVStoreError, local.NotRaw) as exc:
            return self._local.fallback(index, address, exc, refused=False)

    async def _put_local(self, plan: proto.PutPlan) -> arena_put.PutResult | object:
        """The same-host put (``client/_arena_put.py``); local.STREAM when it must stream."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not self._local.wants(index, address):
            return local.STREAM
        steps = arena_put.put_steps(self._local, index, self._ns, self.layout, plan, self._codec)
        try:
            return await arena_put.adrive(steps, self._conns.stub(index), self._conns.timeout_s,
                                          self._conns.metadata)
        except (grpc.RpcError, KVStoreError) as exc:
            return arena_put.after_failure(self._local, index, address, exc)

    async def _lease(self, index: int, arr: Any, position_free: bool,
                     ttl_s: float | None = None) -> local.ArenaLease:
        stub = self._conns.stub(index)
        address = self._conns.addresses[index]
        deadline, md = time.monotonic() + self._conns.timeout_s, self._conns.metadata
        for attempt in range(2):
            arena = self._local.mapped(index)
            try:
                timeout = self._conns.remaining(deadline, "LeaseChunks")
                if arena is None:
                    resp = await stub.AttachArena(pb.AttachArenaRequest(), timeout=timeout,
                                                  metadata=md)
                    arena = local.attach(resp)
                    self._local.remember(index, arena)
                request = pb.LeaseChunksRequest(
                    namespace=self._ns, tokens_le_i32=arr.tobytes(), position_free=position_free,
                    ttl_ms=0 if ttl_s is None else max(1, int(ttl_s * 1000)),
                    arena_nonce=arena.nonce)
                lease = await stub.LeaseChunks(request, timeout=timeout, metadata=md)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, address)
                if isinstance(error, NotFound) and attempt == 0:
                    self._local.forget(index)  # the daemon restarted: map its new arena
                    continue
                raise error from None
            return local.ArenaLease(arena.reader, local.extents_of(lease),
                                    lease.num_chunks_stored, lease.lease_id, lease.ttl_ms / 1000)
        raise AssertionError("unreachable")

    async def _release(self, index: int, lease_id: int) -> None:
        if not lease_id:
            return
        try:
            await self._conns.stub(index).ReleaseLease(
                pb.ReleaseLeaseRequest(lease_id=lease_id), timeout=self._conns.timeout_s,
                metadata=self._conns.metadata)
        except grpc.RpcError as exc:  # the lease expires by itself; nothing is lost
            log.info("releasing lease %d failed: %s", lease_id, exc.details())

    async def close(self) -> None:
        self._local.close()
        await self._conns.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
