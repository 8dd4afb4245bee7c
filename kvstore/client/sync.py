"""The blocking client: ``Client(addresses, namespace, layout)`` (DESIGN §5).

Failover: a call that fails with UNAVAILABLE (connection refused, daemon
draining) or whose stream is cut mid-way moves to the next address and is
retried whole; calls are idempotent because keys are content hashes. The
address that answered becomes the first one tried next time. Every call has
one overall deadline, ``timeout_s``, shared by its attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import _arena_put as arena_put
from kvstore.client import _codec as codecs
from kvstore.client import _local as local
from kvstore.client import _protocol as proto
from kvstore.client._connections import Connections, Metadata
from kvstore.client._status import error_from_rpc
from kvstore.client._tensors import from_storage
from kvstore.client._view import ArenaView, open_view
from kvstore.errors import (
    InvalidArgument,
    KVStoreError,
    NotFound,
    PermissionDenied,
)
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)
T = TypeVar("T")


def fetch_stats(addresses: str | Sequence[str], *, token: str | None = None,
                tls_ca_file: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """Stats of a daemon without naming a namespace (what ``kvstore stats`` shows)."""
    conns = Connections(addresses, token=token, tls_ca_file=tls_ca_file, timeout_s=timeout_s,
                        max_message_bytes=4 << 20)
    try:
        return conns.call("Stats", lambda stub, t, md: proto.stats_to_dict(
            stub.Stats(pb.StatsRequest(), timeout=t, metadata=md)))
    finally:
        conns.close()


class Client:
    """Blocking client of one namespace on one or more daemons (failover in order).

    Args:
        addresses: "HOST:PORT" or a list of them, tried in order on UNAVAILABLE.
        namespace: model id and revision, e.g. "smollm2-135m@main".
        layout: the KV layout of the namespace; the first put fixes it daemon-side.
        token: bearer token, if the daemon has tokens configured.
        tls_ca_file: PEM CA bundle; set to talk TLS.
        timeout_s: overall deadline of each call, failover attempts included.
        max_message_bytes: largest gRPC message; objects are split below it.
        tp_rank: tensor-parallel rank whose heads this client stores.
        transport: how ``get``/``get_chunk`` read: "auto" maps the daemon's DRAM arena
            when it is on this host (loopback address, matching nonce) and streams
            otherwise; "arena" insists on the arena (errors say why it cannot be
            used); "stream" always streams over gRPC. ``get_layers`` always streams.
        codec: how ``put``/``put_chunk`` store chunks, a name from ``kvstore.codec.LEVELS``.
            "raw" (the default) round-trips bit-exact; a kvq level ("balanced", ...)
            is lossy and several times smaller: ``get`` then returns exactly
            ``kvstore.codec.decode(kvstore.codec.encode(kv, layout, codec))``.

    Tensors are ``[layers, 2, kv_heads, tokens, head_dim]`` torch tensors or numpy
    arrays in ``layout.dtype``. numpy has no bfloat16: pass and receive bfloat16 as
    a uint16 array of its bit patterns (``t.view(torch.int16).numpy().view("u2")``).
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
        self._conns = Connections(addresses, token=token, tls_ca_file=tls_ca_file,
                                  timeout_s=timeout_s, max_message_bytes=max_message_bytes)

    # ------------------------------------------------------------ prefix-chained chunks

    def put(self, tokens: Any, kv: Any) -> int:
        """Store the full chunks of a sequence; returns the tokens now stored.

        Chunks already stored (the leading run the daemon reports) are not resent;
        a partial last chunk is ignored.

        Raises:
            InvalidArgument: bad tokens, kv rank/shape/dtype, or a namespace layout clash.
            CapacityExhausted: a message or object over a size limit.
        """
        plan = proto.plan_put(self.layout, tokens, kv, position_free=False)
        if plan.num_chunks == 0:
            return 0
        if self._put_local(plan) is local.STREAM:
            self._conns.call("Put", lambda stub, t, md: self._put(stub, t, md, plan))
        return plan.num_chunks * plan.tokens_per_chunk

    def _put(self, stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata,
             plan: proto.PutPlan) -> int:
        first = 0
        if not plan.position_free:
            request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=plan.tokens.tobytes())
            first = stub.Lookup(request, timeout=timeout, metadata=md).num_tokens
            first //= plan.tokens_per_chunk
        if first < plan.num_chunks:
            messages = proto.put_requests(self._ns, self.layout, plan, first, self._part_bytes,
                                        self._codec)
            stub.Put(messages, timeout=timeout, metadata=md)
        return plan.num_chunks * plan.tokens_per_chunk

    def lookup(self, tokens: Any) -> int:
        """Leading tokens stored (a multiple of chunk_tokens); 0 on a miss."""
        return self._lookup(tokens, position_free=False)

    def get(self, tokens: Any, *, layers: Sequence[int] | None = None, as_numpy: bool = False,
            decode: str = "server", device: Any = None, out: Any = None,
            verify: bool = True) -> Any:
        """The leading stored chunks of ``tokens``: ``[layers, 2, heads, n, dim]`` or None.

        ``n`` is a multiple of chunk_tokens and may be less than asked. ``layers``
        selects (ascending) layers. Every object is verified; bad bytes raise Corrupt.
        ``decode="client"`` streams the objects as stored (compressed) and decodes
        them here, on ``device`` ("cuda": the codec's Triton kernel; None: the CPU).
        ``out``: a C-contiguous CPU tensor or numpy array the caller owns,
        ``[layers, 2, heads, >= len(tokens) in whole chunks, dim]`` in the layout's
        dtype; the chunks are copied into its leading ``n`` tokens (on the same
        host: one copy from the arena, nothing allocated) and that view of ``out``
        is returned (None on a miss). A wrong buffer raises InvalidArgument.
        ``verify=False``: same-host copies check each object's header but skip its
        checksum (about a third of the copy's time; the daemon verified every object
        when it was stored, and the lease keeps its bytes from changing). Streamed
        gets always verify.
        """
        return self._get(tokens, layers=layers, as_numpy=as_numpy, position_free=False,
                         decode=decode, device=device, out=out, verify=verify)

    def get_layers(self, tokens: Any, *, layers: Sequence[int] | None = None,
                   as_numpy: bool = False) -> Iterator[tuple[int, Any]]:
        """Layer-major: yields ``(layer, [2, heads, n, dim])`` as each layer arrives.

        On the same host the chunks are copied out of the arena (verified as copied)
        and then handed out layer by layer; the streamed path yields each layer as
        its last message arrives.
        """
        arr = proto.check_tokens(tokens, position_free=False)
        chosen = proto.check_layers(layers, self.layout)
        got = self._get_local(arr, chosen, False)
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
            asm = self._assembler(chosen, arr, layer_major=True, position_free=False)
            try:
                stream = stub.Get(request, timeout=self._conns.remaining(deadline, "Get"),
                                  metadata=self._conns.metadata)
                for msg in proto.drained(stream):
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

    def delete(self, tokens: Any) -> int:
        """Remove every full chunk of ``tokens`` from every tier; returns chunks deleted."""
        return self._delete(tokens, position_free=False)

    def prefetch(self, tokens: Any) -> int:
        """Promote the leading stored chunks to DRAM; returns the tokens now resident there."""
        arr = proto.check_tokens(tokens, position_free=False)
        request = pb.PrefetchRequest(namespace=self._ns, tokens_le_i32=arr.tobytes())
        resp = self._conns.call("Prefetch", lambda stub, t, md: stub.Prefetch(
            request, timeout=t, metadata=md))
        return (resp.num_chunks_promoted + resp.num_chunks_resident) * self.layout.chunk_tokens

    def stats(self) -> dict[str, Any]:
        """Tier occupancy and counters: {"tiers": [...], "uptime_ms", "version", ...}."""
        return self._conns.call("Stats", lambda stub, t, md: proto.stats_to_dict(
            stub.Stats(pb.StatsRequest(), timeout=t, metadata=md)))

    def fetch_blocks(self, tokens: Any, layer: int, kind: int, heads: Sequence[int],
                     blocks: Sequence[int], *, block_tokens: int = 8) -> bytes:
        """Blocks ``(heads[i], blocks[i])`` of ``(layer, kind 0=K|1=V)``, concatenated.

        Block b is tokens ``[b * block_tokens, (b + 1) * block_tokens)`` of ``tokens``;
        each is ``block_tokens x head_dim`` elements in ``layout.dtype``.

        Raises:
            InvalidArgument: layer, kind, a head or a block out of range, or mismatched lengths.
            NotFound: a chunk holding a requested block is not stored.
        """
        request = proto.fetch_blocks_request(self._ns, tokens, layer, kind, heads, blocks,
                                             block_tokens)
        return self._conns.call("FetchBlocks", lambda stub, t, md: stub.FetchBlocks(
            request, timeout=t, metadata=md).data)

    def put_blob(self, tokens: Any, kind: str, data: bytes) -> bool:
        """Attach ``data`` (e.g. a sparse shadow bundle) to exactly ``tokens`` under ``kind``.

        Returns True if this replaced a blob stored there before (the last put wins).

        Raises:
            InvalidArgument: no tokens, an empty blob, a kind outside 1-128 bytes, or a
                namespace layout clash.
            CapacityExhausted: the blob is over the message-size limit or no tier holds it.
        """
        request = pb.PutBlobRequest(namespace=self._ns, data=bytes(data),
                                    **proto.blob_fields(tokens, kind))
        return self._conns.call("PutBlob", lambda stub, t, md: stub.PutBlob(
            request, timeout=t, metadata=md).num_blobs_replaced == 1)

    def get_blob(self, tokens: Any, kind: str) -> bytes | None:
        """The blob attached to exactly ``tokens`` under ``kind``; None on a miss."""
        request = pb.GetBlobRequest(namespace=self._ns, **proto.blob_fields(tokens, kind))
        resp = self._conns.call("GetBlob", lambda stub, t, md: stub.GetBlob(
            request, timeout=t, metadata=md))
        return resp.data if resp.HasField("data") else None

    # ------------------------------------------------------------ position-free chunks

    def put_chunk(self, tokens: Any, kv: Any) -> bool:
        """Store a text chunk's KV position-free (any length); True if newly stored."""
        plan = proto.plan_put(self.layout, tokens, kv, position_free=True)
        done = self._put_local(plan)
        if done is not local.STREAM:
            return done.num_chunks_stored == 1

        def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> bool:
            messages = proto.put_requests(self._ns, self.layout, plan, 0, self._part_bytes,
                                          self._codec)
            return stub.Put(messages, timeout=timeout, metadata=md).num_chunks_stored == 1

        return self._conns.call("Put", attempt)

    def get_chunk(self, tokens: Any, *, as_numpy: bool = False, decode: str = "server",
                  device: Any = None) -> Any:
        """A position-free chunk's KV, ``[layers, 2, heads, len(tokens), dim]``, or None."""
        return self._get(tokens, layers=None, as_numpy=as_numpy, position_free=True,
                         decode=decode, device=device)

    def lookup_chunk(self, tokens: Any) -> bool:
        return self._lookup(tokens, position_free=True) > 0

    def delete_chunk(self, tokens: Any) -> bool:
        return self._delete(tokens, position_free=True) > 0

    # ------------------------------------------------------------ shared

    def _lookup(self, tokens: Any, *, position_free: bool) -> int:
        arr = proto.check_tokens(tokens, position_free=position_free)
        request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=arr.tobytes(),
                                   position_free=position_free)
        return self._conns.call("Lookup", lambda stub, t, md: stub.Lookup(
            request, timeout=t, metadata=md).num_tokens)

    def _delete(self, tokens: Any, *, position_free: bool) -> int:
        arr = proto.check_tokens(tokens, position_free=position_free)
        request = pb.DeleteRequest(namespace=self._ns, tokens_le_i32=arr.tobytes(),
                                   position_free=position_free)
        return self._conns.call("Delete", lambda stub, t, md: stub.Delete(
            request, timeout=t, metadata=md).num_chunks_deleted)

    def _assembler(self, layers: list[int] | None, tokens: Any, *, layer_major: bool,
                   position_free: bool) -> proto.GetAssembler:
        per_chunk = len(tokens) if position_free else self.layout.chunk_tokens
        return proto.GetAssembler(self.layout, per_chunk,
                                  layers or list(range(self.layout.num_layers)), layer_major)

    def _get(self, tokens: Any, *, layers: Sequence[int] | None, as_numpy: bool,
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
            out = self._get_encoded(arr, chosen, position_free, device)
            return None if out is None else proto.tensor_result(out, self.layout, as_numpy)
        got = self._get_local(arr, chosen, position_free, dest, verify)
        if got is not local.STREAM:
            return local.deliver(got, out, dest, self.layout.dtype, as_numpy=as_numpy)
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=False,
                                    position_free=position_free,
                                    max_response_bytes=self.max_message_bytes)

        def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> Any:
            asm = self._assembler(chosen, arr, layer_major=False, position_free=position_free)
            for msg in stub.Get(request, timeout=timeout, metadata=md):
                asm.add(msg)
            return asm.result()

        got = self._conns.call("Get", attempt)
        return local.deliver(got, out, dest, self.layout.dtype, as_numpy=as_numpy)

    def _get_encoded(self, arr: Any, chosen: list[int] | None, position_free: bool,
                     device: Any) -> Any:
        """Stream the objects as stored and decode them here (always streamed)."""
        request = proto.get_request(self._ns, arr, layers=None, layer_major=False,
                                    position_free=position_free, encoded=True,
                                    max_response_bytes=self.max_message_bytes)

        def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> list[bytes]:
            got = codecs.EncodedObjects()
            for msg in stub.Get(request, timeout=timeout, metadata=md):
                got.add(msg)
            return got.objects

        objects = self._conns.call("Get", attempt)
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        return codecs.decode_objects(objects, self.layout, per_chunk, chosen, device) \
            if objects else None

    # ------------------------------------------------------------ same-host arena

    def lease(self, tokens: Any, *, ttl_s: float | None = None,
              position_free: bool = False) -> local.ArenaLease:
        """Pin the leading stored chunks in the daemon's arena and map it (same host only).

        The returned lease (a context manager) gives the mapped arena and one extent
        per pinned chunk; objects are not verified: check them before use. Release
        it when done; it also ends by itself after ``ttl_s`` (default: the daemon's).

        Raises:
            PermissionDenied: the daemon refuses arena references to this caller.
            NotFound: the arena cannot be mapped here (another host or user).
        """
        if self._local.transport == "stream":
            raise InvalidArgument("this client was made with transport='stream'; leases need "
                                  "the arena")
        arr = proto.check_tokens(tokens, position_free=position_free)
        index = self._conns.order()[0]
        return self._lease(index, arr, position_free, ttl_s)

    def view(self, tokens: Any, *, position_free: bool = False, verify: bool = True,
             ttl_s: float | None = None) -> ArenaView:
        """The leading stored chunks, read in place in the daemon's arena (same host only).

        ``with client.view(tokens) as v:`` pins the chunks under a lease and gives
        ``v.chunks`` (read-only ``[layers, 2, heads, T, dim]`` numpy views, one per
        chunk) and ``v.objects`` (their KVC1 objects); nothing is copied. Each object
        is checked against the layout, and its checksum verified when ``verify``.

        Raises:
            PermissionDenied, NotFound: the arena cannot be used (see ``lease``).
            InvalidArgument: a chunk is stored compressed (kvq); use ``get``.
            Corrupt: an object fails its checks.
        """
        arr = proto.check_tokens(tokens, position_free=position_free)
        lease = self.lease(arr, ttl_s=ttl_s, position_free=position_free)
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        return open_view(lease, self.layout, per_chunk, verify=verify)

    def _get_local(self, arr: Any, chosen: list[int] | None, position_free: bool,
                         dest: Any = None, verify: bool = True) -> Any:
        """The arena read of ``_get``: an array, None (nothing stored) or local.STREAM."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not self._local.wants(index, address):
            return local.STREAM
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        layers = chosen or list(range(self.layout.num_layers))
        try:
            with self._lease(index, arr, position_free, None) as lease:
                return self._local.read(lease, self.layout, per_chunk, layers, dest, verify)
        except PermissionDenied as exc:
            return self._local.fallback(index, address, exc, refused=True)
        except (KVStoreError, local.NotRaw) as exc:
            return self._local.fallback(index, address, exc, refused=False)

    def _put_local(self, plan: proto.PutPlan) -> arena_put.PutResult | object:
        """The same-host put (``client/_arena_put.py``); local.STREAM when it must stream."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not self._local.wants(index, address):
            return local.STREAM
        steps = arena_put.put_steps(self._local, index, self._ns, self.layout, plan, self._codec)
        try:
            return arena_put.drive(steps, self._conns.stub(index), self._conns.timeout_s,
                                   self._conns.metadata)
        except (grpc.RpcError, KVStoreError) as exc:
            return arena_put.after_failure(self._local, index, address, exc)

    def _lease(self, index: int, arr: Any, position_free: bool,
               ttl_s: float | None) -> local.ArenaLease:
        stub = self._conns.stub(index)
        address = self._conns.addresses[index]
        deadline, md = time.monotonic() + self._conns.timeout_s, self._conns.metadata
        for attempt in range(2):
            arena = self._local.mapped(index)
            try:
                timeout = self._conns.remaining(deadline, "LeaseChunks")
                if arena is None:
                    arena = local.attach(stub.AttachArena(pb.AttachArenaRequest(),
                                                          timeout=timeout, metadata=md))
                    self._local.remember(index, arena)
                request = pb.LeaseChunksRequest(
                    namespace=self._ns, tokens_le_i32=arr.tobytes(), position_free=position_free,
                    ttl_ms=0 if ttl_s is None else max(1, int(ttl_s * 1000)),
                    arena_nonce=arena.nonce)
                resp = stub.LeaseChunks(request, timeout=timeout, metadata=md)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, address)
                if isinstance(error, NotFound) and attempt == 0:
                    self._local.forget(index)  # the daemon restarted: map its new arena
                    continue
                raise error from None
            return local.ArenaLease(arena.reader, local.extents_of(resp), resp.num_chunks_stored,
                                    resp.lease_id, resp.ttl_ms / 1000,
                                    lambda lease_id: self._release(index, lease_id))
        raise AssertionError("unreachable")

    def _release(self, index: int, lease_id: int) -> None:
        try:
            self._conns.stub(index).ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease_id),
                                                 timeout=self._conns.timeout_s,
                                                 metadata=self._conns.metadata)
        except grpc.RpcError as exc:  # the lease expires by itself; nothing is lost
            log.info("releasing lease %d failed: %s", lease_id, exc.details())

    def close(self) -> None:
        self._local.close()
        self._conns.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
