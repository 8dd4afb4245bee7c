"""The one client core: every public call of ``Client`` and ``AsyncClient``, written once.

Each public method here is a plan (``kvstore.client._plan``): validation, request
building, failover over the addresses, the same-host arena path, leases and
layer streaming, with no I/O. ``Client`` drives the plans with blocking gRPC and
``AsyncClient`` with grpc.aio, so both have the same methods, signatures and
behaviour.

Failover: a call that fails with UNAVAILABLE (connection refused, daemon
draining) or whose stream is cut mid-way moves to the next address and is
retried whole; calls are idempotent because keys are content hashes. The
address that answered becomes the first one tried next time. Every call has
one overall deadline, ``timeout_s``, shared by its attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore.client import _arena_put as arena_put
from kvstore.client import _blobs as blobs
from kvstore.client import _codec as codecs
from kvstore.client import _gpu as gpu
from kvstore.client import _local as local
from kvstore.client import _protocol as proto
from kvstore.client._connections import Connections
from kvstore.client._plan import END, Emit, Offload, OpenStream, Plan, Receive, Unary
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
STREAMING_PLANS = frozenset({"get_layers"})  # plans that emit values (generator methods)
Attempt = Callable[[int, float], Plan[Any]]  # (address index, timeout_s) -> plan of one try


class ClientCore:
    """State and plans shared by ``Client`` and ``AsyncClient`` (see their docstrings).

    Subclasses set ``connections`` (the channel kind) and turn every public plan into
    a method with ``kvstore.client._plan.driven_by``; ``tests/client/test_core.py``
    checks that both clients have all of them, with the same signatures.
    """

    connections: type[Connections] = Connections

    def __init__(self, addresses: str | Sequence[str], namespace: str, layout: KVLayout, *,
                 token: str | None = None, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 timeout_s: float = 30.0, max_message_bytes: int = 64 << 20,
                 tp_rank: int = 0, transport: str = "auto", codec: str = "raw",
                 max_blob_part_bytes: int = blobs.MAX_PART_BYTES,
                 copy_threads: int | None = None) -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgument(f"layout must be a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        self._ns = proto.namespace_to_proto(namespace, layout, tp_rank)
        self.namespace = namespace  # the name given: it also picks the codec's table
        self.max_message_bytes = max_message_bytes  # largest message sent or received
        self._part_bytes = max_message_bytes - proto.PART_HEADROOM_BYTES
        self.max_blob_part_bytes = max_blob_part_bytes  # larger blobs are stored in parts
        self.num_broken_blobs = 0  # parted blobs read with a part missing or not matching
        self._local = local.LocalPath(transport, copy_threads)
        self._gpu = gpu.GpuPath()
        self._codec = codecs.check_codec(codec)
        self._conns = self.connections(addresses, token=token, tls_ca_file=tls_ca_file,
                                       timeout_s=timeout_s, max_message_bytes=max_message_bytes,
                                       tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)

    # ------------------------------------------------------------ prefix-chained chunks

    def put(self, tokens: Any, kv: Any) -> Plan[int]:
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
        if (yield from self._put_local(plan)) is not local.STREAM:
            return plan.num_chunks * plan.tokens_per_chunk

        def attempt(index: int, timeout: float) -> Plan[int]:
            request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=plan.tokens.tobytes())
            first = (yield Unary(index, "Lookup", request, timeout)).num_tokens
            first //= plan.tokens_per_chunk
            if first < plan.num_chunks:
                messages = proto.put_requests(self._ns, self.layout, plan, first,
                                              self._part_bytes, self._codec)
                yield Unary(index, "Put", messages, timeout)
            return plan.num_chunks * plan.tokens_per_chunk

        return (yield from self._failover("Put", attempt))

    def lookup(self, tokens: Any) -> Plan[int]:
        """Leading tokens stored (a multiple of chunk_tokens); 0 on a miss."""
        return (yield from self._lookup(tokens, position_free=False))

    def get(self, tokens: Any, *, layers: Sequence[int] | None = None, as_numpy: bool = False,
            decode: str = "server", device: Any = None, out: Any = None,
            verify: bool = True) -> Plan[Any]:
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
        With ``decode="server"``, ``device`` is where the result lands: for a CUDA
        device a same-host client copies raw chunks device to device out of the
        daemon's GPU tier (falling back to the arena, then the stream).
        """
        return (yield from self._get(tokens, layers=layers, as_numpy=as_numpy,
                                     position_free=False, decode=decode, device=device,
                                     out=out, verify=verify))

    def get_layers(self, tokens: Any, *, layers: Sequence[int] | None = None,
                   as_numpy: bool = False) -> Plan[None]:
        """Layer-major: yields ``(layer, [2, heads, n, dim])`` as each layer arrives.

        On the same host the chunks are copied out of the arena (verified as copied)
        and then handed out layer by layer; the streamed path yields each layer as
        its last message arrives.
        """
        arr = proto.check_tokens(tokens, position_free=False)
        chosen = proto.check_layers(layers, self.layout)
        got = yield from self._get_local(arr, chosen, False)
        if got is not local.STREAM:
            for layer, arr_l in proto.split_layers(got, chosen, self.layout):
                yield Emit((layer, from_storage(arr_l, self.layout.dtype, as_numpy=as_numpy)))
            return
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=True,
                                    position_free=False,
                                    max_response_bytes=self.max_message_bytes)
        yielded, num_chunks = 0, None  # across attempts: a retry resumes after them

        def attempt(index: int, timeout: float) -> Plan[None]:
            nonlocal yielded, num_chunks
            asm = self._assembler(chosen, arr, layer_major=True, position_free=False)
            stream = yield OpenStream(index, "Get", request, timeout, read_ahead=True)
            while (msg := (yield Receive(stream))) is not END:
                done = asm.add_streamed_layer(msg, yielded=yielded, num_chunks=num_chunks)
                num_chunks = asm.num_chunks
                if done is not None:
                    yielded += 1
                    yield Emit((asm.layers[done], from_storage(
                        asm.layer(done).copy(), self.layout.dtype, as_numpy=as_numpy)))
            asm.result()

        yield from self._failover("Get", attempt)

    def delete(self, tokens: Any) -> Plan[int]:
        """Remove every full chunk of ``tokens`` from every tier; returns chunks deleted."""
        return (yield from self._delete(tokens, position_free=False))

    def prefetch(self, tokens: Any) -> Plan[int]:
        """Promote the leading stored chunks to DRAM; returns the tokens now resident there."""
        arr = proto.check_tokens(tokens, position_free=False)
        request = pb.PrefetchRequest(namespace=self._ns, tokens_le_i32=arr.tobytes())
        resp = yield from self._unary("Prefetch", request)
        return (resp.num_chunks_promoted + resp.num_chunks_resident) * self.layout.chunk_tokens

    def stats(self) -> Plan[dict[str, Any]]:
        """Tier occupancy and counters: {"tiers": [...], "uptime_ms", "version", ...}."""
        return proto.stats_to_dict((yield from self._unary("Stats", pb.StatsRequest())))

    def fetch_blocks(self, tokens: Any, layer: int, kind: int, heads: Sequence[int],
                     blocks: Sequence[int], *, block_tokens: int = 8) -> Plan[bytes]:
        """Blocks ``(heads[i], blocks[i])`` of ``(layer, kind 0=K|1=V)``, concatenated.

        Block b is tokens ``[b * block_tokens, (b + 1) * block_tokens)`` of ``tokens``;
        each is ``block_tokens x head_dim`` elements in ``layout.dtype``.

        Raises:
            InvalidArgument: layer, kind, a head or a block out of range, or mismatched lengths.
            NotFound: a chunk holding a requested block is not stored.
        """
        request = proto.fetch_blocks_request(self._ns, tokens, layer, kind, heads, blocks,
                                             block_tokens)
        return (yield from self._unary("FetchBlocks", request)).data

    def put_blob(self, tokens: Any, kind: str, data: bytes) -> Plan[bool]:
        """Attach ``data`` (e.g. a sparse shadow bundle) to exactly ``tokens`` under ``kind``.

        Returns True if this replaced a blob stored there before (the last put wins).
        A blob over ``max_blob_part_bytes`` (or over one message) is stored in parts
        plus a manifest, written last; ``get_blob`` joins and verifies them.

        Raises:
            InvalidArgument: no tokens, an empty blob, a kind outside 1-128 bytes, or a
                namespace layout clash.
            CapacityExhausted: the tokens fill the message, or no tier holds the blob
                (what is stored then reads as a miss or as the previous blob).
        """
        fields = proto.blob_fields(tokens, kind)
        size = blobs.part_size(self._part_bytes, len(fields["tokens_le_i32"]) // 4,
                               self.max_blob_part_bytes)
        if blobs.is_manifest(data):  # stored as itself it would read as a manifest
            size = min(size, -(-len(data) // 2))
        elif len(data) <= size:
            return (yield from self._put_one_blob(fields, kind, data))
        manifest = blobs.PartManifest.of(data, size)
        view, num_parts = memoryview(data), manifest.num_parts
        for i in range(num_parts):
            yield from self._put_one_blob(fields, blobs.part_kind(kind, i, num_parts),
                                          view[i * size : (i + 1) * size])
        return (yield from self._put_one_blob(fields, kind, manifest.to_bytes()))

    def get_blob(self, tokens: Any, kind: str) -> Plan[bytes | None]:
        """The blob attached to exactly ``tokens`` under ``kind``; None on a miss.

        A parted blob with a missing part, a part of the wrong length, or parts that
        do not hash to its manifest reads as a miss (logged, ``num_broken_blobs``).
        """
        fields = proto.blob_fields(tokens, kind)
        head = yield from self._get_one_blob(fields, kind)
        if head is None or not blobs.is_manifest(head):
            return head
        try:
            return (yield from self._join_blob(fields, kind, blobs.PartManifest.from_bytes(head)))
        except blobs.BROKEN_ERRORS as exc:
            self.num_broken_blobs += 1
            log.warning("ignoring blob %s of %d tokens: %s", kind,
                        len(fields["tokens_le_i32"]) // 4, exc)
            return None

    # ------------------------------------------------------------ position-free chunks

    def put_chunk(self, tokens: Any, kv: Any) -> Plan[bool]:
        """Store a text chunk's KV position-free (any length); True if newly stored."""
        plan = proto.plan_put(self.layout, tokens, kv, position_free=True)
        done = yield from self._put_local(plan)
        if done is not local.STREAM:
            return done.num_chunks_stored == 1

        def attempt(index: int, timeout: float) -> Plan[bool]:
            messages = proto.put_requests(self._ns, self.layout, plan, 0, self._part_bytes,
                                          self._codec)
            return (yield Unary(index, "Put", messages, timeout)).num_chunks_stored == 1

        return (yield from self._failover("Put", attempt))

    def get_chunk(self, tokens: Any, *, as_numpy: bool = False, decode: str = "server",
                  device: Any = None) -> Plan[Any]:
        """A position-free chunk's KV, ``[layers, 2, heads, len(tokens), dim]``, or None."""
        return (yield from self._get(tokens, layers=None, as_numpy=as_numpy,
                                     position_free=True, decode=decode, device=device))

    def lookup_chunk(self, tokens: Any) -> Plan[bool]:
        """Whether a position-free chunk is stored."""
        return (yield from self._lookup(tokens, position_free=True)) > 0

    def delete_chunk(self, tokens: Any) -> Plan[bool]:
        """Remove a position-free chunk; True if it was stored."""
        return (yield from self._delete(tokens, position_free=True)) > 0

    # ------------------------------------------------------------ same-host arena

    def lease(self, tokens: Any, *, ttl_s: float | None = None,
              position_free: bool = False) -> Plan[local.ArenaLease]:
        """Pin the leading stored chunks in the daemon's arena and map it (same host only).

        The returned lease (a context manager; ``async with`` for ``AsyncClient``)
        gives the mapped arena and one extent per pinned chunk; objects are not
        verified: check them before use. Release it when done (``AsyncClient``:
        ``await lease.release()``); it also ends by itself after ``ttl_s`` (default:
        the daemon's).

        Raises:
            PermissionDenied: the daemon refuses arena references to this caller.
            NotFound: the arena cannot be mapped here (another host or user).
        """
        if self._local.transport == "stream":
            raise InvalidArgument("this client was made with transport='stream'; leases need "
                                  "the arena")
        arr = proto.check_tokens(tokens, position_free=position_free)
        index = self._conns.order()[0]
        return (yield from self._lease(index, arr, position_free, ttl_s))

    def may_view(self) -> bool:
        """Whether ``view``/``lease`` can work from here (no RPC): the first daemon is on
        a loopback address (or ``transport="arena"``) and has not refused the arena."""
        index = self._conns.order()[0]
        return self._local.wants(index, self._conns.addresses[index])

    def view(self, tokens: Any, *, position_free: bool = False, verify: bool = True,
             ttl_s: float | None = None) -> Plan[ArenaView]:
        """The leading stored chunks, read in place in the daemon's arena (same host only).

        ``with client.view(tokens) as v`` (``AsyncClient``: ``async with await
        client.view(tokens) as v``) pins the chunks under a lease and gives
        ``v.chunks`` (read-only ``[layers, 2, heads, T, dim]`` numpy views, one per
        chunk) and ``v.objects`` (their KVC1 objects); nothing is copied. Each object is
        checked against the layout, and its checksum verified when ``verify``.

        Raises:
            PermissionDenied, NotFound: the arena cannot be used (see ``lease``).
            InvalidArgument: a chunk is stored compressed (kvq); use ``get``.
            Corrupt: an object fails its checks.
        """
        arr = proto.check_tokens(tokens, position_free=position_free)
        lease = yield from ClientCore.lease(self, arr, ttl_s=ttl_s, position_free=position_free)
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        try:
            return (yield Offload(open_view, (lease, self.layout, per_chunk, verify)))
        except BaseException:
            yield from self._release(self._conns.order()[0], lease.lease_id)
            raise

    # ------------------------------------------------------------ shared plans

    def _put_local(self, plan: proto.PutPlan) -> Plan[Any]:
        """The same-host put (``client/_arena_put.py``): its result, or local.STREAM."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not self._local.wants(index, address):
            return local.STREAM
        try:
            return (yield from arena_put.put_steps(self._local, index, self._ns, self.layout,
                                                   plan, self._codec, self._conns.timeout_s))
        except (grpc.RpcError, KVStoreError) as exc:
            return arena_put.after_failure(self._local, index, address, exc)

    def _failover(self, what: str, attempt: Attempt) -> Plan[Any]:
        """Run ``attempt`` against each address until one answers (see module doc)."""
        deadline = time.monotonic() + self._conns.timeout_s
        failures: list[str] = []
        for index in self._conns.order():
            try:
                result = yield from attempt(index, self._conns.remaining(deadline, what))
            except grpc.RpcError as exc:
                self._conns.record_failure(what, index, exc, failures)
                continue
            self._conns.succeeded(index)
            return result
        raise self._conns.all_failed(what, failures)

    def _unary(self, method: str, request: Any) -> Plan[Any]:
        """One unary RPC with failover."""

        def attempt(index: int, timeout: float) -> Plan[Any]:
            return (yield Unary(index, method, request, timeout))

        return (yield from self._failover(method, attempt))

    def _lookup(self, tokens: Any, *, position_free: bool) -> Plan[int]:
        arr = proto.check_tokens(tokens, position_free=position_free)
        request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=arr.tobytes(),
                                   position_free=position_free)
        return (yield from self._unary("Lookup", request)).num_tokens

    def _delete(self, tokens: Any, *, position_free: bool) -> Plan[int]:
        arr = proto.check_tokens(tokens, position_free=position_free)
        request = pb.DeleteRequest(namespace=self._ns, tokens_le_i32=arr.tobytes(),
                                   position_free=position_free)
        return (yield from self._unary("Delete", request)).num_chunks_deleted

    def _put_one_blob(self, fields: dict[str, Any], kind: str, data: Any) -> Plan[bool]:
        request = pb.PutBlobRequest(namespace=self._ns, data=bytes(data),
                                    **{**fields, "kind": kind})
        return (yield from self._unary("PutBlob", request)).num_blobs_replaced == 1

    def _get_one_blob(self, fields: dict[str, Any], kind: str) -> Plan[bytes | None]:
        request = pb.GetBlobRequest(namespace=self._ns, **{**fields, "kind": kind})
        resp = yield from self._unary("GetBlob", request)
        return resp.data if resp.HasField("data") else None

    def _join_blob(self, fields: dict[str, Any], kind: str,
                   manifest: blobs.PartManifest) -> Plan[bytes | None]:
        parts = []
        for i in range(manifest.num_parts):
            part = yield from self._get_one_blob(
                fields, blobs.part_kind(kind, i, manifest.num_parts))
            if part is None:
                self.num_broken_blobs += 1
                log.info("blob %s lost part %d of %d; a miss", kind, i, manifest.num_parts)
                return None
            manifest.check_part(i, part)
            parts.append(part)
        data = b"".join(parts)
        manifest.check_whole(data)
        return data

    def _assembler(self, layers: list[int] | None, tokens: Any, *, layer_major: bool,
                   position_free: bool) -> proto.GetAssembler:
        per_chunk = len(tokens) if position_free else self.layout.chunk_tokens
        return proto.GetAssembler(self.layout, per_chunk,
                                  layers or list(range(self.layout.num_layers)), layer_major)

    def _get(self, tokens: Any, *, layers: Sequence[int] | None, as_numpy: bool,
             position_free: bool, decode: str, device: Any, out: Any = None,
             verify: bool = True) -> Plan[Any]:
        arr = proto.check_tokens(tokens, position_free=position_free)
        chosen = proto.check_layers(layers, self.layout)
        dest = None if out is None else local.check_out(
            out, self.layout, len(chosen or range(self.layout.num_layers)),
            local.out_tokens(arr, self.layout, position_free))
        if codecs.check_decode(decode) == "client":
            if out is not None:
                raise InvalidArgument("out= fills CPU buffers from stored raw bytes; with "
                                      "decode='client' use the returned tensor")
            got = yield from self._get_encoded(arr, chosen, position_free, device)
            return None if got is None else proto.tensor_result(got, self.layout, as_numpy)
        if out is None:
            got = yield from self._get_gpu(arr, chosen, position_free, device)
            if got is not local.STREAM:
                return got
        got = yield from self._get_local(arr, chosen, position_free, dest, verify)
        if got is not local.STREAM:
            return self._result(got, out, dest, device, as_numpy)
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=False,
                                    position_free=position_free,
                                    max_response_bytes=self.max_message_bytes)

        def attempt(index: int, timeout: float) -> Plan[Any]:
            asm = self._assembler(chosen, arr, layer_major=False, position_free=position_free)
            stream = yield OpenStream(index, "Get", request, timeout)
            while (msg := (yield Receive(stream))) is not END:
                asm.add(msg)
            return asm.result()

        got = yield from self._failover("Get", attempt)
        return self._result(got, out, dest, device, as_numpy)

    def _result(self, got: Any, out: Any, dest: Any, device: Any, as_numpy: bool) -> Any:
        """What ``get`` returns for a storage array (or None): ``out``'s leading tokens
        when the caller gave ``out``, else a new tensor on ``device``."""
        if out is not None:
            return local.deliver(got, out, dest, self.layout.dtype, as_numpy=as_numpy)
        return None if got is None else gpu.on_device(from_storage(
            got, self.layout.dtype, as_numpy=as_numpy), device, as_numpy)

    def _get_gpu(self, arr: Any, chosen: list[int] | None, position_free: bool,
                 device: Any) -> Plan[Any]:
        """The GPU-lease read of ``_get``: a tensor on ``device``, None or local.STREAM."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not (self._gpu.wants(index, device) and self._local.wants(index, address)):
            return local.STREAM
        try:
            resp = yield Unary(index, "LeaseGpuChunks",
                               gpu.lease_request(self._ns, arr, position_free),
                               self._conns.timeout_s)
        except grpc.RpcError as exc:
            self._gpu.fallback(index, address, error_from_rpc(exc, address))
            return local.STREAM
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        try:  # the copies are short device work: no worker thread
            return self._gpu.read_lease(index, address, resp, self.layout, per_chunk,
                                        chosen or list(range(self.layout.num_layers)), device)
        finally:
            if resp.lease_id:
                yield from self._release(index, resp.lease_id)

    def _get_encoded(self, arr: Any, chosen: list[int] | None, position_free: bool,
                     device: Any) -> Plan[Any]:
        """Stream the objects as stored and decode them here (off the event loop)."""
        request = proto.get_request(self._ns, arr, layers=None, layer_major=False,
                                    position_free=position_free, encoded=True,
                                    max_response_bytes=self.max_message_bytes)

        def attempt(index: int, timeout: float) -> Plan[list[bytes]]:
            got = codecs.EncodedObjects()
            stream = yield OpenStream(index, "Get", request, timeout)
            while (msg := (yield Receive(stream))) is not END:
                got.add(msg)
            return got.objects

        objects = yield from self._failover("Get", attempt)
        if not objects:
            return None
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        return (yield Offload(codecs.decode_objects,
                              (objects, self.layout, per_chunk, chosen, device)))

    def _get_local(self, arr: Any, chosen: list[int] | None, position_free: bool,
                   dest: Any = None, verify: bool = True) -> Plan[Any]:
        """The arena read of ``_get``: an array, None (nothing stored) or local.STREAM."""
        index = self._conns.order()[0]
        address = self._conns.addresses[index]
        if not self._local.wants(index, address):
            return local.STREAM
        per_chunk = len(arr) if position_free else self.layout.chunk_tokens
        layers = chosen or list(range(self.layout.num_layers))
        try:
            lease = yield from self._lease(index, arr, position_free, None)
            try:
                out = yield Offload(self._local.read, (lease, self.layout, per_chunk, layers,
                                                       dest, verify))
            except (KVStoreError, local.NotRaw):
                yield from self._release(index, lease.lease_id)
                raise
            yield from self._release(index, lease.lease_id)
            return out
        except PermissionDenied as exc:
            return self._local.fallback(index, address, exc, refused=True)
        except (KVStoreError, local.NotRaw) as exc:
            return self._local.fallback(index, address, exc, refused=False)

    def _lease(self, index: int, arr: Any, position_free: bool,
               ttl_s: float | None) -> Plan[local.ArenaLease]:
        address = self._conns.addresses[index]
        deadline = time.monotonic() + self._conns.timeout_s
        for attempt in range(2):
            arena = self._local.mapped(index)
            try:
                timeout = self._conns.remaining(deadline, "LeaseChunks")
                if arena is None:
                    arena = local.attach(
                        (yield Unary(index, "AttachArena", pb.AttachArenaRequest(), timeout)))
                    self._local.remember(index, arena)
                request = pb.LeaseChunksRequest(
                    namespace=self._ns, tokens_le_i32=arr.tobytes(), position_free=position_free,
                    ttl_ms=0 if ttl_s is None else max(1, int(ttl_s * 1000)),
                    arena_nonce=arena.nonce)
                resp = yield Unary(index, "LeaseChunks", request, timeout)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, address)
                if isinstance(error, NotFound) and attempt == 0:
                    self._local.forget(index)  # the daemon restarted: map its new arena
                    continue
                raise error from None
            return local.ArenaLease(arena.reader, local.extents_of(resp), resp.num_chunks_stored,
                                    resp.lease_id, resp.ttl_ms / 1000,
                                    lambda lease_id: self._run(self._release(index, lease_id)))
        raise AssertionError("unreachable")

    def _release(self, index: int, lease_id: int) -> Plan[None]:
        if not lease_id:
            return
        request = pb.ReleaseLeaseRequest(lease_id=lease_id)
        try:
            yield Unary(index, "ReleaseLease", request, self._conns.timeout_s)
        except grpc.RpcError as exc:  # the lease expires by itself; nothing is lost
            log.info("releasing lease %d failed: %s", lease_id, exc.details())

    def _run(self, plan: Plan[Any]) -> Any:
        raise NotImplementedError  # the driver of the subclass
