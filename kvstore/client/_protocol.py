"""Requests and response assembly shared by Client and AsyncClient; no transport here.

Wire details the client relies on (see the proto for the fields):
- Put sends a header, then each chunk's KVC1 object (raw, or kvq at the client's
  codec level) in parts of at most
  ``min(1 MiB, max_message_bytes - 64 KiB)``: no message exceeds the limit, and
  mid-sized messages stream fastest through gRPC Python.
- Get returns, per chunk, one KVC1 object (encoded, or raw when no layer filter is
  sent and the object fits both ends' message limits), or one message per
  (chunk, layer) carrying ``[2, heads, tokens, dim]`` bytes and their XXH3-64; in
  layer-major order a message may carry one layer of several consecutive chunks
  (``num_chunks_in_data``) under one XXH3-64.
  Every object and layer is verified here; bad bytes raise Corrupt.
- A chunk-major stream may end early (a chunk evicted after the daemon's
  lookup): the result is then the complete leading chunks received.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2 as pb
from kvstore.client._codec import encode_chunk
from kvstore.client._tensors import NUMPY_STORAGE, to_storage
from kvstore.codec.format import FLAG_POSITION_FREE
from kvstore.codec.raw import decode_raw
from kvstore.errors import Corrupt, InvalidArgument, Unavailable
from kvstore.keys import tokens_to_array
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

PART_HEADROOM_BYTES = 64 << 10  # room for the PutRequest envelope around an object part
# Put sends objects in parts of at most this size (or the message limit, if smaller):
# measured on loopback, gRPC Python moves ~1 MiB messages 2-3x faster than 6 MiB ones
# (large messages are copied and reassembled whole on both sides before any use).
STREAM_PART_BYTES = 1 << 20
MAX_POSITION_FREE_TOKENS = 1 << 20
DTYPE_TO_PROTO = {"float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16,
                  "float32": pb.DTYPE_FLOAT32}
_KV_AXES = "[layers, 2, kv_heads, tokens, head_dim]"


def namespace_to_proto(name: str, layout: KVLayout, tp_rank: int) -> pb.Namespace:
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"namespace must be a non-empty string, got {name!r}")
    return pb.Namespace(
        name=name, tp_rank=tp_rank,
        layout=pb.Layout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                         head_dim=layout.head_dim, dtype=DTYPE_TO_PROTO[layout.dtype],
                         chunk_tokens=layout.chunk_tokens,
                         keys_pre_rope=layout.keys_pre_rope),
    )


def check_tokens(tokens: Any, *, position_free: bool) -> np.ndarray:
    arr = tokens_to_array(tokens)
    if position_free and not 1 <= arr.size <= MAX_POSITION_FREE_TOKENS:
        raise InvalidArgument(f"a position-free chunk has 1 to {MAX_POSITION_FREE_TOKENS} "
                              f"tokens, got {arr.size}")
    return arr


@dataclass(frozen=True, slots=True)
class PutPlan:
    """A validated put: tokens, KV in storage dtype, and how many chunks it stores."""

    tokens: np.ndarray  # little-endian int32
    kv: np.ndarray  # [layers, 2, kv_heads, len(tokens), head_dim], layout storage dtype
    num_chunks: int  # full chunks (1 for a position-free chunk)
    tokens_per_chunk: int
    position_free: bool


def plan_put(layout: KVLayout, tokens: Any, kv: Any, *, position_free: bool) -> PutPlan:
    """Validate a put before anything is sent; InvalidArgument names expected vs seen."""
    arr = check_tokens(tokens, position_free=position_free)
    shape = tuple(getattr(kv, "shape", ()))
    if len(shape) != 5:
        raise InvalidArgument(f"kv must have rank 5 {_KV_AXES}, got rank {len(shape)} "
                              f"(shape {shape})")
    if shape[3] != arr.size:
        raise InvalidArgument(f"kv holds {shape[3]} tokens (axis 3 of shape {shape}), but "
                              f"{arr.size} tokens were given")
    expected = layout.shape(arr.size)
    if shape != expected:
        raise InvalidArgument(f"kv has shape {shape}, layout wants {expected} {_KV_AXES}")
    data = to_storage(kv, layout)
    per_chunk = arr.size if position_free else layout.chunk_tokens
    num_chunks = 1 if position_free else arr.size // layout.chunk_tokens
    if num_chunks == 0:  # only full chunks are stored (keys chain whole chunks)
        log.debug("put of %d tokens stores nothing: shorter than one %d-token chunk",
                  arr.size, layout.chunk_tokens)
    return PutPlan(arr, data, num_chunks, per_chunk, position_free)


def put_requests(namespace: pb.Namespace, layout: KVLayout, plan: PutPlan, first_chunk: int,
                 part_bytes: int, codec: str = "raw") -> Iterator[pb.PutRequest | bytes]:
    """The messages of one Put stream; objects are encoded lazily, one chunk at a time.

    ``codec`` is a level name (``kvstore.codec.LEVELS``); "raw" is bit-exact.
    """
    stored_tokens = plan.tokens[: plan.num_chunks * plan.tokens_per_chunk]
    yield pb.PutRequest(header=pb.PutHeader(
        namespace=namespace, tokens_le_i32=stored_tokens.tobytes(), first_chunk=first_chunk,
        position_free=plan.position_free))
    flags = FLAG_POSITION_FREE if plan.position_free else 0
    step = plan.tokens_per_chunk
    for index in range(first_chunk, plan.num_chunks):
        piece = plan.kv[:, :, :, index * step : (index + 1) * step, :]
        obj = encode_chunk(piece, layout, codec, flags, namespace.name)
        view = memoryview(obj)
        part_size = min(part_bytes, STREAM_PART_BYTES)
        for start in range(0, len(obj), part_size):
            end = min(start + part_size, len(obj))
            part = obj if (start, end) == (0, len(obj)) else view[start:end]
            yield frames.put_chunk_request(chunk_index=index, object_part=part,
                                           last_part=end == len(obj))


def get_request(namespace: pb.Namespace, tokens: np.ndarray, *, layers: Sequence[int] | None,
                layer_major: bool, position_free: bool, max_response_bytes: int,
                encoded: bool = False) -> pb.GetRequest:
    """A Get request; ``max_response_bytes`` is this client's receive limit, so the daemon
    sends raw chunks per layer (and smaller layer groups) when whole ones would not fit."""
    order = pb.ORDER_LAYER_MAJOR if layer_major else pb.ORDER_CHUNK_MAJOR
    return pb.GetRequest(namespace=namespace, tokens_le_i32=tokens.tobytes(), order=order,
                         layers=list(layers or ()), position_free=position_free,
                         encoded=encoded, max_response_bytes=max_response_bytes)


def fetch_blocks_request(namespace: pb.Namespace, tokens: Any, layer: int, kind: int,
                         heads: Sequence[int], blocks: Sequence[int],
                         block_tokens: int) -> pb.FetchBlocksRequest:
    """A FetchBlocks request; the daemon checks ranges against the layout and tokens."""
    arr = check_tokens(tokens, position_free=False)
    fields = {"layer": [layer], "kind": [kind], "block_tokens": [block_tokens],
              "heads": heads, "blocks": blocks}
    for name, values in fields.items():
        if any(int(v) < 0 for v in values):
            raise InvalidArgument(f"{name} must be >= 0, got {list(values)[:8]}")
    if block_tokens == 0:
        raise InvalidArgument("block_tokens must be > 0, got 0")
    return pb.FetchBlocksRequest(namespace=namespace, tokens_le_i32=arr.tobytes(), layer=layer,
                                 kind=kind, block_tokens=block_tokens,
                                 heads=[int(h) for h in heads], blocks=[int(b) for b in blocks])


MAX_BLOB_KIND_BYTES = 128  # the proto's limit on PutBlobRequest.kind


def blob_fields(tokens: Any, kind: str) -> dict[str, Any]:
    """The (tokens, kind) fields of PutBlob/GetBlob, checked as the daemon will."""
    arr = check_tokens(tokens, position_free=False)
    if arr.size == 0:
        raise InvalidArgument("a blob describes at least one token, got none")
    if not isinstance(kind, str) or not 1 <= len(kind.encode()) <= MAX_BLOB_KIND_BYTES:
        raise InvalidArgument(f"blob kind must be 1 to {MAX_BLOB_KIND_BYTES} bytes of UTF-8, "
                              f"got {kind!r}")
    return {"tokens_le_i32": arr.tobytes(), "kind": kind}


def split_layers(out: np.ndarray | None, chosen: list[int] | None,
                 layout: KVLayout) -> Iterator[tuple[int, np.ndarray]]:
    """``(layer, [2, heads, n, dim])`` pairs of a ``get`` result (nothing for None)."""
    if out is None:
        return
    yield from zip(chosen or range(layout.num_layers), out, strict=True)


def check_layers(layers: Sequence[int] | None, layout: KVLayout) -> list[int] | None:
    if layers is None:
        return None
    chosen = sorted({int(x) for x in layers})
    if not chosen or chosen[0] < 0 or chosen[-1] >= layout.num_layers:
        raise InvalidArgument(f"layers must be a non-empty set of indexes in "
                              f"[0, {layout.num_layers}), got {list(layers)}")
    return chosen


@dataclass(slots=True)
class GetAssembler:
    """Checks and places the messages of one Get stream into one storage array."""

    layout: KVLayout
    tokens_per_chunk: int
    layers: list[int]  # the layers asked for, ascending (all layers if none were named)
    layer_major: bool
    num_chunks: int | None = None  # from the first message
    out: np.ndarray | None = None  # [len(layers), 2, heads, num_chunks * T, dim]
    _expected: Iterator[tuple[int, int | None]] | None = None
    _received: int = 0
    _per_chunk_msgs: int = 1
    _layer_counts: dict[int, int] = field(default_factory=dict)

    def add(self, msg: frames.GetMessage) -> int | None:
        """Place one message; returns the position (in ``layers``) of a layer it completed."""
        if self.out is None:
            self._start(msg)
        n = msg.num_chunks_in_data
        if n > 1 and not self.layer_major:
            raise Corrupt(f"daemon sent {n} chunks in one message of a chunk-major stream")
        for k in range(n):  # a layer-major message may hold one layer of n chunks
            seen = (msg.chunk_index + k, msg.layer)
            want = next(self._expected, None)  # type: ignore[arg-type]
            if seen != want or msg.num_chunks != self.num_chunks:
                raise Corrupt(f"daemon sent (chunk, layer) {seen} of {msg.num_chunks} chunks, "
                              f"expected {want} of {self.num_chunks}")
        self._received += n
        t = self.tokens_per_chunk
        if msg.layer is None:
            span = slice(msg.chunk_index * t, (msg.chunk_index + 1) * t)
            self.out[:, :, :, span, :] = self._decode_object(msg)  # type: ignore[index]
            return None
        position = self.layers.index(msg.layer)
        for k, block in enumerate(self._decode_layer(msg, n)):
            c = msg.chunk_index + k
            self.out[position, :, :, c * t : (c + 1) * t, :] = block  # type: ignore[index]
        self._layer_counts[position] = self._layer_counts.get(position, 0) + n
        return position if self._layer_counts[position] == self.num_chunks else None

    def add_streamed_layer(self, msg: frames.GetMessage, *, yielded: int,
                           num_chunks: int | None) -> int | None:
        """Place one layer-major message; the position of a layer to yield now, or None.

        On failover the stream restarts on another daemon: ``yielded`` layers were
        handed out already and ``num_chunks`` is what the broken stream announced.
        """
        done = self.add(msg)
        if num_chunks is not None and yielded and self.num_chunks != num_chunks:
            raise Unavailable("stream broke and the next daemon holds a different "
                              "number of chunks; retry the call")
        return done if done is not None and done >= yielded else None

    def _start(self, msg: frames.GetMessage) -> None:
        n = msg.num_chunks
        if n == 0:
            raise Corrupt("daemon sent a Get message announcing 0 chunks")
        self.num_chunks = n
        lay = self.layout
        self.out = np.empty((len(self.layers), 2, lay.num_kv_heads, n * self.tokens_per_chunk,
                             lay.head_dim), dtype=NUMPY_STORAGE[lay.dtype])
        if self.layer_major:
            order = [(c, layer) for layer in self.layers for c in range(n)]
        elif msg.layer is not None:
            order = [(c, layer) for c in range(n) for layer in self.layers]
            self._per_chunk_msgs = len(self.layers)
        else:
            order = [(c, None) for c in range(n)]
        self._expected = iter(order)

    def _decode_object(self, msg: frames.GetMessage) -> np.ndarray:
        header, arr = decode_raw(msg.data, verify=True)  # raises Corrupt
        lay = self.layout
        seen = (header.dtype, header.num_layers, header.num_kv_heads, header.head_dim,
                header.num_tokens)
        want = (lay.dtype, lay.num_layers, lay.num_kv_heads, lay.head_dim, self.tokens_per_chunk)
        if seen != want:
            raise Corrupt(f"chunk {msg.chunk_index}: daemon sent an object with (dtype, layers, "
                          f"heads, head_dim, tokens) {seen}, expected {want}")
        return arr

    def _decode_layer(self, msg: frames.GetMessage, n: int) -> np.ndarray:
        """``[n, 2, heads, tokens, dim]``: one layer of ``n`` consecutive chunks."""
        lay = self.layout
        shape = (n, 2, lay.num_kv_heads, self.tokens_per_chunk, lay.head_dim)
        want_bytes = int(np.prod(shape)) * lay.itemsize
        data = msg.data
        if len(data) != want_bytes:
            raise Corrupt(f"chunk {msg.chunk_index} layer {msg.layer}: {len(data)} bytes, "
                          f"expected {want_bytes}")
        actual = xxhash.xxh3_64_intdigest(data)
        if actual != msg.checksum_xxh3:
            raise Corrupt(f"chunk {msg.chunk_index} layer {msg.layer}: checksum "
                          f"{actual:#018x}, daemon sent {msg.checksum_xxh3:#018x}")
        return np.frombuffer(data, dtype=NUMPY_STORAGE[lay.dtype]).reshape(shape)

    def layer(self, position: int) -> np.ndarray:
        """The assembled ``[2, heads, tokens, dim]`` of one completed layer."""
        assert self.out is not None
        return self.out[position]

    def result(self) -> np.ndarray | None:
        """The complete leading chunks received; None if the stream carried none."""
        if self.out is None or self.num_chunks is None:
            return None
        if self.layer_major:
            if self._received != self.num_chunks * len(self.layers):
                raise Unavailable(f"layer-major stream ended after {self._received} of "
                                  f"{self.num_chunks * len(self.layers)} messages")
            return self.out
        complete = self._received // self._per_chunk_msgs
        if complete == self.num_chunks:
            return self.out
        if complete == 0:
            return None
        return np.ascontiguousarray(self.out[:, :, :, : complete * self.tokens_per_chunk, :])


def tensor_result(out: Any, layout: KVLayout, as_numpy: bool) -> Any:
    """A decoded torch tensor as ``get`` returns it: itself, or numpy storage on the CPU."""
    return to_storage(out, layout) if as_numpy else out


def stats_to_dict(resp: pb.StatsResponse) -> dict[str, Any]:
    """A StatsResponse as plain Python values (what ``Client.stats`` returns)."""
    fields = ("name", "used_bytes", "capacity_bytes", "num_objects", "hits", "misses",
              "evictions", "corrupt", "errors", "puts", "read_bytes", "written_bytes")
    tiers = [{**{f: getattr(t, f) for f in fields}, "info": dict(t.info)} for t in resp.tiers]
    return {"tiers": tiers, "uptime_ms": resp.uptime_ms, "version": resp.version,
            "requests": resp.requests, "failed_requests": resp.failed_requests}
