"""Request messages -> domain values (Namespace, tokens, keys), with errors naming the field.

Everything the daemon reads from the wire is validated here, so the servicer only
ever sees well-formed namespaces, token arrays and layer lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, Namespace, position_free_key, prefix_keys
from kvstore.layout import KVLayout

DTYPE_BY_PROTO: dict[int, str] = {
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
    pb.DTYPE_FLOAT32: "float32",
}
MAX_POSITION_FREE_TOKENS = 1 << 20  # longest position-free (RAG) chunk, per the proto


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands for request bytes that did not parse as the method's message.

    The server's deserializer returns it instead of raising, so the handler can
    authenticate the caller first and then refuse the call with INVALID_ARGUMENT
    (a raising deserializer ends the call as UNKNOWN, with a traceback in the log).
    """

    reason: str  # the parser's complaint, naming the message type


def lenient_deserializer(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Wrap a protobuf ``FromString``: bytes that do not parse become a MalformedRequest."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError; RecursionError on deeply nested groups
            return MalformedRequest(f"{type(exc).__name__}: {exc}")

    return deserialize


def check_parsed(request: Any) -> Any:
    """``request`` itself, or InvalidArgument if its bytes did not parse."""
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(f"the request bytes do not parse ({request.reason})")
    return request


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on the work one request may ask for (server.max_request_*)."""

    max_tokens: int  # token ids per request
    max_chunks: int  # chunk keys per request

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_chunks < 1:
            raise InvalidArgument(f"server.max_request_tokens and server.max_request_chunks "
                                  f"must be >= 1, got {self.max_tokens} and {self.max_chunks}")

    def check(self, namespace: Namespace, num_tokens: int, *, position_free: bool) -> None:
        """Raises InvalidArgument, naming the limit, for a request over either bound."""
        if num_tokens > self.max_tokens:
            raise InvalidArgument(f"the request has {num_tokens} tokens, over the daemon's "
                                  f"limit of {self.max_tokens} (server.max_request_tokens)")
        num_chunks = 1 if position_free else num_tokens // namespace.layout.chunk_tokens
        if num_chunks > self.max_chunks:
            raise InvalidArgument(
                f"the request addresses {num_chunks} chunks of "
                f"{namespace.layout.chunk_tokens} tokens, over the daemon's limit of "
                f"{self.max_chunks} (server.max_request_chunks); send fewer tokens per call")


def layout_from_proto(msg: pb.Layout) -> KVLayout:
    """A KVLayout from a wire Layout; unset (zero) fields are named in the error."""
    if msg.dtype not in DTYPE_BY_PROTO:
        raise InvalidArgument(
            f"namespace.layout.dtype must be DTYPE_FLOAT16, DTYPE_BFLOAT16 or DTYPE_FLOAT32, "
            f"got {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype}"
        )
    for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens"):
        if getattr(msg, name) == 0:
            raise InvalidArgument(f"namespace.layout.{name} must be > 0, got 0 (unset)")
    return KVLayout(
        num_layers=msg.num_layers, num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim,
        dtype=DTYPE_BY_PROTO[msg.dtype], chunk_tokens=msg.chunk_tokens,
        keys_pre_rope=msg.keys_pre_rope,
    )


def namespace_from_proto(request: object, tenant: str | None) -> Namespace:
    """The Namespace of a request (any message with a ``namespace`` field)."""
    if not request.HasField("namespace"):  # type: ignore[attr-defined]
        raise InvalidArgument("namespace is required, the request has none")
    msg: pb.Namespace = request.namespace  # type: ignore[attr-defined]
    if not msg.HasField("layout"):
        raise InvalidArgument(f"namespace {msg.name!r} has no layout; namespace.layout is required")
    return Namespace(name=msg.name, layout=layout_from_proto(msg.layout), tp_rank=msg.tp_rank,
                     tenant=tenant)


def tokens_from_bytes(data: bytes, *, position_free: bool = False) -> np.ndarray:
    """Token ids from ``tokens_le_i32`` bytes, as a little-endian int32 array."""
    if len(data) % 4:
        raise InvalidArgument(
            f"tokens_le_i32 is {len(data)} bytes, expected a multiple of 4 (little-endian int32)"
        )
    tokens = np.frombuffer(data, dtype="<i4")
    if position_free and not 1 <= tokens.size <= MAX_POSITION_FREE_TOKENS:
        raise InvalidArgument(
            f"a position-free chunk has 1 to {MAX_POSITION_FREE_TOKENS} tokens, got {tokens.size}"
        )
    return tokens


def chunk_keys(namespace: Namespace, tokens: np.ndarray, *, position_free: bool) -> list[ChunkKey]:
    """Keys of the chunks ``tokens`` addresses: one position-free key, or the prefix chain."""
    if position_free:
        return [position_free_key(namespace, tokens)]
    return prefix_keys(namespace, tokens)


def tokens_per_chunk(namespace: Namespace, tokens: np.ndarray, *, position_free: bool) -> int:
    """Tokens one stored chunk covers for this request."""
    return int(tokens.size) if position_free else namespace.layout.chunk_tokens


def layers_from_proto(layers: Sequence[int], layout: KVLayout) -> list[int]:
    """The requested layers (ascending, unique, each < num_layers); empty = all layers."""
    chosen = list(layers)
    if not chosen:
        return list(range(layout.num_layers))
    if any(b <= a for a, b in zip(chosen, chosen[1:], strict=False)):
        raise InvalidArgument(f"layers must be strictly ascending, got {chosen}")
    if chosen[-1] >= layout.num_layers:
        raise InvalidArgument(
            f"layer {chosen[-1]} out of range: the layout has {layout.num_layers} layers"
        )
    return chosen


def order_from_proto(order: int) -> bool:
    """True for layer-major order; an enum value the proto does not define is refused."""
    if order not in pb.Order.values():
        raise InvalidArgument(f"order must be ORDER_UNSPECIFIED, ORDER_CHUNK_MAJOR or "
                              f"ORDER_LAYER_MAJOR, got {order}")
    return order == pb.ORDER_LAYER_MAJOR
