"""Namespaces and chunk keys: the prefix hash chain and position-free keys (DESIGN §2).

Keys are SHA-256 digests over a canonical byte encoding (little-endian int32
tokens, length-prefixed UTF-8 strings). Nothing is seeded per process, so a key
computed on one machine is the same on every other and after restarts.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout

ChunkKey = NewType("ChunkKey", bytes)  # 32-byte SHA-256 digest naming one stored chunk
NamespaceId = NewType("NamespaceId", bytes)  # 32-byte digest of everything in a Namespace

# Bumped when the key derivation changes, so old and new keys never collide.
KEY_SCHEME_VERSION = 1
# Version of the stored-object codecs; part of the namespace so that objects of an
# incompatible codec generation are never read as current ones.
CODEC_VERSION = 1

_MAX_NAME_BYTES = 256
_TOKEN_MIN, _TOKEN_MAX = -(2**31), 2**31 - 1


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes two KV tensors incompatible; keys never collide across these.

    ``name`` conventionally carries the model id and weights revision
    ("smollm2-135m@main"); ``tenant`` is set by the daemon from the caller's
    credentials, never by the caller.
    """

    name: str  # model id and revision, chosen by the user
    layout: KVLayout  # layers, heads, head dim, dtype, chunk size
    tp_rank: int = 0  # tensor-parallel rank whose heads these are
    tenant: str | None = None  # owning tenant; None for an unauthenticated daemon

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgument(f"namespace name must be a non-empty string, got {self.name!r}")
        if len(self.name.encode()) > _MAX_NAME_BYTES:
            raise InvalidArgument(
                f"namespace name is {len(self.name.encode())} bytes, at most {_MAX_NAME_BYTES}"
            )
        if not isinstance(self.tp_rank, int) or self.tp_rank < 0:
            raise InvalidArgument(f"tp_rank must be a non-negative int, got {self.tp_rank!r}")

    @property
    def id(self) -> NamespaceId:
        """Digest of the namespace: the root of every key chain in it."""
        lay = self.layout
        encoded = b"".join(
            [
                b"kvstore-ns",
                struct.pack("<HH", KEY_SCHEME_VERSION, CODEC_VERSION),
                _field(self.name.encode()),
                _field((self.tenant or "").encode()),
                struct.pack("<?", self.tenant is not None),
                _field(lay.dtype.encode()),
                struct.pack(
                    "<IIIII",
                    lay.num_layers,
                    lay.num_kv_heads,
                    lay.head_dim,
                    lay.chunk_tokens,
                    self.tp_rank,
                ),
                # Only when set, so the keys of existing (post-RoPE) namespaces stay put.
                b"keys-pre-rope" if lay.keys_pre_rope else b"",
            ]
        )
        return NamespaceId(hashlib.sha256(encoded).digest())


def tokens_to_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate token ids and return them as a contiguous little-endian int32 array."""
    try:
        arr = np.asarray(tokens)
    except Exception as exc:  # ragged lists etc.
        raise InvalidArgument(f"tokens must be a 1-D sequence of ints: {exc}") from exc
    if arr.ndim != 1:
        raise InvalidArgument(f"tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, dtype="<i4")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.min() < _TOKEN_MIN or arr.max() > _TOKEN_MAX:
        raise InvalidArgument("token ids must fit in int32")
    return np.ascontiguousarray(arr, dtype="<i4")


def prefix_keys(namespace: Namespace, tokens: Sequence[int] | np.ndarray) -> list[ChunkKey]:
    """Keys of every full chunk of ``tokens``: ``h_i = H(ns, h_{i-1}, tokens of chunk i)``.

    A partial last chunk has no key (it is never stored).
    """
    arr = tokens_to_array(tokens)
    chunk = namespace.layout.chunk_tokens
    parent = bytes(namespace.id)
    keys: list[ChunkKey] = []
    for start in range(0, len(arr) - chunk + 1, chunk):
        h = hashlib.sha256(b"kvstore-prefix")
        h.update(parent)
        h.update(arr[start : start + chunk].tobytes())
        parent = h.digest()
        keys.append(ChunkKey(parent))
    return keys


def position_free_key(namespace: Namespace, tokens: Sequence[int] | np.ndarray) -> ChunkKey:
    """Key of a text chunk independent of where it appears: ``H(ns, "chunk", tokens)``.

    Used for RAG chunk-cache reuse (DESIGN §7); ``tokens`` may have any length > 0.
    """
    arr = tokens_to_array(tokens)
    if arr.size == 0:
        raise InvalidArgument("a position-free chunk needs at least one token")
    h = hashlib.sha256(b"kvstore-chunk")
    h.update(bytes(namespace.id))
    h.update(struct.pack("<I", arr.size))
    h.update(arr.tobytes())
    return ChunkKey(h.digest())


def key_hex(key: ChunkKey) -> str:
    return key.hex()
