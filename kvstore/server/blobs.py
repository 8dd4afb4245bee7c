"""Blobs: opaque bytes a client attaches to a token sequence (a sparse shadow bundle).

A blob is stored through the engine like a chunk, so it lives in the same tiers,
survives a restart through the disk tier and is evicted like a chunk. The tiers
hold KVC1 objects only, so the daemon wraps the blob in one: codec id BLOB, the
namespace layout in the header, ``num_tokens`` = the sequence length, the kind as
codec metadata and the blob as the single section. The object's XXH3-64 checksum covers all
of it; on read every field is checked against the request, and any mismatch is
Corrupt (the servicer drops the object and answers a miss).

Key: ``SHA-256("kvstore-blob" ‖ ns.id ‖ u32 len(kind) ‖ kind ‖ u32 n ‖ tokens)``,
tokens as little-endian int32. It names exactly this token sequence (not a prefix
of it), cannot collide with chunk keys (another domain string), and carries the
tenant through ``ns.id``, so a tenant never reads another tenant's blobs.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from kvstore.codec.format import CodecId, pack_object, parse_object
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.keys import ChunkKey, Namespace

MAX_KIND_BYTES = 128


def check_kind(kind: str) -> bytes:
    """The kind as UTF-8; 1 to MAX_KIND_BYTES bytes."""
    encoded = kind.encode()
    if not 1 <= len(encoded) <= MAX_KIND_BYTES:
        raise InvalidArgument(f"blob kind is {len(encoded)} bytes, expected 1 to {MAX_KIND_BYTES}")
    return encoded


def check_tokens(tokens: np.ndarray) -> None:
    if tokens.size == 0:
        raise InvalidArgument("a blob describes at least one token, tokens_le_i32 is empty")


def blob_key(namespace: Namespace, tokens: np.ndarray, kind: bytes) -> ChunkKey:
    """Key of the blob of ``kind`` attached to exactly ``tokens`` (see module doc)."""
    h = hashlib.sha256(b"kvstore-blob")
    h.update(bytes(namespace.id))
    h.update(struct.pack("<I", len(kind)) + kind)
    h.update(struct.pack("<I", tokens.size))
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    return ChunkKey(h.digest())


def wrap(namespace: Namespace, num_tokens: int, kind: bytes, data: bytes) -> bytes:
    """The KVC1 object that stores ``data`` (see module doc)."""
    if not data:
        raise InvalidArgument("a blob is at least 1 byte, data is empty")
    lay = namespace.layout
    return pack_object(codec_id=CodecId.BLOB, codec_level=0, dtype=lay.dtype,
                       num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads,
                       head_dim=lay.head_dim, num_tokens=num_tokens, sections=[data], meta=kind)


def unwrap(obj: bytes, namespace: Namespace, num_tokens: int, kind: bytes) -> bytes:
    """The blob inside a stored object, verified against the request.

    Raises:
        Corrupt: bad checksum or structure, or fields that do not match the request.
    """
    parsed = parse_object(obj)
    h, lay = parsed.header, namespace.layout
    seen = (h.codec_id, h.dtype, h.num_layers, h.num_kv_heads, h.head_dim, h.num_tokens,
            h.num_sections, bytes(parsed.meta))
    want = (CodecId.BLOB, lay.dtype, lay.num_layers, lay.num_kv_heads, lay.head_dim,
            num_tokens, 1, kind)
    if seen != want:
        raise Corrupt(f"stored blob has codec/layout/tokens/kind {seen[:7]}, the request "
                      f"wants {want[:7]} kind {kind!r}")
    return bytes(parsed.sections[0])
