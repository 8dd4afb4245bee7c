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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import _protocol as proto
from kvstore.client._status import error_from_rpc, is_failover
from kvstore.client._tensors import from_storage
from kvstore.errors import DeadlineExceeded, InvalidArgument, Unavailable
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


def normalize_addresses(addresses: str | Sequence[str]) -> list[str]:
    found = [addresses] if isinstance(addresses, str) else list(addresses)
    if not found or not all(isinstance(a, str) and ":" in a for a in found):
        raise InvalidArgument(f"addresses must be HOST:PORT strings, got {addresses!r}")
    return found


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes < 2 * proto.PART_HEADROOM_BYTES:
        raise InvalidArgument(f"max_message_bytes must be >= {2 * proto.PART_HEADROOM_BYTES}, "
                              f"got {max_message_bytes}")
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def read_ca(tls_ca_file: str | None) -> bytes | None:
    if tls_ca_file is None:
        return None
    try:
        with open(tls_ca_file, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read tls_ca_file {tls_ca_file}: {exc}") from exc


class Connections:
    """Channels to a list of daemons and the failover loop over them."""

    def __init__(self, addresses: str | Sequence[str], *, token: str | None,
                 tls_ca_file: str | None, timeout_s: float, max_message_bytes: int) -> None:
        self.addresses = normalize_addresses(addresses)
        self.timeout_s = timeout_s
        self.metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = channel_options(max_message_bytes)
        self._ca = read_ca(tls_ca_file)
        self._is_tls = tls_ca_file is not None
        self._channels: dict[int, grpc.Channel] = {}
        self._current = 0

    def stub(self, index: int) -> pb_grpc.KVStoreStub:
        channel = self._channels.get(index)
        if channel is None:
            address = self.addresses[index]
            if self._is_tls:
                creds = grpc.ssl_channel_credentials(root_certificates=self._ca)
                channel = grpc.secure_channel(address, creds, options=self._options)
            else:
                channel = grpc.insecure_channel(address, options=self._options)
            self._channels[index] = channel
        return pb_grpc.KVStoreStub(channel)

    def order(self) -> list[int]:
        """Address indexes to try, the one that answered last first."""
        n = len(self.addresses)
        return [(self._current + i) % n for i in range(n)]

    def succeeded(self, index: int) -> None:
        self._current = index

    def remaining(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{what}: timeout of {self.timeout_s} s spent before a daemon "
                                   "answered")
        return left

    def all_failed(self, what: str, failures: list[str]) -> Unavailable:
        return Unavailable(f"{what}: no daemon answered; tried " + "; ".join(failures))

    def call(self, what: str, fn: Callable[[pb_grpc.KVStoreStub, float, Metadata], T]) -> T:
        """Run ``fn(stub, timeout_s, metadata)`` against each address until one answers."""
        deadline = time.monotonic() + self.timeout_s
        failures: list[str] = []
        for index in self.order():
            try:
                result = fn(self.stub(index), self.remaining(deadline, what), self.metadata)
            except grpc.RpcError as exc:
                if not is_failover(exc):
                    raise error_from_rpc(exc, self.addresses[index]) from None
                failures.append(f"{self.addresses[index]}: {exc.code().name} {exc.details()}")
                log.info("%s failed on %s, trying the next address", what, failures[-1])
                continue
            self.succeeded(index)
            return result
        raise self.all_failed(what, failures)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


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

    Tensors are ``[layers, 2, kv_heads, tokens, head_dim]`` torch tensors or numpy
    arrays in ``layout.dtype``. numpy has no bfloat16: pass and receive bfloat16 as
    a uint16 array of its bit patterns (``t.view(torch.int16).numpy().view("u2")``).
    """

    def __init__(self, addresses: str | Sequence[str], namespace: str, layout: KVLayout, *,
                 token: str | None = None, tls_ca_file: str | None = None,
                 timeout_s: float = 30.0, max_message_bytes: int = 64 << 20,
                 tp_rank: int = 0) -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgument(f"layout must be a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        self._ns = proto.namespace_to_proto(namespace, layout, tp_rank)
        self._part_bytes = max_message_bytes - proto.PART_HEADROOM_BYTES
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
        return self._conns.call("Put", lambda stub, t, md: self._put(stub, t, md, plan))

    def _put(self, stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata,
             plan: proto.PutPlan) -> int:
        first = 0
        if not plan.position_free:
            request = pb.LookupRequest(namespace=self._ns, tokens_le_i32=plan.tokens.tobytes())
            first = stub.Lookup(request, timeout=timeout, metadata=md).num_tokens
            first //= plan.tokens_per_chunk
        if first < plan.num_chunks:
            messages = proto.put_requests(self._ns, self.layout, plan, first, self._part_bytes)
            stub.Put(messages, timeout=timeout, metadata=md)
        return plan.num_chunks * plan.tokens_per_chunk

    def lookup(self, tokens: Any) -> int:
        """Leading tokens stored (a multiple of chunk_tokens); 0 on a miss."""
        return self._lookup(tokens, position_free=False)

    def get(self, tokens: Any, *, layers: Sequence[int] | None = None,
            as_numpy: bool = False) -> Any:
        """The leading stored chunks of ``tokens``: ``[layers, 2, heads, n, dim]`` or None.

        ``n`` is a multiple of chunk_tokens and may be less than asked. ``layers``
        selects (ascending) layers. Every object is verified; bad bytes raise Corrupt.
        """
        return self._get(tokens, layers=layers, as_numpy=as_numpy, position_free=False)

    def get_layers(self, tokens: Any, *, layers: Sequence[int] | None = None,
                   as_numpy: bool = False) -> Iterator[tuple[int, Any]]:
        """Layer-major: yields ``(layer, [2, heads, n, dim])`` as each layer arrives."""
        arr = proto.check_tokens(tokens, position_free=False)
        chosen = proto.check_layers(layers, self.layout)
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=True,
                                    position_free=False)
        deadline = time.monotonic() + self._conns.timeout_s
        yielded, num_chunks, failures = 0, None, []
        for index in self._conns.order():
            stub = self._conns.stub(index)
            asm = self._assembler(chosen, arr, layer_major=True, position_free=False)
            try:
                stream = stub.Get(request, timeout=self._conns.remaining(deadline, "Get"),
                                  metadata=self._conns.metadata)
                for msg in stream:
                    done = asm.add(msg)
                    if num_chunks is not None and yielded and asm.num_chunks != num_chunks:
                        raise Unavailable("stream broke and the next daemon holds a different "
                                          "number of chunks; retry the call")
                    num_chunks = asm.num_chunks
                    if done is not None and done >= yielded:
                        yielded += 1
                        yield asm.layers[done], from_storage(asm.layer(done).copy(),
                                                             self.layout.dtype, as_numpy=as_numpy)
                asm.result()
            except grpc.RpcError as exc:
                if not is_failover(exc):
                    raise error_from_rpc(exc, self._conns.addresses[index]) from None
                failures.append(f"{self._conns.addresses[index]}: {exc.code().name}")
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

    # ------------------------------------------------------------ position-free chunks

    def put_chunk(self, tokens: Any, kv: Any) -> bool:
        """Store a text chunk's KV position-free (any length); True if newly stored."""
        plan = proto.plan_put(self.layout, tokens, kv, position_free=True)

        def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> bool:
            messages = proto.put_requests(self._ns, self.layout, plan, 0, self._part_bytes)
            return stub.Put(messages, timeout=timeout, metadata=md).num_chunks_stored == 1

        return self._conns.call("Put", attempt)

    def get_chunk(self, tokens: Any, *, as_numpy: bool = False) -> Any:
        """A position-free chunk's KV, ``[layers, 2, heads, len(tokens), dim]``, or None."""
        return self._get(tokens, layers=None, as_numpy=as_numpy, position_free=True)

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
             position_free: bool) -> Any:
        arr = proto.check_tokens(tokens, position_free=position_free)
        chosen = proto.check_layers(layers, self.layout)
        request = proto.get_request(self._ns, arr, layers=chosen, layer_major=False,
                                    position_free=position_free)

        def attempt(stub: pb_grpc.KVStoreStub, timeout: float, md: Metadata) -> Any:
            asm = self._assembler(chosen, arr, layer_major=False, position_free=position_free)
            for msg in stub.Get(request, timeout=timeout, metadata=md):
                asm.add(msg)
            return asm.result()

        out = self._conns.call("Get", attempt)
        return None if out is None else from_storage(out, self.layout.dtype, as_numpy=as_numpy)

    def close(self) -> None:
        self._conns.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
